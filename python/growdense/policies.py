"""Growth and shrink policies: how new neurons start, and which neurons a shrink keeps.

A hidden width is produced by one :class:`~growdense.GrowLinear` (its output rows) and
consumed by one or more (their input columns). :class:`~growdense.Wiring` validates a
call, then asks this module what to write (growth) or which neurons to keep (shrink).

Growth policies (``init``)
--------------------------

Growing a hidden width by ``n`` adds ``n`` rows to the
producer (*incoming* weights and bias) and ``n`` columns to every consumer (*outgoing*
weights). The strategies differ in what they write there:

``"he"``
    He-normal incoming *and* outgoing weights, zero bias, as in the study this project
    starts from (which saw a loss spike at each growth). Incoming std
    ``sqrt(2 / producer.in_features)``, outgoing std ``sqrt(2 / consumer.in_features)``
    (the consumer's new width). He et al., "Delving Deep into Rectifiers", ICCV 2015.
    Preserves nothing: the new neurons immediately change the output.

``"zero_out"``
    He-normal incoming weights, zero bias, *zero* outgoing weights. The network's function
    is exactly unchanged at the moment of growth (the new neurons are multiplied by zero),
    while the gradient of the outgoing weights is non-zero (the new neurons are active), so
    they start learning at the next step. Function-preserving growth in the sense of
    Net2Net (Chen et al., 2016); zero outgoing weights with random incoming ones is the
    "Random" baseline of GradMax (Evci et al., "GradMax: Growing Neural Networks using
    Gradient Information", ICLR 2022).

``"split"``
    Net2WiderNet (Chen, Goodfellow, Shlens, "Net2Net: Accelerating Learning via Knowledge
    Transfer", ICLR 2016): each new neuron copies the incoming weights and bias of a
    source neuron drawn without replacement from the active ones (with replacement in
    rounds when ``n`` exceeds the width); the source's outgoing weights ``w`` are split
    into ``w/2 + e`` (source) and ``w/2 - e`` (copy), with ``e`` small Gaussian noise
    (std ``split_noise`` times the std of the consumer's active weights) that breaks the
    symmetry between the two. Since source and copy compute the same activation, the
    function is preserved up to float rounding (the sum ``(w/2 + e) + (w/2 - e)``).

``"gradmax"``, ``"tiny"``
    Gradient-guided: GradMax (Evci et al., "GradMax: Growing Neural Networks using
    Gradient Information", ICLR 2022) and TINY (Verbockhaven et al., "Growing Tiny
    Networks: Spotting Expressivity Bottlenecks and Fixing Them Optimally", TMLR 2024).
    They need ``closure=``, a function that computes and returns the loss on data the
    caller chooses; see :mod:`growdense.gradient_growth` and
    ``docs/gradient-guided-growth.md``. GradMax's new incoming weights are zero: with a
    fused ReLU and bias 0 the new neurons sit at ReLU's kink, where the derivative is 0,
    so they never learn; ``init_options={"bias": b}`` with ``b > 0`` keeps them active
    (the consumers' biases compensate, the function is unchanged).

Keep policies (``keep``)
------------------------

``"first"``
    Neurons ``0 .. to-1`` stay (the study's Approach 2).

``"norm"``
    The ``to`` neurons whose *incoming* weight row in the producer (over its active
    inputs, bias not included) has the largest Euclidean norm; ties go to the lower index.
    They keep their relative order.

a sequence (or 1-D integer tensor) of ``to`` distinct indices in ``[0, width)``
    Those neurons, in that order.

The kept neurons are moved to the front by one permutation (:func:`permutation`), which
the wiring applies to the producer's rows, the consumers' columns, their gradients and
optimizer state together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_int, check_nonnegative_real
from .layers import GrowLinear

__all__ = ["GROW_INITS", "KEEP_CHOICES", "Keep", "check_init", "check_split_noise", "grow_neurons_", "kept_indices", "permutation"]

GROW_INITS = ("he", "zero_out", "split", "gradmax", "tiny")
GRADIENT_INITS = ("gradmax", "tiny")
KEEP_CHOICES = ("first", "norm")
Keep = Union[str, Sequence[int], Tensor]


# ---- growth ------------------------------------------------------------------------
def check_init(init: str) -> None:
    """Raise ``ValueError`` unless ``init`` is one of :data:`GROW_INITS`."""
    if not isinstance(init, str) or init not in GROW_INITS:
        raise ValueError(f"unknown init {init!r} for new neurons; expected one of {GROW_INITS}")


def check_split_noise(split_noise: float) -> float:
    """``split_noise`` as a float; raises unless it is a finite real number >= 0."""
    return check_nonnegative_real("split_noise", split_noise)


def check_generator(generator: Optional[torch.Generator]) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@torch.no_grad()
def grow_neurons_(
    producer: GrowLinear,
    consumers: Sequence[GrowLinear],
    n: int,
    init: str = "he",
    *,
    generator: Optional[torch.Generator] = None,
    split_noise: float = 1e-2,
    closure=None,
    init_options: Optional[dict] = None,
) -> None:
    """Grow the hidden width between ``producer`` and ``consumers`` by ``n`` in place.

    The caller validates widths and capacities first (see :class:`~growdense.Wiring`);
    this checks its own arguments, then writes weights. Random draws come from
    ``generator`` (or the global RNG), producer first, then consumers in order, so the
    same seed gives the same weights. ``closure`` and ``init_options`` are for the
    gradient-guided inits (:func:`growdense.gradient_growth.grow_gradient_`).
    """
    check_init(init)
    split_noise = check_split_noise(split_noise)
    check_generator(generator)
    n = check_int("n", n)
    if init in GRADIENT_INITS:
        from .gradient_growth import grow_gradient_

        grow_gradient_(producer, consumers, n, init, closure, generator=generator, options=init_options)
        return
    if init == "split":
        _grow_split_(producer, consumers, n, generator, split_noise)
        return
    producer.grow_out(n, "he", generator=generator)
    for consumer in consumers:
        consumer.grow_in(n, "he" if init == "he" else "zero", generator=generator)


def _grow_split_(producer, consumers, n, generator, split_noise) -> None:
    """Net2WiderNet: copy sources' incoming rows, split their outgoing columns."""
    width = producer.out_features
    sources = _split_sources(width, n, producer.weight.device, generator)
    producer.grow_out(n, "zero")  # the rows are the sources' copies, written below
    for consumer in consumers:
        consumer.grow_in(n, "zero")
    active_in = producer.in_features
    new = torch.arange(width, width + n, device=producer.weight.device)
    w = producer.weight
    w[width : width + n, :active_in] = w.index_select(0, sources)[:, :active_in]
    if producer.bias is not None:
        producer.bias[width : width + n] = producer.bias.index_select(0, sources)
    for consumer in consumers:
        cw = consumer.weight
        rows = consumer.out_features
        scale = split_noise * float(cw[:rows, :width].std()) if rows * width > 1 else 0.0
        # Sources may repeat (n > width): split sequentially, one distinct round at a time.
        for lo in range(0, n, width):
            src = sources[lo : lo + width]
            dst = new[lo : lo + width]
            half = cw[:rows].index_select(1, src) * 0.5
            noise = torch.randn(half.shape, generator=generator, device=_gen_device(generator, cw), dtype=cw.dtype)
            noise = noise.to(cw.device) * scale
            cw[:rows, src] = half + noise
            cw[:rows, dst] = half - noise


def _gen_device(generator: Optional[torch.Generator], like: torch.Tensor) -> torch.device:
    """Where random values are drawn: the generator's device, else the tensor's."""
    return generator.device if generator is not None else like.device


def _split_sources(width: int, n: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n`` source indices in ``[0, width)``: distinct within each round of ``width``."""
    draw_on = generator.device if generator is not None else device
    rounds = [
        torch.randperm(width, generator=generator, device=draw_on)[: min(width, n - lo)] for lo in range(0, n, width)
    ]
    return torch.cat(rounds).to(device) if rounds else torch.empty(0, dtype=torch.long, device=device)


# ---- shrinking -----------------------------------------------------------------------
def kept_indices(name: str, producer: GrowLinear, to: int, keep: Keep) -> Optional[Tensor]:
    """Validate a shrink of hidden width ``name`` to ``to``; the kept indices in their new order.

    ``None`` means the first ``to`` (nothing moves). Raises, changing nothing, on a bad
    ``to`` or ``keep``.
    """
    to = check_int("to", to)
    width = producer.out_features
    if not 1 <= to <= width:
        raise ValueError(
            f"cannot shrink {name!r} from {width} to {to}: the new width must be between 1 and {width}"
            + ("; use grow() to widen" if to > width else "")
        )
    if isinstance(keep, str):
        if keep == "first":
            return None
        if keep == "norm":
            return _largest_norm(producer, to)
        raise ValueError(f"unknown keep {keep!r}; expected one of {KEEP_CHOICES} or a sequence of indices")
    if isinstance(keep, Tensor):
        if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise TypeError(f"keep indices must be a 1-D integer tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
        indices = [int(i) for i in keep.tolist()]
    else:
        try:
            indices = [check_int("keep index", i) for i in keep]
        except TypeError as error:
            raise TypeError(f"keep must be 'first', 'norm' or a sequence of int indices: {error}") from None
    if len(indices) != to:
        raise ValueError(f"shrinking {name!r} to {to} needs exactly {to} keep indices, got {len(indices)}")
    bad = [i for i in indices if not 0 <= i < width]
    if bad:
        raise ValueError(f"keep indices {bad} are out of range for {name!r} of width {width} (valid: 0..{width - 1})")
    if len(set(indices)) != len(indices):
        dups = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"keep indices for {name!r} contain duplicates: {dups}")
    return torch.tensor(indices, dtype=torch.long, device=producer.weight.device)


@torch.no_grad()
def _largest_norm(producer: GrowLinear, to: int) -> Tensor:
    norms = producer.active_weight.norm(dim=1)
    order = torch.sort(norms, descending=True, stable=True).indices[:to]
    return torch.sort(order).values


def permutation(kept: Tensor, width: int) -> Optional[Tensor]:
    """The permutation of ``range(width)`` that moves ``kept`` to the front; ``None`` if it is the identity."""
    rest = torch.ones(width, dtype=torch.bool, device=kept.device)
    rest[kept] = False
    perm = torch.cat([kept, rest.nonzero().flatten()])
    return None if torch.equal(perm, torch.arange(width, device=perm.device)) else perm
