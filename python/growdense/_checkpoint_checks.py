"""What both checkpoint formats check and share (:mod:`growdense.checkpoint`, one file; and
:mod:`growdense.sharded_checkpoint`, FSDP2 through torch.distributed.checkpoint): the error,
the save arguments' checks, and making a rename durable."""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .wiring import Wiring


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_type(what: str, value: Any, kind: type, optional: bool = False) -> None:
    if (value is None and optional) or isinstance(value, kind):
        return
    raise TypeError(f"{what} must be a {kind.__module__}.{kind.__qualname__}{' or None' if optional else ''}, "
                    f"got {type(value).__name__}")


def _check_generators(generators: Optional[Mapping[str, torch.Generator]]) -> dict[str, torch.Generator]:
    if generators is None:
        return {}
    if not isinstance(generators, Mapping):
        raise TypeError(f"generators must be a mapping {{name: torch.Generator}}, got {type(generators).__name__}")
    for name, generator in generators.items():
        if not isinstance(name, str) or not isinstance(generator, torch.Generator):
            raise TypeError(f"generators must map str names to torch.Generator, got {name!r}: {type(generator).__name__}")
    return dict(generators)


def _check_save_arguments(model, optimizer, generators, wiring, extra) -> None:
    _check_type("model", model, nn.Module)
    _check_type("optimizer", optimizer, torch.optim.Optimizer, optional=True)
    _check_type("wiring", wiring, Wiring, optional=True)
    _check_generators(generators)
    if extra is None:
        return
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a mapping of str keys to values, got {type(extra).__name__}")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"extra keys must be str, got {key!r}")
        bad = _not_weights_only(value, f"extra[{key!r}]")
        if bad is not None:
            where, obj = bad
            raise TypeError(
                f"{where} is a {type(obj).__module__}.{type(obj).__qualname__} ({obj!r:.60}), which "
                f"torch.load(weights_only=True) cannot read back, so the checkpoint could not be loaded; "
                f"store plain Python values or tensors instead (float(), int(), str(), torch.from_numpy())"
            )


def _loads_weights_only(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _not_weights_only(value: Any, where: str) -> Optional[tuple[str, Any]]:
    """``(where, object)`` of the innermost part of ``value`` weights-only loading refuses, or ``None``."""
    if _loads_weights_only(value):
        return None
    if isinstance(value, Mapping):
        children = [(f"{where}[{k!r}]", v) for k, v in value.items()] + [(f"a key of {where}", k) for k in value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        children = []
    for child_where, child in children:
        bad = _not_weights_only(child, child_where)
        if bad is not None:
            return bad
    return where, value
