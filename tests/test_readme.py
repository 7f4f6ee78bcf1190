"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert python_blocks()


def test_readme_examples_run(capsys):
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "Wiring(h1=64/256)" in out and "out_features=64" in out


def lightning_example() -> str:
    """The "Make an existing model growable" example: fenced ```py, so the loop above skips
    it (it needs the lightning extra, torchvision and MNIST on disk); run here instead."""
    section = README.read_text().split("## Make an existing model growable", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    return block


def test_readme_lightning_example_runs(tmp_path, monkeypatch, capsys):
    import os

    import pytest

    pytest.importorskip("lightning")
    pytest.importorskip("torchvision")
    data = Path(os.environ.get("GROWDENSE_MNIST_DIR", README.parents[1] / "shared" / "data")) / "MNIST"
    if not (data / "raw").is_dir():
        pytest.skip(f"MNIST not found at {data}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MNIST").symlink_to(data.resolve())  # the example's "data" root, no download
    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints go there too
    exec(compile(lightning_example(), str(README), "exec"), {"__name__": "__readme__"})
    assert "Wiring(1=128/256)" in capsys.readouterr().out
