"""tools/run_study.sh: which models it trains, with which options, and when it refreshes the
claims. ``growdense`` and ``python`` are stand-ins on the PATH that log their arguments, so
nothing trains; the script's own logic (skipping the models finished in the export, one
output folder per model, a refresh after each) runs as it is."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from growdense.experiments.output import write_csv

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "run_study.sh"
MODELS = {  # the study's order: (seed, model) -> reproduce options
    (0, "fixed"): "--approach fixed",
    (0, "approach1-he"): "--approach 1",
    (0, "approach2-he-first"): "--approach 2",
    (1, "fixed"): "--approach fixed",
    (1, "approach1-he"): "--approach 1",
    (1, "approach2-he-first"): "--approach 2",
    (0, "approach1-he-keep"): "--approach 1 --optimizer-state keep",
    (0, "approach2-he-first-keep"): "--approach 2 --optimizer-state keep",
    (0, "approach1-zero_out"): "--approach 1 --init zero_out",
    (0, "approach2-zero_out-first"): "--approach 2 --init zero_out",
    (0, "approach2-he-norm"): "--approach 2 --keep norm",
    (0, "fixed-32x16"): "--approach fixed --fixed-widths 32x16",
    (0, "approach1-gradmax"): "--approach 1 --init gradmax",
    (0, "approach1-tiny"): "--approach 1 --init tiny",
    (0, "approach2-gradmax-first"): "--approach 2 --init gradmax",
    (0, "approach2-tiny-first"): "--approach 2 --init tiny",
    (0, "approach1-gradmax-keep"): "--approach 1 --init gradmax --optimizer-state keep",
    (0, "approach1-tiny-keep"): "--approach 1 --init tiny --optimizer-state keep",
    (0, "approach2-gradmax-first-keep"): "--approach 2 --init gradmax --optimizer-state keep",
    (0, "approach2-tiny-first-keep"): "--approach 2 --init tiny --optimizer-state keep",
}


def _stand_in(folder: Path, name: str, log: Path) -> None:
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "flock", "xargs", "awk")),
                    reason="needs bash, flock, xargs and awk")
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_it_trains_the_unfinished_models_each_in_its_folder_and_refreshes_after_each(tmp_path, jobs):
    docs = tmp_path / "docs" / "study"
    # In the export: seed 0's Fixed finished (200 epochs), its Approach 1 stopped at epoch 26.
    (docs / "seed0").mkdir(parents=True)
    (docs / "seed0" / "config.json").write_text(json.dumps({"config": {"seed": 0, "epochs": 200}}))
    write_csv(docs / "seed0" / "metrics.csv",
              [{"run": "fixed", "epoch": e, "test_loss": 100.0} for e in range(200)]
              + [{"run": "approach1-he", "epoch": e, "test_loss": 110.0} for e in range(26)])
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("growdense", "python"):
        _stand_in(bin_dir, name, log)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", JOBS=jobs)
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(["bash", str(SCRIPT), "DATA", str(tmp_path / "runs"), str(docs)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "seed 0 fixed: finished" in done.stdout

    calls = log.read_text().splitlines()
    trained = {}
    for line in calls:
        if line.startswith("growdense "):
            args = line.split()
            seed, out = args[args.index("--seed") + 1], args[args.index("--out") + 1]
            assert {"--resume", "--no-download"} <= set(args) and args[args.index("--data-dir") + 1] == "DATA"
            trained[(int(seed), Path(out).name)] = " ".join(args[args.index("--out") + 2:])
    want = {(s, f"study-seed{s}-{m}"): opts for (s, m), opts in MODELS.items() if (s, m) != (0, "fixed")}
    assert trained == want
    refreshes = [line for line in calls if line.startswith("python -m growdense.experiments.claims")]
    assert len(refreshes) == len(want)  # one after each model trained, none for the skipped one
    assert all(f"--export {docs} " in r and f"--insert {docs.parent / 'results.md'}" in r for r in refreshes)
    if jobs == "1":  # in order, each refresh right after its model
        assert [c.split()[0] for c in calls] == ["growdense", "python"] * len(want)
