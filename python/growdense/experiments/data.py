"""MNIST through torchvision, as flat float tensors in [0, 1]; downloaded when missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MNIST_FILES", "MnistNotFoundError", "load_mnist", "find_mnist", "download_mnist"]

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MnistNotFoundError(FileNotFoundError):
    """MNIST is not where torchvision looks for it under the given data root."""


def find_mnist(data_dir: str | Path) -> Path:
    """The ``MNIST/raw`` folder under ``data_dir``; raise :class:`MnistNotFoundError` if incomplete."""
    root = Path(data_dir).expanduser()
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    if missing:
        raise MnistNotFoundError(
            f"MNIST not found: looked in {raw.resolve()} for {', '.join(missing)}. "
            f"Pass --data-dir pointing at the folder that contains MNIST/raw/ (torchvision's layout), "
            f"or let growdense reproduce download it there (without --no-download), or fetch it there once "
            f"with: python -c \"from torchvision.datasets import MNIST; MNIST('{root}', download=True); "
            f"MNIST('{root}', train=False, download=True)\""
        )
    return raw


def download_mnist(data_dir: str | Path) -> Path:
    """Download MNIST through torchvision into ``data_dir/MNIST/raw``; return that folder.

    Says where on stderr. Raises :class:`MnistNotFoundError` (naming the folder and the
    cause) when the download fails, e.g. without network access; then the folders and
    files the attempt created are removed again.
    """
    from torchvision.datasets import MNIST

    root = Path(data_dir).expanduser()
    raw = root / "MNIST" / "raw"
    # What a failed download must remove: the topmost folder it creates, or the files it adds.
    created = None
    for folder in (raw, *raw.absolute().parents):
        if folder.exists():
            break
        created = folder
    before = set(raw.iterdir()) if created is None and raw.is_dir() else set()
    print(f"MNIST not found in {raw.resolve()}: downloading it there through torchvision "
          f"(--no-download forbids this)", file=sys.stderr, flush=True)
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except BaseException as error:
        _remove_new(created, raw, before)
        if not isinstance(error, (OSError, RuntimeError, ValueError)):  # URLError is an OSError; torchvision
            raise  # raises RuntimeError; anything else (KeyboardInterrupt) goes on as it is
        raise MnistNotFoundError(
            f"MNIST not found in {raw.resolve()} and downloading it failed ({type(error).__name__}: {error}). "
            f"Without network access, copy the four MNIST files into that folder (torchvision's layout) or pass "
            f"--data-dir pointing at the folder that contains MNIST/raw/."
        ) from error
    return find_mnist(root)


def _remove_new(created: Optional[Path], raw: Path, before: set) -> None:
    """Undo a failed download: remove ``created`` (a folder it made), else files new in ``raw``."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif raw.is_dir():
        for path in set(raw.iterdir()) - before:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _load_split(root: Path, train: bool) -> Tensor:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(root), train=train, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found..."
        raise MnistNotFoundError(f"torchvision could not read MNIST under {root}: {error}") from error
    return ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0)


def load_mnist(
    data_dir: str | Path = "./data",
    *,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    seed: int = 0,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(train, test)`` images as (N, 784) float32 tensors in [0, 1] (grey levels, not binarised).

    ``train_subset``: that many training images drawn without replacement with ``seed``
    (all 60,000 if ``None``); ``test_subset``: the first that many test images. With
    ``download``, MNIST is downloaded into ``data_dir`` when it is not there.
    """
    for what, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be a number of images >= 1 (or None for all), got {value!r}")
    root = Path(data_dir).expanduser()
    try:
        find_mnist(root)
    except MnistNotFoundError:
        if not download:
            raise
        download_mnist(root)
    train = _load_split(root, True)
    test = _load_split(root, False)
    if train_subset is not None and train_subset < len(train):
        g = torch.Generator().manual_seed(seed)
        train = train[torch.randperm(len(train), generator=g)[:train_subset]]
    if test_subset is not None:
        test = test[:test_subset]
    return train.contiguous(), test.contiguous()
