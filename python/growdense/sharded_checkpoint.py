"""Save and resume a sharded (FSDP2) growing model with ``torch.distributed.checkpoint``.

:func:`save_sharded_checkpoint` writes the model's and the optimizer's state (through
``get_state_dict``: every rank writes its own shards, in parallel), the active widths
(each growable module's extra state, and the wiring's widths), each rank's generator
states and user values into a folder. :func:`load_sharded_checkpoint` restores them in
place (``set_state_dict``: the Parameters and the optimizer stay the same objects) into a
model sharded over any number of ranks, one process included: DCP reshards.

What is promised, and what is not:

- **A save is all or nothing.** Each save is written to a new sub-folder of ``path``
  and becomes the checkpoint only when the file ``path/LATEST`` is switched to it (a
  temporary file renamed over it, after every rank has finished writing); the previous
  save is then removed. An interrupted save leaves the previous checkpoint whole. This
  needs a file system every rank sees (as DCP's file writer does).
- **A load checks, then changes.** The checkpoint's format, widths, tensor names and
  shapes (capacities) and generator names are checked against the model before anything
  is read into it; a mismatch raises :class:`~growdense.checkpoint.CheckpointError` on
  every rank, nothing changed. The tensors are then read into copies, and only a
  complete read is copied into the model and the optimizer. An optimizer without state
  yet gets it initialised by ``get_state_dict`` (a step of zero learning rate); if the
  read then fails, that state is cleared again. Not promised: a failure *during* the
  final copy (``set_state_dict``; after the checks only an out-of-memory can cause it)
  may leave some tensors loaded; and a rank that dies in the middle leaves the others
  waiting in a collective, as any collective does.
- **Generators are per rank.** Each rank saves its own generators (a data order may
  differ between ranks); a rank that loads a checkpoint saved by fewer ranks gets rank
  0's. The growth generator must be the same on every rank anyway (the wiring checks it).
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ._checkpoint_checks import CheckpointError, _check_generators, _check_save_arguments, _check_type, _fsync_dir
from .sharded import initialized_dist
from .wiring import Wiring

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint"]

_FORMAT = "growdense-dcp-checkpoint"
_VERSION = 1
_LATEST = "LATEST"
_META = "growdense"


def _rank() -> int:
    dist = initialized_dist()
    return dist.get_rank() if dist is not None else 0


def _same_everywhere(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (one broadcast); ``value`` without a process group."""
    dist = initialized_dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _quiet(no_dist: bool):
    """Silence DCP's notice that it runs in one process when that is meant (no process group)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _states(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, Optional[dict]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def save_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    wiring: Optional[Wiring] = None,
    extra: Optional[Mapping[str, Any]] = None,
    save_global_rng: bool = True,
) -> None:
    """Write a checkpoint of a (``fully_shard``'ed, or plain) growing model to folder ``path``, all or nothing.

    Call it on every rank, with the same ``path`` (a folder every rank sees; created if
    missing). Arguments as :func:`growdense.checkpoint.save_checkpoint`; ``generators``
    and the global RNG are saved per rank.
    """
    import torch.distributed.checkpoint as dcp

    _check_save_arguments(model, optimizer, generators, wiring, extra)
    path = os.fspath(path)
    rank = _rank()
    model_state, optim_state = _states(model, optimizer)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "widths": None if wiring is None else wiring.widths(),
        "extra": dict(extra or {}),
        "world": 1 if initialized_dist() is None else initialized_dist().get_world_size(),
        "optimizer": optim_state is not None,
    }
    own = {name: g.get_state() for name, g in (generators or {}).items()}
    if save_global_rng:
        own["__global__"] = torch.get_rng_state()
    packed = io.BytesIO()  # one entry (DCP would flatten a dict into one entry per key)
    torch.save(meta, packed)
    state: dict[str, Any] = {"model": model_state, _META: packed, f"rng.rank{rank}": own}
    if optim_state is not None:
        state["optimizer"] = optim_state
    name = _same_everywhere(f"save-{uuid.uuid4().hex}")
    folder = os.path.join(path, name)
    if rank == 0:
        os.makedirs(folder, exist_ok=False)
    dist = initialized_dist()
    if dist is not None:
        dist.barrier()
    with _quiet(dist is None):
        dcp.save(state, checkpoint_id=folder, no_dist=dist is None)  # returns once every rank wrote and metadata is in
    if dist is not None:
        dist.barrier()
    if rank == 0:
        previous = _latest(path)
        tmp = os.path.join(path, f".{_LATEST}.{name}.tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, _LATEST))  # the switch: atomic
        _fsync_dir(path)
        if previous is not None and previous != name:
            shutil.rmtree(os.path.join(path, previous), ignore_errors=True)
    if dist is not None:
        dist.barrier()


def _latest(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, _LATEST)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def load_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    wiring: Optional[Wiring] = None,
    restore_global_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_sharded_checkpoint` in place; return its ``extra`` values.

    Call it on every rank of the new run (any number of ranks, or one process without a
    process group). The model must have the checkpoint's capacities; its widths, the
    optimizer's state (each neuron's birth step included) and the generators are
    restored. See the module's notes for what is checked before anything changes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _check_type("model", model, nn.Module)
    _check_type("optimizer", optimizer, torch.optim.Optimizer, optional=True)
    _check_type("wiring", wiring, Wiring, optional=True)
    generators = _check_generators(generators)
    path = os.fspath(path)
    name = _latest(path)
    if name is None:
        raise CheckpointError(f"{path!r} holds no growdense sharded checkpoint (no {_LATEST} file)")
    folder = os.path.join(path, name)
    no_dist = initialized_dist() is None
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
        if _META not in metadata.state_dict_metadata:
            raise CheckpointError(f"{folder!r} is not a growdense sharded checkpoint")
        box: dict[str, Any] = {_META: io.BytesIO()}
        with _quiet(no_dist):
            dcp.load(box, checkpoint_id=folder, no_dist=no_dist)
        box[_META].seek(0)
        meta = torch.load(box[_META], weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"cannot read the checkpoint in {folder!r}: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{folder!r} is not a growdense sharded checkpoint")
    if meta.get("version") != _VERSION:
        raise CheckpointError(f"{folder!r} has version {meta.get('version')!r}; this growdense reads {_VERSION}")
    if optimizer is not None and not meta["optimizer"]:
        raise CheckpointError(f"{folder!r} has no optimizer state, but an optimizer was given")
    saved = metadata.state_dict_metadata

    # What each rank reads: its own generator states (rank 0's if the checkpoint has none for it).
    rank = _rank()
    source = f"rng.rank{rank}" if any(k.startswith(f"rng.rank{rank}.") for k in saved) else "rng.rank0"
    rng_keys = {k[len(source) + 1:] for k in saved if k.startswith(source + ".")}
    missing = sorted(set(generators) - rng_keys)
    if missing:
        raise CheckpointError(f"generators {missing} are not in the checkpoint (it has {sorted(rng_keys - {'__global__'})})")

    # Check names and shapes (capacities) before anything is read into the model.
    had_state = optimizer is not None and bool(optimizer.state)
    grads_before = None if optimizer is None else {id(p): p.grad for g in optimizer.param_groups for p in g["params"]}
    try:
        model_state, optim_state = _states(model, optimizer)
        state: dict[str, Any] = {"model": model_state}
        if optim_state is not None:
            state["optimizer"] = optim_state
        problems = []
        flat = _flatten(state)
        for key, value in flat.items():
            if isinstance(value, Tensor):
                entry = saved.get(key)
                if entry is None:
                    problems.append(f"{key} is not in the checkpoint")
                elif not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(value.shape):
                    size = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "an object"
                    problems.append(f"{key}: the checkpoint has {size}, this model {tuple(value.shape)}")
        model_keys = {k for k in saved if k.startswith("model.")}
        extra_keys = sorted(model_keys - {k for k in flat if k.startswith("model.")})
        if extra_keys:
            problems.append(f"the checkpoint has model entries this model lacks: {extra_keys[:5]}")
        if problems:
            raise CheckpointError(
                "the sharded checkpoint does not fit this model (construct it with the checkpoint's capacities): "
                + "; ".join(problems[:8])
            )
        # Entries the fresh state lacks (the optimizer's per-neuron birth steps) are read too.
        for key in saved:
            if key.startswith("optimizer.state.") and key not in flat and optim_state is not None:
                _insert(state, key, None)
        for key in rng_keys:
            state.setdefault(source, {})[key] = torch.empty(saved[f"{source}.{key}"].size, dtype=torch.uint8)
        copies = _clone_tensors(state)  # read into copies: the model changes only after a complete read
        try:
            with _quiet(no_dist):
                dcp.load(copies, checkpoint_id=folder, no_dist=no_dist)
        except Exception as error:
            raise CheckpointError(f"cannot read the checkpoint in {folder!r}: {error}") from error
    except BaseException:
        if optimizer is not None and not had_state:  # get_state_dict initialised it: undo
            optimizer.state.clear()
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = grads_before[id(p)]  # type: ignore[index]
        raise
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=copies["model"],
        optim_state_dict=copies.get("optimizer", {}),
    )
    own = copies.get(source, {})
    for gname, generator in generators.items():
        generator.set_state(own[gname])
    if restore_global_rng and "__global__" in own:
        torch.set_rng_state(own["__global__"])
    if wiring is not None and meta["widths"] is not None and wiring.widths() != meta["widths"]:
        raise CheckpointError(f"after loading, the wiring's widths are {wiring.widths()}, the checkpoint's {meta['widths']}")
    return meta["extra"]


def _flatten(state: Mapping, prefix: str = "") -> dict[str, Any]:
    """DCP's dotted keys of a nested state (dicts and lists of dicts are traversed)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _insert(state: dict, key: str, value: Any) -> None:
    """Set ``state`` at dotted ``key`` (``optimizer.state.<fqn>.<name>``), matching the fqn among existing keys."""
    head = "optimizer.state."
    rest = key[len(head):]
    table = state["optimizer"]["state"]
    for fqn in table:
        if rest.startswith(fqn + ".") and "." not in rest[len(fqn) + 1:]:
            table[fqn][rest[len(fqn) + 1:]] = value
            return


def _clone_tensors(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_tensors(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_tensors(v) for v in state]
    return state
