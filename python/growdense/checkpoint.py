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
import pickle
import tempfile
import time
from typing import Any, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporaries are recognised by age alone
    fcntl = None

import torch
from torch import Tensor, nn

from . import optim_state
from . import protocol
from ._checkpoint_checks import (
    CheckpointError, _check_generators, _check_save_arguments, _check_type, _fsync_dir,
)
from .layers import GrowLinear
from .sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .wiring import Wiring

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "save_sharded_checkpoint", "load_sharded_checkpoint"]

CheckpointError.__module__ = __name__  # public here (defined beside the checks both formats share)

# A save killed mid-write leaves its temporary file; the next save of the same path removes it
# when no writer holds it (each writer locks its own) and it was last written this long ago.
_STALE_AFTER_S = 30.0
_STALE_AFTER_S_UNLOCKED = 24 * 3600.0  # where files cannot be locked
_FORMAT = "growdense-checkpoint"
_VERSION = 1
PathLike = Union[str, os.PathLike]


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
        extra: user values: anything ``torch.load(weights_only=True)`` reads back (ints,
            floats, strings, ``None``, tensors, and lists / tuples / dicts of them; not
            NumPy scalars or arrays, nor ``pathlib`` paths: convert them with ``float()``,
            ``int()``, ``torch.from_numpy()`` or ``str()``). Checked before anything is
            written: on an error the previous file at ``path`` is left as it was.
        save_global_rng: also save the global CPU RNG state (``torch.get_rng_state()``).
    """
    _check_save_arguments(model, optimizer, generators, wiring, extra)
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
    prefix = "." + os.path.basename(path) + "."
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # this writer is alive: another save leaves the file alone
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


def _remove_stale_temporaries(folder: str, prefix: str) -> None:
    """Remove the temporary files that killed saves of this checkpoint left in ``folder``: those
    no live writer holds (the lock died with its process) and not written to for a while."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        tmp = os.path.join(folder, name)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            age = time.time() - os.fstat(fd).st_mtime
            if fcntl is None:
                stale = age > _STALE_AFTER_S_UNLOCKED
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    stale = age > _STALE_AFTER_S
                except OSError:  # a save in progress holds it
                    stale = False
            if stale:
                os.unlink(tmp)
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
    loaded (the file, the model's keys, shapes and widths, the optimizer's groups and
    state, the generators' states, the wiring's widths after loading): on a
    :class:`CheckpointError` the model, the optimizer, the generators and the global RNG
    are unchanged. A file that is truncated, corrupted or not a growdense checkpoint gives
    a :class:`CheckpointError` naming it.

    Args:
        path: the checkpoint file.
        model, optimizer: restored in place (the optimizer is not rebuilt).
        generators: named generators to restore; each name must be in the checkpoint.
        wiring: if given, its widths after loading must equal the saved ones.
        restore_global_rng: also restore the global CPU RNG state, if saved.
        map_location: as for :func:`torch.load`.
    """
    _check_type("model", model, nn.Module)
    _check_type("optimizer", optimizer, torch.optim.Optimizer, optional=True)
    _check_type("wiring", wiring, Wiring, optional=True)
    generators = _check_generators(generators)
    path = os.fspath(path)
    payload = _read(path, map_location)

    _check_model(payload["model"], model)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"{path!r} has no optimizer state, but an optimizer was given")
        _check_optimizer(payload["optimizer"], optimizer)
    missing = sorted(set(generators) - set(payload["generators"]))
    if missing:
        raise CheckpointError(f"generators {missing} are not in the checkpoint (it has {sorted(payload['generators'])})")
    for name, generator in generators.items():
        _check_rng_state(f"generator {name!r}", payload["generators"][name], generator.get_state())
    if restore_global_rng and payload["global_rng"] is not None:
        _check_rng_state("the global RNG", payload["global_rng"], torch.get_rng_state())
    if wiring is not None:
        _check_wiring(payload, model, wiring)

    model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    for name, generator in generators.items():
        generator.set_state(payload["generators"][name])
    if restore_global_rng and payload["global_rng"] is not None:
        torch.set_rng_state(payload["global_rng"])
    return payload["extra"]


# ---- checks ------------------------------------------------------------------------------
_PAYLOAD_KEYS = ("format", "version", "model", "optimizer", "generators", "global_rng", "widths", "extra")


def _read(path: str, map_location) -> dict[str, Any]:
    """The checkpoint's payload, checked for form; ``CheckpointError`` naming ``path`` otherwise."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (Exception, pickle.UnpicklingError) as error:  # truncated, corrupted, foreign
        raise CheckpointError(
            f"{path!r} is not a readable growdense checkpoint: it is truncated, corrupted or was not written by "
            f"growdense.save_checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path!r} is not a growdense checkpoint (no growdense format marker)")
    if payload.get("version") != _VERSION:
        raise CheckpointError(
            f"{path!r}: unsupported growdense checkpoint version {payload.get('version')!r} (expected {_VERSION})"
        )
    missing = [key for key in _PAYLOAD_KEYS if key not in payload]
    kinds = {"model": dict, "generators": dict, "extra": dict}
    wrong = [key for key, kind in kinds.items() if key in payload and not isinstance(payload[key], kind)]
    wrong += [key for key in ("optimizer", "widths") if payload.get(key) is not None and not isinstance(payload[key], dict)]
    if payload.get("global_rng") is not None and not isinstance(payload["global_rng"], Tensor):
        wrong.append("global_rng")
    if missing or wrong:
        raise CheckpointError(
            f"{path!r} is not a readable growdense checkpoint: "
            + "; ".join(([f"missing {missing}"] if missing else []) + ([f"malformed {wrong}"] if wrong else []))
        )
    return payload


def _check_rng_state(what: str, saved: Any, current: Tensor) -> None:
    if not isinstance(saved, Tensor) or saved.dtype != current.dtype or saved.shape != current.shape:
        got = f"{saved.dtype} of shape {tuple(saved.shape)}" if isinstance(saved, Tensor) else type(saved).__name__
        raise CheckpointError(
            f"the checkpoint's state for {what} ({got}) does not fit it ({current.dtype} of shape "
            f"{tuple(current.shape)}): was it saved from a generator of another kind or device?"
        )


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
        if isinstance(value, Tensor) and key in saved and not isinstance(other, Tensor):
            problems.append(f"{key}: the checkpoint has a {type(other).__name__}, the model a tensor")
        elif isinstance(value, Tensor) and isinstance(other, Tensor) and value.shape != other.shape:
            problems.append(
                f"{key}: the checkpoint has shape {tuple(other.shape)}, the model {tuple(value.shape)}"
            )
    for name, module in model.named_modules():
        key = (name + "." if name else "") + "_extra_state"
        check_widths = getattr(module, "_widths_from_extra_state", None)
        if protocol.is_growable(module) and check_widths is not None and key in saved:
            try:
                check_widths(saved[key])
            except ValueError as error:
                problems.append(f"{key}: {error}")
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
    saved_groups = saved.get("param_groups")
    state = saved.get("state")
    if (
        not isinstance(saved_groups, list)
        or not isinstance(state, dict)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups)
    ):
        raise CheckpointError("the checkpoint's optimizer state is malformed (no param_groups list or state dict)")
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
    for pid, param_state in state.items():
        param = by_id.get(pid)
        if param is None:
            raise CheckpointError(f"the checkpoint's optimizer state names parameter {pid}, which no group holds")
        if not isinstance(param_state, dict):
            raise CheckpointError(f"the checkpoint's optimizer state of parameter {pid} is not a dict")
        for key, value in param_state.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"optimizer state {key!r} of parameter {pid} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(param.shape)}: the optimizer was saved for a model of another capacity"
                )


def _check_wiring(payload: Mapping[str, Any], model: nn.Module, wiring: Wiring) -> None:
    """The wiring's widths after loading, worked out from the saved state, must be the saved ones."""
    saved_widths = payload["widths"]
    if saved_widths is not None and set(saved_widths) != set(wiring.names()):
        raise CheckpointError(
            f"the checkpoint's hidden widths {sorted(saved_widths)} differ from the wiring's {wiring.names()}"
        )
    names = {id(module): name for name, module in model.named_modules()}
    saved = payload["model"]

    def loaded_width(layer: nn.Module, width: str) -> int:
        """The active count of ``layer``'s module-local ``width`` in the saved state."""
        if id(layer) not in names:
            raise CheckpointError(
                f"the wiring refers to a {type(layer).__name__} that is not part of this model; build the wiring "
                f"from the model's own layers"
            )
        key = (names[id(layer)] + "." if names[id(layer)] else "") + "_extra_state"
        widths = layer._widths_from_extra_state(saved[key])  # checked by _check_model
        if isinstance(layer, GrowLinear):
            return widths[0] if width == "in" else widths[1]
        return widths[layer._own_width(width)]

    for name in wiring.names():
        members = wiring.members(name)
        first, first_width, _ = members[0]
        width = loaded_width(first, first_width)
        for module, local, role in members[1:]:
            if loaded_width(module, local) != width:
                raise CheckpointError(
                    f"in the checkpoint, hidden width {name!r} has {type(first).__name__}.{first_width}={width} but "
                    f"{type(module).__name__}.{local}={loaded_width(module, local)}: the wiring does not match the "
                    f"saved model"
                )
        if saved_widths is not None and width != saved_widths[name]:
            raise CheckpointError(
                f"after loading, the wiring's width {name!r} would be {width}, not the saved {saved_widths[name]}; "
                f"does the wiring refer to this model's layers?"
            )
