"""``Wiring``: coupled growth and shrinking of hidden widths across ``GrowLinear`` layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import optim_state
from ._checks import check_int
from .layers import GrowLinear
from .policies import KEEP_CHOICES, Keep, check_generator, check_init, check_split_noise, grow_neurons_
from .policies import kept_indices, permutation

__all__ = ["Wiring", "KEEP_CHOICES"]


@dataclass(frozen=True)
class _Hidden:
    producer: GrowLinear
    consumers: tuple[GrowLinear, ...]

    def layers(self) -> tuple[GrowLinear, ...]:
        return (self.producer, *self.consumers)


def _check_optimizer(optimizer: object) -> Optional[torch.optim.Optimizer]:
    """``optimizer`` unless it is neither ``None`` nor a ``torch.optim.Optimizer``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        hint = ""
        if hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
            hint = " (this looks like a learning-rate scheduler: pass its .optimizer)"
        raise TypeError(
            f"Wiring needs a torch.optim.Optimizer (or None), got {type(optimizer).__name__}{hint}"
        )
    return optimizer


def _check_gradient(init: str, closure: object, init_options: Optional[dict]) -> None:
    """The closure and options of a gradient-guided init; options need such an init."""
    from .policies import GRADIENT_INITS

    if init in GRADIENT_INITS:
        from .gradient_growth import check_gradient_options

        check_gradient_options(init, closure, init_options)
    elif init_options:
        raise ValueError(f"init_options are for the gradient-guided inits {GRADIENT_INITS}, not init={init!r}")


class Wiring:
    """Which GrowLinear produces each hidden width and which GrowLinears consume it.

    A hidden width named ``name`` is the output of one ``producer`` (its rows) and the
    input of every ``consumer`` (their columns); one producer may feed several consumers
    (e.g. a VAE's last encoder layer feeds the mean and the log-variance heads).
    :meth:`grow` and :meth:`shrink` change the producer's rows, every consumer's columns,
    their gradients and, when :attr:`optimizer` is set, the optimizer's state for those
    slices, all together. Every argument is validated before anything changes, so a call
    that raises leaves the layers and the optimizer as they were.

    The wiring holds references to the layers, not copies: use it with any module (the
    layers may live anywhere in it, including inside ``DistributedDataParallel``).

    Args:
        optimizer: optimizer whose state follows the changes (settable later as
            ``wiring.optimizer``). State tensors shaped like their parameter are edited in
            place: new and removed slices get the optimizer's fresh values (zero, but
            Adagrad's initial accumulator and Rprop's initial step size), permutations are
            applied, everything else is left bit-identical (see ``optimizer_state`` for
            Adam's step count and a full restart). Optimizers whose
            state cannot be kept right (LBFGS, Adafactor, SparseAdam, state not shaped like
            its parameter) are refused here: see
            :func:`growdense.optim_state.check_attachable`.
        optimizer_state: the default optimizer-state policy of :meth:`grow` and
            :meth:`shrink`: ``"keep"``, ``"reset"`` or ``"keep_global_step"`` (see
            :mod:`growdense.optim_state`). ``None`` (default): ``"keep"`` where the
            optimizer can give new neurons exactly its fresh state, else
            ``"keep_global_step"`` with a warning; an explicit ``"keep"`` raises instead.
        broadcast_from: under ``torch.distributed``, the rank whose new weights every rank
            receives after each :meth:`grow` (a broadcast of the changed layers'
            parameters). ``None`` (default): no communication; give every rank a generator
            with the same seed instead.
        process_group: process group for that broadcast (default: the world).
    """

    def __init__(
        self,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        broadcast_from: Optional[int] = None,
        process_group: Optional[object] = None,
        optimizer_state: Optional[str] = None,
    ) -> None:
        self.optimizer = optimizer
        if broadcast_from is not None:
            broadcast_from = check_int("broadcast_from", broadcast_from)
            if broadcast_from < 0:
                raise ValueError(f"broadcast_from must be a rank >= 0 or None, got {broadcast_from}")
        self.optimizer_state = None if optimizer_state is None else optim_state.check_policy(optimizer_state)
        self.broadcast_from = broadcast_from
        self.process_group = process_group
        self._hidden: dict[str, _Hidden] = {}

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose state follows the changes (``None``: no optimizer)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        optimizer = _check_optimizer(optimizer)
        optim_state.check_attachable(optimizer)  # refuses what growdense cannot keep right
        self._optimizer = optimizer

    @classmethod
    def chain(
        cls,
        layers: Sequence[GrowLinear],
        names: Optional[Sequence[str]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        **kwargs,
    ) -> "Wiring":
        """The wiring of an MLP: hidden width ``i`` is ``layers[i]``'s output and ``layers[i+1]``'s input.

        ``names`` defaults to ``"h1"``, ``"h2"``, ... (``len(layers) - 1`` of them).
        """
        layers = list(layers)
        if names is None:
            names = [f"h{i + 1}" for i in range(len(layers) - 1)]
        if len(names) != len(layers) - 1:
            raise ValueError(f"{len(layers)} layers have {len(layers) - 1} hidden widths, got {len(names)} names")
        wiring = cls(optimizer, **kwargs)
        for i, name in enumerate(names):
            wiring.add(name, layers[i], [layers[i + 1]])
        return wiring

    def _policy(self, optimizer_state: Optional[str]) -> str:
        """The policy of a shrink (``None``: the wiring's, else ``"keep"``)."""
        chosen = optimizer_state if optimizer_state is not None else self.optimizer_state
        return optim_state.check_policy("keep" if chosen is None else chosen)

    def check_optimizer_state(
        self, optimizer_state: Optional[str] = None, names: Optional[Sequence[str]] = None, *, stacklevel: int = 2
    ) -> str:
        """Validate the optimizer-state policy of growing ``names`` (default: all); return the one to apply.

        ``None`` means the wiring's :attr:`optimizer_state`. An explicit ``"keep"`` raises
        unless the optimizer can give new neurons exactly its fresh state
        (:func:`growdense.optim_state.check_keep`); when neither names a policy, that case
        warns and gives ``"keep_global_step"``.
        """
        chosen = optimizer_state if optimizer_state is not None else self.optimizer_state
        policy = optim_state.check_policy("keep" if chosen is None else chosen)
        if policy != "keep":
            return policy
        layers = [layer for name in (self.names() if names is None else names) for layer in self._get(name).layers()]
        problem = optim_state.keep_problem(self.optimizer, [p for layer in layers for p in (layer.weight, layer.bias)])
        if problem is None:
            return policy
        if chosen is not None:
            raise ValueError(problem)
        warnings.warn(
            f"{problem}. Growing with optimizer_state='keep_global_step' instead; pass optimizer_state to "
            f"grow(), GrowthSchedule.apply() or Wiring() to choose (and silence this warning)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return "keep_global_step"

    # ---- registration ----------------------------------------------------------------
    def add(self, name: str, producer: GrowLinear, consumers: Sequence[GrowLinear]) -> None:
        """Register hidden width ``name``: ``producer``'s output feeds each of ``consumers``."""
        optim_state.check_attachable(self.optimizer)  # its state may have changed since it was set
        if not isinstance(name, str) or not name:
            raise TypeError(f"a hidden width's name must be a non-empty str, got {name!r}")
        if name in self._hidden:
            raise ValueError(f"hidden width {name!r} is already registered")
        if isinstance(consumers, GrowLinear):
            raise TypeError(f"{name!r}: consumers must be a sequence of GrowLinear; wrap a single one in a list")
        consumers = tuple(consumers)
        for layer in (producer, *consumers):
            if not isinstance(layer, GrowLinear):
                raise TypeError(f"{name!r}: producer and consumers must be GrowLinear, got {type(layer).__name__}")
        if not consumers:
            raise ValueError(f"{name!r}: a hidden width needs at least one consumer")
        if len({id(c) for c in consumers}) != len(consumers):
            raise ValueError(f"{name!r}: the same consumer is listed twice")
        if any(c is producer for c in consumers):
            raise ValueError(f"{name!r}: a layer cannot consume its own output")
        for other, hidden in self._hidden.items():
            if hidden.producer is producer:
                raise ValueError(f"{name!r}: this producer already produces hidden width {other!r}")
            if any(c is h for c in consumers for h in hidden.consumers):
                raise ValueError(f"{name!r}: a consumer already consumes hidden width {other!r}")
        for consumer in consumers:
            if consumer.in_features != producer.out_features:
                raise ValueError(
                    f"{name!r}: producer has out_features={producer.out_features} but a consumer has "
                    f"in_features={consumer.in_features}; they must match"
                )
        self._hidden[name] = _Hidden(producer, consumers)

    def names(self) -> list[str]:
        """The registered hidden widths, in registration order."""
        return list(self._hidden)

    def producer(self, name: str) -> GrowLinear:
        return self._get(name).producer

    def consumers(self, name: str) -> list[GrowLinear]:
        return list(self._get(name).consumers)

    def width(self, name: str) -> int:
        """The active width of hidden width ``name`` (its producer's ``out_features``)."""
        return self._get(name).producer.out_features

    def widths(self) -> dict[str, int]:
        """``{name: width}`` for every hidden width."""
        return {name: hidden.producer.out_features for name, hidden in self._hidden.items()}

    def capacity(self, name: str) -> int:
        """The largest width ``name`` can grow to: the smallest capacity among its coupled layers."""
        hidden = self._get(name)
        return min([hidden.producer.capacity_out] + [c.capacity_in for c in hidden.consumers])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={self.width(n)}/{self.capacity(n)}" for n in self._hidden)
        return f"Wiring({parts})"

    # ---- validation ----------------------------------------------------------------
    def _get(self, name: str) -> _Hidden:
        try:
            return self._hidden[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown hidden width {name!r}; registered: {self.names()}") from None

    def _check_synced(self, name: str) -> _Hidden:
        hidden = self._get(name)
        width = hidden.producer.out_features
        for consumer in hidden.consumers:
            if consumer.in_features != width:
                raise RuntimeError(
                    f"hidden width {name!r} is out of sync: producer out_features={width}, consumer "
                    f"in_features={consumer.in_features} (was a layer resized outside the Wiring?)"
                )
        return hidden

    def _check_resizable(self, name: str) -> _Hidden:
        """The hidden width, if its layers agree and none shares a Parameter with another layer."""
        hidden = self._check_synced(name)
        for layer in hidden.layers():
            layer._check_not_shared()
        return hidden

    def check_grow(
        self,
        name: str,
        n: int,
        init: str = "he",
        *,
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        closure: Optional[Callable[[], Tensor]] = None,
        init_options: Optional[dict] = None,
    ) -> None:
        """Raise (and change nothing) unless ``grow(name, n, ...)`` with these arguments is valid."""
        self._validate_grow(name, n, init, generator, split_noise, optimizer_state, stacklevel=4)
        _check_gradient(init, closure, init_options)

    def _validate_grow(
        self,
        name: str,
        n: int,
        init: str,
        generator: Optional[torch.Generator],
        split_noise: float,
        optimizer_state: Optional[str],
        *,
        stacklevel: int,
    ) -> tuple[int, str]:
        """``n`` as a Python int and the optimizer-state policy the growth would apply."""
        hidden = self._check_resizable(name)
        n = check_int("n", n)
        optim_state.check_policy("keep" if optimizer_state is None else optimizer_state)
        if n < 0:
            raise ValueError(f"cannot grow {name!r} by {n}: n must be >= 0 (use shrink() to narrow)")
        check_init(init)
        check_split_noise(split_noise)
        check_generator(generator)
        width = self.width(name)
        if width + n > self.capacity(name):
            limits = [f"producer capacity_out={hidden.producer.capacity_out}"]
            limits += [f"consumer {i} capacity_in={c.capacity_in}" for i, c in enumerate(hidden.consumers)]
            raise ValueError(
                f"cannot grow {name!r} from {width} to {width + n}: it exceeds the capacity "
                f"{self.capacity(name)} of its coupled layers ({', '.join(limits)})"
            )
        return n, self.check_optimizer_state(optimizer_state, [name] if n > 0 else [], stacklevel=stacklevel + 1)

    def check_shrink(self, name: str, to: int, keep: Keep = "first", optimizer_state: Optional[str] = None) -> None:
        """Raise (and change nothing) unless ``shrink(name, to, keep=keep, optimizer_state=...)`` is valid."""
        self._policy(optimizer_state)
        self._kept(name, to, keep)

    def _kept(self, name: str, to: int, keep: Keep) -> Optional[Tensor]:
        """Validate a shrink; return the kept indices in their new order (``None`` for the first ``to``)."""
        hidden = self._check_resizable(name)
        return kept_indices(name, hidden.producer, to, keep)

    # ---- changes ----------------------------------------------------------------------
    @torch.no_grad()
    def grow(
        self,
        name: str,
        n: int,
        *,
        init: str = "he",
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        closure: Optional[Callable[[], Tensor]] = None,
        init_options: Optional[dict] = None,
    ) -> None:
        """Add ``n`` neurons to hidden width ``name`` (appended after the active ones).

        ``init`` chooses the new weights (see :mod:`growdense.policies`):
        ``"he"`` (He-normal in and out, the study's), ``"zero_out"`` (He in, zero out:
        the function is unchanged), ``"split"`` (Net2Net: copy neurons, halve their
        outgoing weights, ``split_noise`` breaks the symmetry). The new slices' gradients
        are zero. ``optimizer_state`` (default: the wiring's, ``"keep"``) chooses what the
        optimizer's state becomes: ``"keep"`` (old neurons continue, new ones start from
        the optimizer's fresh state, Adam's step count included), ``"reset"`` (the whole
        optimizer restarts as newly built) or ``"keep_global_step"`` (new neurons get
        fresh element-wise state but their Parameter's step count); see
        :mod:`growdense.optim_state`.

        ``"gradmax"`` and ``"tiny"`` (gradient-guided, :mod:`growdense.gradient_growth`)
        need ``closure``: a function that computes and returns the loss (with its graph,
        without calling ``backward``) on data the caller chooses; the Parameters'
        ``.grad`` are left as they were. ``init_options`` tunes them (GradMax:
        ``scale``, ``bias``; TINY: ``line_search_steps``, ``eps``, ``project``).
        """
        n, policy = self._validate_grow(name, n, init, generator, split_noise, optimizer_state, stacklevel=3)
        _check_gradient(init, closure, init_options)
        if n == 0:
            return
        hidden = self._get(name)
        start, stop = self.width(name), self.width(name) + n
        grow_neurons_(hidden.producer, hidden.consumers, n, init, generator=generator, split_noise=split_noise,
                      closure=closure, init_options=init_options)
        self._zero_slices(hidden, start, stop, policy, born=True)
        self._broadcast(hidden)

    @torch.no_grad()
    def shrink(self, name: str, to: int, *, keep: Keep = "first", optimizer_state: Optional[str] = None) -> None:
        """Narrow hidden width ``name`` to ``to`` neurons.

        ``keep`` chooses which neurons stay:

        - ``"first"``: neurons ``0 .. to-1`` (the study's Approach 2);
        - ``"norm"``: the ``to`` neurons whose *incoming* weight row in the producer (over
          its active inputs, bias not included) has the largest Euclidean norm; ties go to
          the lower index. They keep their relative order;
        - a sequence (or 1-D tensor) of ``to`` distinct indices in ``[0, width)``: those
          neurons, in that order.

        The kept neurons are moved to the front by one permutation applied together to
        the producer's rows (weight, bias), every consumer's columns, their gradients and
        optimizer state; then the rest is zeroed (weights, gradients, optimizer state).
        The network's output over the kept neurons is unchanged by the permutation.
        ``optimizer_state`` (default: the wiring's): under ``"reset"`` the whole optimizer
        restarts as newly built; otherwise the kept neurons' state continues and the
        removed slices' state becomes the optimizer's fresh values.
        """
        policy = self._policy(optimizer_state)
        kept = self._kept(name, to, keep)
        to = check_int("to", to)
        hidden = self._get(name)
        width = self.width(name)
        perm = None if kept is None else permutation(kept, width)
        if perm is not None:
            self._permute(hidden, perm)
        hidden.producer.shrink_out(to)
        for consumer in hidden.consumers:
            consumer.shrink_in(to)
        self._zero_slices(hidden, to, width, policy, born=False)

    @torch.no_grad()
    def permute(self, name: str, perm: Union[Sequence[int], Tensor]) -> None:
        """Reorder the neurons of hidden width ``name``: new neuron ``i`` is old neuron ``perm[i]``.

        ``perm`` is a permutation of ``range(width)``. Producer rows, consumer columns,
        gradients and optimizer state move together; the network's function is unchanged.
        """
        if isinstance(perm, str):
            raise TypeError(f"permute() needs a sequence of indices, got the string {perm!r}")
        indices = self._kept(name, self.width(name), perm)
        self._permute(self._get(name), indices)

    # ---- internals -------------------------------------------------------------------
    def _permute(self, hidden: _Hidden, perm: Tensor) -> None:
        producer = hidden.producer
        for param in (producer.weight, producer.bias):
            if param is None:
                continue
            optim_state.permute_(param.data, 0, perm)
            if param.grad is not None:
                optim_state.permute_(param.grad, 0, perm)
            optim_state.permute_state_(self.optimizer, param, 0, perm)
        for consumer in hidden.consumers:
            param = consumer.weight
            optim_state.permute_(param.data, 1, perm)
            if param.grad is not None:
                optim_state.permute_(param.grad, 1, perm)
            optim_state.permute_state_(self.optimizer, param, 1, perm)

    def _zero_slices(self, hidden: _Hidden, start: int, stop: int, policy: str, born: bool) -> None:
        """Zero ``[start, stop)`` of the hidden width in gradients; apply ``policy`` to the optimizer state.

        ``born``: the slice was just added (else: just removed).
        """
        producer = hidden.producer
        slices = [(p, 0) for p in (producer.weight, producer.bias) if p is not None]
        slices += [(c.weight, 1) for c in hidden.consumers]
        for param, dim in slices:
            if param.grad is not None:
                param.grad.narrow(dim, start, stop - start).zero_()
            if policy != "reset":
                optim_state.fresh_state_(self.optimizer, param, dim, start, stop)
                optim_state.mark_born_(self.optimizer, param, dim, start, stop, policy if born else "keep_global_step")
        if policy == "reset":
            optim_state.reset_(self.optimizer)

    def _broadcast(self, hidden: _Hidden) -> None:
        if self.broadcast_from is None:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for layer in hidden.layers():
            for param in (layer.weight, layer.bias):
                if param is not None:
                    dist.broadcast(param.data, src=self.broadcast_from, group=self.process_group)
