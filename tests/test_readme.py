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
    import pytest

    pytest.importorskip("lightning")
    pytest.importorskip("torchvision")
    from mnist_data import DATA

    data = DATA / "MNIST"
    if not (data / "raw").is_dir():
        pytest.skip(f"MNIST not found at {data}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "MNIST").symlink_to(data.resolve())  # the example's "data" root, no download
    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints go there too
    exec(compile(lightning_example(), str(README), "exec"), {"__name__": "__readme__"})
    assert "Wiring(1=128/256)" in capsys.readouterr().out


def _front_door() -> list[str]:
    """The README's first two shell blocks: run the main job, run the tests."""
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[:2]


def test_front_door_commands_come_first_and_fit_the_package():
    text = README.read_text()
    run, test = _front_door()
    assert text.index(run) < text.index("## ")  # before any section
    assert run.strip().endswith("growdense reproduce --quick") and '".[experiments]"' in run
    assert test.strip().endswith("python -m pytest -q tests") and '".[test]"' in test
    for cmd in (run, test):
        # the extension compiles against the installed torch: torch and the build tools first
        assert "--no-build-isolation" in cmd and cmd.index("pip install torch") < cmd.index("--no-build-isolation")
    import tomllib

    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text())
    build = " ".join(pyproject["build-system"]["requires"])
    for tool in ("scikit-build-core", "pybind11", "torch"):
        assert tool in build and tool in run  # everything the build needs is installed by the command
    extras = pyproject["project"]["optional-dependencies"]
    names = lambda reqs: {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert {"torchvision", "matplotlib", "tqdm"} <= names(extras["experiments"])
    assert {"pytest", "hypothesis", "torchvision", "matplotlib", "tqdm"} <= names(extras["test"])


def test_front_door_quick_preset_exists():
    import argparse

    from growdense.experiments.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--quick"]))
    assert cfg.preset == "quick" and cfg.download and cfg.data_dir == "./data"
