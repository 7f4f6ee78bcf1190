"""PyTorch Lightning integration: grow a model during ``Trainer.fit`` (``growdense[lightning]``).

:class:`GrowthCallback` applies a :class:`~growdense.GrowthSchedule` (or a function of
yours) at the start of each training epoch, through the model's
:class:`~growdense.Wiring` and the trainer's own optimizer. Nothing is rebuilt: the
Parameters stay the same objects, so the optimizer, the trainer, any learning-rate
scheduler and ``DistributedDataParallel`` keep working; the optimizer's state for the
changed slices follows the growth (see :class:`~growdense.Wiring`).

This module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``);
``import growdense`` never does.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import optim_state, sharded
from .policies import KEEP_CHOICES, check_generator, check_init, check_split_noise
from .gradient_growth import takes_closure
from .schedule import GrowthSchedule
from .triggers import GradientTrigger
from .wiring import Wiring

try:
    import lightning.pytorch as pl
except ImportError:  # the older standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError(
            "growdense.lightning needs PyTorch Lightning: pip install 'growdense[lightning]' (or pip install lightning)"
        ) from error

__all__ = ["GrowthCallback"]

GrowthFunction = Callable[["pl.Trainer", "pl.LightningModule", int], None]
Keep = Union[str, Sequence[int], Tensor, Mapping[str, Union[str, Sequence[int], Tensor]]]


def _check_strategy(strategy: object) -> None:
    """Refuse a Lightning strategy whose Parameters growth cannot follow (FSDP1, DeepSpeed), naming the fix."""
    name = type(strategy).__name__
    flat = tuple(c for c in (getattr(pl.strategies, n, None) for n in ("FSDPStrategy", "DeepSpeedStrategy")) if c)
    if not isinstance(strategy, flat):
        return
    if "DeepSpeed" in name:
        what = "DeepSpeed partitions the Parameters into flat buffers"
    else:
        what = "strategy='fsdp' is FSDP1 (FullyShardedDataParallel), whose flat parameters growth cannot follow"
    raise RuntimeError(
        f"GrowthCallback does not support the {name} strategy: {what}. Use strategy='ddp', or FSDP2: "
        f"strategy=ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1) with a "
        f"configure_model() that calls torch.distributed.fsdp.fully_shard on the growable layers and the model"
    )


class GrowthCallback(pl.Callback):
    """Grow (or shrink) hidden widths at the start of training epochs, inside ``Trainer.fit``.

    Args:
        schedule: a :class:`~growdense.GrowthSchedule` (its widths are the wiring's names;
            the model must hold the schedule's widths for epoch 0, or those of the epoch a
            checkpoint resumes at), or a function ``fn(trainer, pl_module, epoch)`` called
            at the start of every epoch that changes the widths itself (e.g. with
            ``wiring.grow``).
        wiring: the model's :class:`~growdense.Wiring` (what :func:`growdense.growable`
            returns); default: the LightningModule's ``wiring`` attribute.
            A :class:`~growdense.triggers.GradientTrigger` is also accepted: it is checked at
            the start of every epoch with ``closure`` and the last epoch's ``monitor`` value.
        closure: for the gradient-guided inits (``"gradmax"``, ``"tiny"``) and triggers: a
            function ``fn(trainer, pl_module)`` returning the closure of a growth (a function
            that computes and returns the loss, without calling ``backward``).
        monitor: the logged metric a ``"plateau"`` trigger tracks (default ``"train_loss"``).
        **init_options: further options of the init strategy, as :meth:`growdense.Wiring.grow`
            takes them (e.g. ``GrowthCallback(schedule, init="gradmax", closure=fn, bias=0.1)``).
        init, keep, generator, split_noise, optimizer_state: passed to
            :meth:`GrowthSchedule.apply`, and checked here. ``optimizer_state`` (default: the
            wiring's) is what growth does to the optimizer's state (see
            :mod:`growdense.optim_state`).

    At the start of training the callback sets ``wiring.optimizer`` to the trainer's
    optimizer that holds the wiring's layers, so growth keeps that optimizer's state
    consistent; build the optimizer in ``configure_optimizers`` from the model's
    parameters *after* :func:`growdense.growable`. Under distributed training with no
    ``generator`` given, ``wiring.broadcast_from`` defaults to rank 0 so that every rank
    gets the same new weights.

    A checkpoint written by Lightning carries the grown widths (in the layers' extra
    state), so ``Trainer.fit(ckpt_path=...)`` resumes with them; an event already applied
    before a mid-epoch checkpoint is not applied twice. The ``generator``'s state is saved
    with the callback's state and restored on resume, so a resumed run draws what an
    uninterrupted one would. Under FSDP2, Lightning's checkpoint loader reads only the
    optimizer-state entries a fresh optimizer has; the callback carries the others
    (:mod:`growdense.optim`'s per-neuron step counts) in the checkpoint and puts them back.

    Strategies: one device, ``"ddp"`` (every rank grows at the same epoch, with the same
    new weights), and FSDP2 through ``ModelParallelStrategy`` (``configure_model`` calls
    ``fully_shard``; each rank writes the rows it holds; pass a ``generator`` seeded the
    same on every rank for the values of a single-process growth). FSDP1
    (``strategy="fsdp"``, ``FSDPStrategy``) and DeepSpeed flatten the Parameters, which
    growth cannot follow: they are refused before training starts.
    """

    def __init__(
        self,
        schedule: Union[GrowthSchedule, GrowthFunction],
        wiring: Optional[Wiring] = None,
        *,
        init: str = "he",
        keep: Keep = "first",
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        closure: Optional[Callable[["pl.Trainer", "pl.LightningModule"], Callable[[], Tensor]]] = None,
        monitor: str = "train_loss",
        **init_options: Any,
    ) -> None:
        super().__init__()
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be a function (trainer, pl_module) -> closure, got {type(closure).__name__}")
        if isinstance(schedule, GradientTrigger):
            pass
        elif not isinstance(schedule, GrowthSchedule) and not callable(schedule):
            raise TypeError(
                f"schedule must be a GrowthSchedule or a function (trainer, pl_module, epoch) -> None, "
                f"got {type(schedule).__name__}"
            )
        if wiring is not None and not isinstance(wiring, Wiring):
            raise TypeError(f"wiring must be a growdense.Wiring, got {type(wiring).__name__}")
        # Checked now, not at the first growth epoch, hours into training.
        check_init(init)
        for policy in keep.values() if isinstance(keep, Mapping) else (keep,):
            if isinstance(policy, str) and policy not in KEEP_CHOICES:
                raise ValueError(f"unknown keep {policy!r}; expected one of {KEEP_CHOICES} or a sequence of indices")
        if isinstance(schedule, GrowthSchedule) and isinstance(keep, Mapping) and not set(keep) <= set(schedule.names()):
            raise ValueError(
                f"keep names {sorted(set(keep) - set(schedule.names()))} are not in the schedule {schedule.names()}"
            )
        check_split_noise(split_noise)
        check_generator(generator)
        if optimizer_state is not None:
            optim_state.check_policy(optimizer_state)
        self.schedule = schedule
        self.wiring = wiring
        self.init = init
        self.keep = keep
        self.generator = generator
        self.split_noise = split_noise
        self.optimizer_state = optimizer_state
        self.closure = closure
        self.init_options = dict(init_options)
        self.monitor = monitor

    def _closure(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        return None if self.closure is None else self.closure(trainer, pl_module)

    # ---- finding the wiring and the optimizer ---------------------------------------------
    def _wiring(self, pl_module: "pl.LightningModule") -> Optional[Wiring]:
        if self.wiring is not None:
            return self.wiring
        wiring = getattr(pl_module, "wiring", None)
        if isinstance(wiring, Wiring):
            return wiring
        if isinstance(self.schedule, (GrowthSchedule, GradientTrigger)):
            raise RuntimeError(
                f"GrowthCallback found no Wiring: pass GrowthCallback(schedule, wiring) (the Wiring that "
                f"growdense.growable() returned) or give {type(pl_module).__name__} a `wiring` attribute"
            )
        return None  # a user function that changes widths its own way

    @staticmethod
    def _optimizer_of(trainer: "pl.Trainer", wiring: Wiring) -> torch.optim.Optimizer:
        """The trainer's optimizer that holds every Parameter of the wiring's layers."""
        params = {}
        for name in wiring.names():
            for layer in (wiring.producer(name), *wiring.consumers(name)):
                for param in (layer.weight, layer.bias):
                    if param is not None and param.requires_grad:
                        params[id(param)] = name
        holders = []
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]} & set(params)
            if held:
                holders.append((optimizer, held))
        if len(holders) == 1 and holders[0][1] == set(params):
            return holders[0][0]
        if not holders:
            raise RuntimeError(
                "none of the trainer's optimizers holds the growable layers' parameters: build the optimizer "
                "in configure_optimizers from the model's parameters after growdense.growable() (which replaces "
                "the converted nn.Linear layers and their Parameters)"
            )
        missing = sorted({params[i] for i in set(params) - set().union(*(held for _, held in holders))})
        detail = f"the parameters of hidden widths {missing} are in none of them" if missing else "they are split"
        raise RuntimeError(
            f"the growable layers' parameters must all be in one of the trainer's optimizers; {detail}"
        )

    def _bind(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[Wiring]:
        wiring = self._wiring(pl_module)
        if wiring is not None and wiring.names():
            wiring.optimizer = self._optimizer_of(trainer, wiring)
            if trainer.world_size > 1 and wiring.broadcast_from is None and self.generator is None:
                wiring.broadcast_from = 0
        return wiring

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Runs before the strategy wraps the model: nothing has changed yet.
        _check_strategy(trainer.strategy)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])

    # Under FSDP2 (ModelParallelStrategy) Lightning reads the optimizer's state into the keys a
    # fresh optimizer has: entries that appear only as neurons are born (growdense.optim's
    # per-neuron ``birth_steps``) would be dropped. They are small and the same on every rank:
    # carried in the checkpoint's metadata, put back at the start of training.
    _EXTRA = "growdense_optimizer_extra"

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        optimizer = getattr(self._wiring(pl_module), "optimizer", None)
        if optimizer is None:
            return
        extra = {}
        for name, param in pl_module.named_parameters():
            if sharded.is_sharded(param) and param in optimizer.state:
                plain = {k: v for k, v in optimizer.state[param].items() if not isinstance(v, Tensor)}
                if plain:
                    extra[name] = plain
        if extra:
            checkpoint[self._EXTRA] = extra

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        self._loaded_extra = checkpoint.get(self._EXTRA)

    def _restore_extra(self, wiring: Optional[Wiring], pl_module: "pl.LightningModule") -> None:
        extra, self._loaded_extra = getattr(self, "_loaded_extra", None), None
        if not extra or wiring is None or wiring.optimizer is None:
            return
        params = dict(pl_module.named_parameters())
        for name, values in extra.items():
            if name in params:
                wiring.optimizer.state[params[name]].update(values)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Fail before the first step, not at the first growth.
        wiring = self._bind(trainer, pl_module)
        self._restore_extra(wiring, pl_module)
        if isinstance(self.schedule, GradientTrigger):
            unknown = [name for name in self.schedule.names() if name not in wiring.names()]
            if unknown:
                raise ValueError(f"the trigger's hidden widths {unknown} are not in the model's Wiring {wiring.widths()}")
            return
        if not isinstance(self.schedule, GrowthSchedule):
            return
        names = self.schedule.names()
        unknown = [name for name in names if name not in wiring.names()]
        if unknown:
            raise ValueError(
                f"the schedule's hidden widths {unknown} are not in the model's Wiring, whose widths are "
                f"{wiring.widths()} (growdense.growable() names them after their producer module)"
            )
        epoch = trainer.current_epoch
        current = {name: wiring.width(name) for name in names}
        expected = self.schedule.widths_at(epoch - 1) if epoch > 0 else self.schedule.initial_widths()
        if current not in (expected, self.schedule.widths_at(epoch)):
            raise ValueError(
                f"the model's widths {current} are not the schedule's {expected} at the start of epoch {epoch}; "
                f"build the model at the schedule's initial widths (or resume from a checkpoint)"
            )

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        wiring = self._bind(trainer, pl_module)
        epoch = trainer.current_epoch
        if isinstance(self.schedule, GradientTrigger):
            metric = trainer.callback_metrics.get(self.monitor)
            self.schedule.apply(epoch, wiring, closure=self._closure(trainer, pl_module),
                                loss=None if metric is None else float(metric), generator=self.generator)
            return
        if not isinstance(self.schedule, GrowthSchedule):
            self.schedule(trainer, pl_module, epoch)
            return
        schedule = self.schedule
        if schedule.event_at(epoch) is None:
            return
        current = {name: wiring.width(name) for name in schedule.names()}
        before = schedule.widths_at(epoch - 1) if epoch > 0 else schedule.initial_widths()
        if current == schedule.widths_at(epoch) != before:
            return  # applied before a mid-epoch checkpoint this run resumed from
        schedule.apply(
            epoch,
            wiring,
            init=self.init,
            keep=self.keep,
            generator=self.generator,
            split_noise=self.split_noise,
            optimizer_state=self._policy(wiring, [name for name, n in schedule.event_at(epoch).grow_by.items() if n]),
            **self._init_options(trainer, pl_module),
        )

    def _policy(self, wiring: Wiring, growing: Sequence[str]) -> Optional[str]:
        """The optimizer-state policy of a growth; when none was chosen and the wiring falls back
        from ``"keep"``, a short warning naming what to change here (the callback's arguments)."""
        if self.optimizer_state is not None or wiring.optimizer_state is not None:
            return self.optimizer_state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = wiring.check_optimizer_state(None, growing)
        if any(issubclass(w.category, UserWarning) for w in caught):
            name = type(wiring.optimizer).__name__
            from . import optim

            hint = (f", or return growdense.optim.{name} from configure_optimizers (same arguments) to give "
                    f"each new neuron its own step count" if hasattr(optim, name) else "")
            warnings.warn(
                f"GrowthCallback: the new neurons share {name}'s step count ({policy!r}); choose with "
                f"GrowthCallback(..., optimizer_state={policy!r} or 'reset'){hint}",
                UserWarning,
                stacklevel=2,
            )
        return policy

    def _init_options(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict:
        options = dict(self.init_options)
        if takes_closure(self.init):
            options["closure"] = self._closure(trainer, pl_module)
        return options
