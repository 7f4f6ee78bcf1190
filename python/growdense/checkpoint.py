"""Save and resume a growing model mid-schedule, atomically.

A checkpoint holds the model's ``state_dict`` (each :class:`~growdense.GrowLinear` saves its
active widths in its extra state, so a grown model restores its widths), the optimizer's
``state_dict``, the random number generator states that training consumes (the global CPU
generator, and any named :class:`torch.Generator` such as the one used for growth or for
shuffling) and a few user values (epoch, step, ...). Restoring all of that makes a resumed
run continue exactly as the uninterrupted one, bit for bit on the CPU.

Writes go to a temporary file in the target's folder, are flushed to disk, then renamed
over the target (:func:`os.replace` is atomic on POSIX and Windows): an interrupted save
leaves the previous checkpoint intact. Loading validates everything (format, parameter
names, shapes, i.e. capacities, optimizer groups) before changing anything.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from . import optim_state
from .wiring import Wiring

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

_FORMAT = "growdense-checkpoint"
_VERSION = 1
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    wiring: Optional[Wiring] = None,
    extra: Optional[Mapping[str, Any]] = None,
    save_global_rng: bool = True,
) -> None:
    """Write a checkpoint to ``path`` atomically (temporary file, fsync, rename).

    Args:
        path: destination file; its folder must exist.
        model: the model (pass ``ddp.module`` under ``DistributedDataParallel``).
        optimizer: its optimizer, if any.
        generators: named generators whose states to save (growth, data order, ...).
        wiring: if given, its widths are saved and checked on load.
        extra: user values (ints, floats, strings, tensors, and lists / dicts of them;
            loading uses ``torch.load(weights_only=True)``).
        save_global_rng: also save the global CPU RNG state (``torch.get_rng_state()``).
    """
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
        "global_rng": torch.get_rng_state() if save_global_rng else None,
        "widths": None if wiring is None else wiring.widths(),
        "extra": dict(extra or {}),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


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


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    wiring: Optional[Wiring] = None,
    restore_global_rng: bool = True,
    map_location: Optional[Union[str, torch.device]] = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; return its ``extra`` values.

    The model must have the checkpoint's capacities (every tensor's shape); its active
    widths are restored from the checkpoint. Everything is checked before anything is
    loaded: on a :class:`CheckpointError` the model, optimizer and generators are unchanged.

    Args:
        path: the checkpoint file.
        model, optimizer: restored in place (the optimizer is not rebuilt).
        generators: named generators to restore; each name must be in the checkpoint.
        wiring: if given, its widths after loading must equal the saved ones.
        restore_global_rng: also restore the global CPU RNG state, if saved.
        map_location: as for :func:`torch.load`.
    """
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{os.fspath(path)!r} is not a growdense checkpoint")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"unsupported growdense checkpoint version {payload.get('version')!r} (expected {_VERSION})")
    _check_model(payload["model"], model)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError("the checkpoint has no optimizer state, but an optimizer was given")
        _check_optimizer(payload["optimizer"], optimizer)
    generators = dict(generators or {})
    missing = sorted(set(generators) - set(payload["generators"]))
    if missing:
        raise CheckpointError(f"generators {missing} are not in the checkpoint (it has {sorted(payload['generators'])})")
    if wiring is not None and payload["widths"] is not None and set(payload["widths"]) != set(wiring.names()):
        raise CheckpointError(
            f"the checkpoint's hidden widths {sorted(payload['widths'])} differ from the wiring's {wiring.names()}"
        )

    model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    for name, generator in generators.items():
        generator.set_state(payload["generators"][name])
    if restore_global_rng and payload["global_rng"] is not None:
        torch.set_rng_state(payload["global_rng"])
    if wiring is not None and payload["widths"] is not None:
        for name in wiring.names():
            wiring.check_grow(name, 0)  # producer and consumers agree
        if wiring.widths() != payload["widths"]:
            raise CheckpointError(
                f"after loading, the wiring's widths {wiring.widths()} differ from the saved {payload['widths']}; "
                f"does the wiring refer to this model's layers?"
            )
    return payload["extra"]


def _check_model(saved: Mapping[str, Any], model: nn.Module) -> None:
    current = model.state_dict()
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"not in the model: {unexpected}")
    for key, value in current.items():
        other = saved.get(key)
        if isinstance(value, Tensor) and isinstance(other, Tensor) and value.shape != other.shape:
            problems.append(
                f"{key}: the checkpoint has shape {tuple(other.shape)}, the model {tuple(value.shape)}"
            )
    if problems:
        raise CheckpointError(
            "the checkpoint does not fit this model (GrowLinear tensors have their capacity shapes: build the "
            "model with the capacities it was saved with):\n  " + "\n  ".join(problems)
        )


def _check_optimizer(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    try:
        optim_state.check_optimizer_state_compatible(optimizer, saved)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(
        len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
    ):
        raise CheckpointError(
            f"the checkpoint's optimizer has parameter groups of sizes {[len(s['params']) for s in saved_groups]}, "
            f"this optimizer {[len(g['params']) for g in groups]}"
        )
    params = [p for g in groups for p in g["params"]]
    ids = [i for s in saved_groups for i in s["params"]]
    by_id = dict(zip(ids, params))
    for pid, state in saved.get("state", {}).items():
        param = by_id.get(pid)
        if param is None:
            raise CheckpointError(f"the checkpoint's optimizer state names parameter {pid}, which no group holds")
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"optimizer state {key!r} of parameter {pid} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(param.shape)}: the optimizer was saved for a model of another capacity"
                )
