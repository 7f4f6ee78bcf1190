#!/usr/bin/env bash
# The full-scale study, model by model, in the README's order: seed 0's three models, seed
# 1's, then seed 0's comparisons, the gradient-guided inits last. A model whose 200 epochs
# are already in $STUDY_DOCS (the committed export) is skipped, so the script picks up on a
# machine that has none of the checkpoints; every other model resumes from its per-epoch
# checkpoint, so the script can be stopped at any point and run again. After each model it refreshes the claims table, the
# exported data and the figures (claims.md, seed*/ and figures/seed*/ under $STUDY_DOCS, and
# the claims block of results.md beside it).
#
#   [JOBS=2] tools/run_study.sh DATA_DIR [RUNS_DIR] [STUDY_DOCS]
#
# DATA_DIR holds MNIST/raw; RUNS_DIR (default runs) gets one folder per model,
# study-seed<k>-<model>; STUDY_DOCS (default docs/study) gets what is committed. JOBS models
# train side by side (default 1), each with OMP_NUM_THREADS threads (default: the cores
# shared out among them).
set -euo pipefail
export data=${1:?usage: [JOBS=2] tools/run_study.sh DATA_DIR [RUNS_DIR] [STUDY_DOCS]}
export runs=${2:-runs} docs=${3:-docs/study}
jobs=${JOBS:-1}
threads=$(( $(nproc) / jobs ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
export epochs=200  # the study preset's, which reproduce uses
mkdir -p "$runs" "$docs"

finished() {  # seed, model: does the export hold all of its epochs?
  local f="$docs/seed$1/metrics.csv"
  [ -f "$f" ] && [ "$(awk -F, -v n="$2" '$1 == n' "$f" | wc -l)" -ge "$epochs" ]
}

refresh() {  # the claims, data and figures from every model folder and the export
  shopt -s nullglob
  local roots=("$runs"/study-seed* "$docs")
  python -m growdense.experiments.claims "${roots[@]}" --out "$docs/claims.md" --export "$docs" \
    --figures "$docs/figures" --data-dir "$data" --insert "$(dirname "$docs")/results.md"
}

model() {  # seed, model name (as reproduce names it), then reproduce options
  local seed=$1 name=$2
  shift 2
  if finished "$seed" "$name"; then
    echo "$(date '+%F %T') seed $seed $name: finished in $docs, skipped"
    return
  fi
  echo "$(date '+%F %T') seed $seed $name: $*"
  growdense reproduce --data-dir "$data" --no-download --resume --no-progress --seed "$seed" \
    --out "$runs/study-seed$seed-$name" "$@"
  flock "$runs/.refresh.lock" bash -c 'set -euo pipefail; refresh'  # one at a time when models train side by side
}
export -f finished refresh model

xargs -P "$jobs" -L 1 bash -c 'set -euo pipefail; model "$@"' _ <<'EOF'
0 fixed --approach fixed
0 approach1-he --approach 1
0 approach2-he-first --approach 2
1 fixed --approach fixed
1 approach1-he --approach 1
1 approach2-he-first --approach 2
0 approach1-he-keep --approach 1 --optimizer-state keep
0 approach2-he-first-keep --approach 2 --optimizer-state keep
0 approach1-zero_out --approach 1 --init zero_out
0 approach2-zero_out-first --approach 2 --init zero_out
0 approach2-he-norm --approach 2 --keep norm
0 fixed-32x16 --approach fixed --fixed-widths 32x16
0 approach1-gradmax --approach 1 --init gradmax
0 approach1-tiny --approach 1 --init tiny
0 approach2-gradmax-first --approach 2 --init gradmax
0 approach2-tiny-first --approach 2 --init tiny
0 approach1-gradmax-keep --approach 1 --init gradmax --optimizer-state keep
0 approach1-tiny-keep --approach 1 --init tiny --optimizer-state keep
0 approach2-gradmax-first-keep --approach 2 --init gradmax --optimizer-state keep
0 approach2-tiny-first-keep --approach 2 --init tiny --optimizer-state keep
EOF
