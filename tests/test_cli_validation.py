"""``growdense reproduce`` refuses every bad option up front: argparse's error form, exit
status 2, within seconds, and nothing written (no --out folder, no data folder)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from growdense.__main__ import main

BAD = [
    (["--init", "bogus"], "bogus"),
    (["--keep", "bogus"], "bogus"),
    (["--init", "he,bogus"], "bogus"),
    (["--optimizer-state", "zero"], "zero"),
    (["--samples", "0"], "--samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--train-subset", "0"], "--train-subset"),
    (["--train-subset", "-5"], "--train-subset"),
    (["--test-subset", "-5"], "--test-subset"),
    (["--epochs", "0"], "--epochs"),
    (["--every", "0"], "--every"),
    (["--iwae-ks", "1,0"], "--iwae-ks"),
    (["--variance-ls", "0"], "--variance-ls"),
    (["--gap-k", "0"], "--gap-k"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--fixed-widths", "300x10"], "300x10"),
    (["--fixed-widths", "0x10"], "0x10"),
    (["--device", "potato"], "potato"),
    (["--device", "meta"], "meta"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "CUDA"))
    BAD.append((["--device", "cuda:1"], "CUDA"))


def _run(args: list[str], tmp_path: Path, capsys) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        code = main(["reproduce", *args])
    except SystemExit as exit:  # argparse's own errors (bad types, unknown choices)
        code = exit.code
    return code, capsys.readouterr().err, time.perf_counter() - t0


@pytest.mark.parametrize("args, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_exits_2_before_writing_anything(args, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default ./data would be created here
    out, data = tmp_path / "out", tmp_path / "data"
    code, err, seconds = _run([*args, "--out", str(out), "--data-dir", str(data), "--no-progress"], tmp_path, capsys)
    assert code == 2, err
    assert "growdense reproduce: error:" in err and named in err, err
    assert err.startswith("usage: growdense reproduce"), err
    assert "Traceback" not in err
    assert not out.exists() and not data.exists() and list(tmp_path.iterdir()) == []
    assert seconds < 10  # nothing trained or loaded


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        code, err, _ = _run(["--out", str(out), "--data-dir", str(tmp_path / "d"), "--no-progress"], tmp_path, capsys)
        assert code == 2 and "growdense reproduce: error: --out" in err and str(out) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_read_only_out_parent_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err, _ = _run(["--out", str(ro / "out"), "--no-progress"], tmp_path, capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "not writable" in err and not (ro / "out").exists()


def test_the_command_exits_2(tmp_path):
    """The installed command's exit status, in a fresh interpreter (PYTHONPATH inherited)."""
    for args in (["--samples", "0"], ["--init", "bogus"]):
        proc = subprocess.run([sys.executable, "-m", "growdense", "reproduce", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())
        assert proc.returncode == 2, proc.stderr
        assert "growdense reproduce: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_negative_subset_is_refused_by_load_mnist(tmp_path):
    from growdense.experiments.data import load_mnist

    for kw in ({"train_subset": -5}, {"test_subset": 0}, {"train_subset": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            load_mnist(tmp_path / "none", **kw)
    assert list(tmp_path.iterdir()) == []
