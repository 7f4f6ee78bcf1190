"""How new hidden neurons are initialised when a hidden width grows.

A hidden width is produced by one :class:`~growdense.GrowLinear` (its output rows) and
consumed by one or more (their input columns). Growing it by ``n`` adds ``n`` rows to the
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

GradMax proper (outgoing weights from the top singular vectors of the gradient, incoming
zero) is not offered: with a fused ReLU, a neuron with zero incoming weights and zero bias
has zero pre-activation, where ReLU's derivative is zero, so its incoming weights would
never receive a gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layers import GrowLinear

__all__ = ["GROW_INITS", "grow_neurons_"]

GROW_INITS = ("he", "zero_out", "split")


def check_init(init: str) -> None:
    """Raise ``ValueError`` unless ``init`` is one of :data:`GROW_INITS`."""
    if init not in GROW_INITS:
        raise ValueError(f"unknown init {init!r} for new neurons; expected one of {GROW_INITS}")


@torch.no_grad()
def grow_neurons_(
    producer: GrowLinear,
    consumers: Sequence[GrowLinear],
    n: int,
    init: str = "he",
    *,
    generator: Optional[torch.Generator] = None,
    split_noise: float = 1e-2,
) -> None:
    """Grow the hidden width between ``producer`` and ``consumers`` by ``n`` in place.

    The caller validates widths and capacities first (see :class:`~growdense.Wiring`);
    this only writes weights. Random draws come from ``generator`` (or the global RNG),
    producer first, then consumers in order, so the same seed gives the same weights.
    """
    check_init(init)
    width = producer.out_features
    if init == "he":
        producer.grow_out(n, generator=generator)
        for consumer in consumers:
            consumer.grow_in(n, "he", generator=generator)
        return
    if init == "zero_out":
        producer.grow_out(n, generator=generator)
        for consumer in consumers:
            consumer.grow_in(n, "zero", generator=generator)
        return
    # "split": copy sources' incoming rows, split their outgoing columns.
    sources = _split_sources(width, n, producer.weight.device, generator)
    # grow_out draws He rows (advancing the generator), overwritten by the copies below.
    producer.grow_out(n, generator=generator)
    for consumer in consumers:
        consumer.grow_in(n, "zero", generator=generator)
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
