#!/usr/bin/env bash
# The full-scale study, one model at a time, in the README's order: seed 0's three models,
# seed 1's, then seed 0's comparisons. Every line resumes from its per-epoch checkpoints, so
# the script can be stopped at any point and run again. After each model it refreshes the
# claims table, the per-epoch metrics and the figures (claims.md, seed*/ and
# figures/seed*/ under $STUDY_DOCS, and the claims block of results.md beside it).
#
#   tools/run_study.sh DATA_DIR [RUNS_DIR] [STUDY_DOCS]
#
# DATA_DIR holds MNIST/raw; RUNS_DIR (default runs) gets study-seed0/ and study-seed1/;
# STUDY_DOCS (default docs/study) gets what is committed. Threads: OMP_NUM_THREADS.
set -euo pipefail
data=${1:?usage: tools/run_study.sh DATA_DIR [RUNS_DIR] [STUDY_DOCS]}
runs=${2:-runs}
docs=${3:-docs/study}
common=(--data-dir "$data" --no-download --resume --no-progress)

model() {  # seed, then reproduce options
  local seed=$1; shift
  echo "$(date '+%F %T') seed $seed $*"
  growdense reproduce "${common[@]}" --seed "$seed" --out "$runs/study-seed$seed" "$@"
  mkdir -p "$docs"
  # $docs is read too: a one-model line rewrites its folder's evaluation.json with its own model
  # only, and the earlier models' evaluations live on in the last export.
  python -m growdense.experiments.claims "$runs/study-seed0" $( [ -d "$runs/study-seed1" ] && echo "$runs/study-seed1" ) \
    $( [ -d "$docs" ] && echo "$docs" ) --out "$docs/claims.md" --export "$docs" --figures "$docs/figures" \
    --data-dir "$data" --insert "$(dirname "$docs")/results.md"
}

model 0 --approach fixed
model 0 --approach 1
model 0 --approach 2
model 1 --approach fixed
model 1 --approach 1
model 1 --approach 2
model 0 --approach 1 --optimizer-state keep
model 0 --approach 2 --optimizer-state keep
model 0 --approach 1 --init zero_out
model 0 --approach 2 --init zero_out
model 0 --approach 2 --keep norm
model 0 --approach fixed --fixed-widths 32x16
