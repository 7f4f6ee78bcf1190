"""Where the MNIST tests find MNIST: where ``growdense reproduce`` would look, or a named folder.

Looked for, in order: ``$GROWDENSE_MNIST_DIR``; ``./data`` (``reproduce``'s default
``--data-dir``, relative to the folder pytest runs in); ``data/`` at the repository root;
``../shared/data`` beside the repository. Each is a data root holding ``MNIST/raw/``
(torchvision's layout). The tests that need MNIST are skipped when none holds it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def candidates() -> list[Path]:
    found = [Path(os.environ["GROWDENSE_MNIST_DIR"])] if os.environ.get("GROWDENSE_MNIST_DIR") else []
    return found + [Path("data").absolute(), REPO / "data", REPO.parent / "shared" / "data"]


def mnist_root() -> Path:
    """The first candidate data root that holds ``MNIST/raw``, else the first candidate (for the skip message)."""
    roots = candidates()
    return next((root for root in roots if (root / "MNIST" / "raw").is_dir()), roots[0])


DATA = mnist_root()
