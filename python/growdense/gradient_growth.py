"""Gradient-guided initialisation of new hidden neurons: GradMax and TINY.

A hidden width is the output of a *producer* ``GrowLinear`` (input ``a``, output ``h``)
and the input of one or more *consumers* (pre-activation ``z = W h + c``). Both
strategies read what the loss says about the consumers' pre-activations, on data the
caller chooses through a ``closure`` that computes and returns the loss (with its
autograd graph; it must not call ``backward``: the statistics pass does, on the
pre-activations only, so no Parameter's ``.grad`` changes).

One pass of the closure accumulates, on the layers' device, per forward of the producer:

- ``M = sum delta a^T`` (consumers' outputs stacked x producer inputs), ``delta`` the
  gradient of the loss with respect to a consumer's pre-activation (GradMax and TINY);
- for TINY also ``S = sum a a^T``, ``C = sum a h~^T``, ``S_h = sum h~ h~^T`` and
  ``G = sum delta h~^T``, with ``h~ = [h; 1]`` when every consumer has a bias.

No per-sample tensor outlives its mini-batch. The decompositions (SVD, eigh) run on the
CPU in float64 on these small matrices. The equations are in
``docs/gradient-guided-growth.md``.

The functions here are pure: they read the layers and return the new slices
(:class:`NewNeurons`). The init strategies :class:`GradMaxInit` and :class:`TinyInit`,
registered as ``"gradmax"`` and ``"tiny"`` (:func:`growdense.protocol.register_init`) when
growdense is imported, write them into a planned growth:
``Wiring.grow(name, n, init="gradmax", closure=closure, bias=0.1)``. The growth's new
units are already active (zero) when they run; the statistics are read over the extents
from before the growth, which is the network before it. ``Wiring.grow_many`` (what a
``GrowthSchedule`` event uses) grows several widths with GradMax from one pass of the
closure.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import protocol
from .layers import GrowLinear
from .protocol import CONSUMER, PRODUCER, Change

__all__ = [
    "GRADIENT_INITS",
    "Closure",
    "GrowthStatistics",
    "NewNeurons",
    "collect_statistics",
    "gradmax_slices",
    "tiny_slices",
    "first_order_coefficient",
    "Site",
    "collect_many",
    "GradMaxInit",
    "TinyInit",
    "takes_closure",
]

GRADIENT_INITS = ("gradmax", "tiny")
Closure = Callable[[], Tensor]



@dataclass
class GrowthStatistics:
    """What one pass of the closure says about a hidden width (see the module docstring).

    ``M`` is stacked over consumers in order (``rows[j]`` rows for consumer ``j``); the
    TINY matrices are ``None`` unless asked for. ``loss`` is the closure's value,
    ``samples`` the number of rows the producer saw.
    """

    M: Tensor
    rows: tuple[int, ...]
    loss: float
    samples: int
    width: int
    S: Optional[Tensor] = None
    C: Optional[Tensor] = None
    S_h: Optional[Tensor] = None
    G: Optional[Tensor] = None
    weight_grad_sq: Optional[float] = None  # ||dL/d producer.active_weight||^2, when asked for
    inputs: int = 0  # the producer's inputs M spans (its columns)


@dataclass
class NewNeurons:
    """The new slices of a growth by ``n``.

    ``incoming`` (n x producer.in_features) and ``bias`` (n) are the producer's new rows;
    ``outgoing[j]`` (consumer j's out_features x n) its new columns; ``consumer_bias[j]``
    a change to add to consumer j's bias (``None``: none). ``predicted`` is the
    strategy's predicted first-order loss decrease (GradMax: the squared norm of the
    new incoming weights' gradient, ``||Omega^T M||_F^2``; TINY: see
    :func:`tiny_slices`); ``info`` holds what else the strategy computed.
    """

    incoming: Tensor
    bias: Tensor
    outgoing: list[Tensor]
    consumer_bias: list[Optional[Tensor]]
    predicted: float
    info: dict = field(default_factory=dict)


# ---- checks ------------------------------------------------------------------------------
def _check_layers(producer: GrowLinear, consumers: Sequence[GrowLinear]) -> tuple[GrowLinear, ...]:
    consumers = tuple(consumers)
    if not isinstance(producer, GrowLinear) or not consumers or not all(isinstance(c, GrowLinear) for c in consumers):
        raise TypeError("gradient-guided growth needs a GrowLinear producer and a non-empty list of GrowLinear consumers")
    return consumers


def _check_closure(closure: object) -> Closure:
    if closure is None:
        raise ValueError(
            "init='gradmax' and init='tiny' need closure=: a function that computes and returns the loss on data "
            "you choose (with its autograd graph; do not call backward in it)"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable (() -> loss tensor), got {type(closure).__name__}")
    return closure


# ---- the statistics pass -------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """A hidden width as the statistics see it: its layers and the extents to read.

    ``width``: the hidden units that exist (before a growth); ``inputs``: the producer's
    inputs read; ``rows[j]``: consumer ``j``'s outputs read. The layers may be wider when
    the statistics are taken (a growth's new units already active, with zero weights):
    only these extents count.
    """

    producer: GrowLinear
    consumers: tuple[GrowLinear, ...]
    width: int
    inputs: int
    rows: tuple[int, ...]

    @classmethod
    def of(cls, producer: GrowLinear, consumers: Sequence[GrowLinear], width: Optional[int] = None) -> "Site":
        """The site of the layers as they are (``width``: default the producer's ``out_features``)."""
        consumers = _check_layers(producer, consumers)
        width = producer.out_features if width is None else int(width)
        return cls(producer, consumers, width, producer.in_features, tuple(c.out_features for c in consumers))


def _loss_of(closure: Closure) -> Tensor:
    loss = closure()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"the closure must return the loss as a one-element tensor, got {type(loss).__name__}")
    return loss.reshape(())


def _delta(consumer: GrowLinear, grad_y: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """The gradient with respect to the consumer's pre-activation from that of its output."""
    act = consumer.activation
    if act == "none":
        return grad_y
    if act == "relu":
        return grad_y * (y > 0).to(grad_y.dtype)
    with torch.enable_grad():  # recompute the pre-activation (small: one consumer GEMM)
        w = consumer.active_weight.detach()
        b = None if consumer.bias is None else consumer.active_bias.detach()
        z = F.linear(x.detach().to(w.dtype), w, b).requires_grad_(True)
        from .ops import ACTIVATION_FUNCTIONS

        (d,) = torch.autograd.grad(ACTIVATION_FUNCTIONS[act](z), z, grad_y.to(z.dtype))
    return d


@torch.no_grad()
def collect_statistics(
    producer: GrowLinear,
    consumers: Sequence[GrowLinear],
    closure: Closure,
    *,
    width: Optional[int] = None,
    tiny: bool = False,
    on_batch: Optional[Callable[[Tensor, list], None]] = None,
    weight_grad: bool = False,
) -> GrowthStatistics:
    """Run ``closure`` once and accumulate ``M`` (and TINY's matrices when ``tiny``).

    ``width``: how many of the hidden neurons exist (default: all active ones; pass the
    width before a growth when the new neurons are already in place with zero weights).
    Statistics stay on the layers' device, in float64 when the weights are float64 and
    float32 otherwise. ``on_batch(a, deltas)`` is called per forward of the producer with its
    input rows and each consumer's ``delta`` rows (``None`` where the loss does not use it).
    Raises if the closure calls ``backward`` (the Parameters'
    ``.grad`` would change) or if a consumer does not read the producer's output as is.
    """
    site = Site.of(producer, consumers, width)
    hook = None if on_batch is None else (lambda i, a, deltas: on_batch(a, deltas))
    return collect_many([site], closure, tiny=tiny, on_batch=hook, weight_grad=weight_grad)[0]


@torch.no_grad()
def collect_many(
    sites: Sequence[Site],
    closure: Closure,
    *,
    tiny: bool = False,
    on_batch: Optional[Callable[[int, Tensor, list], None]] = None,
    weight_grad: bool = False,
) -> list[GrowthStatistics]:
    """The statistics of every site from ONE pass of ``closure`` (see :func:`collect_statistics`).

    A layer may play parts in several sites (the consumer of ``h1`` is the producer of
    ``h2``). ``on_batch(i, a, deltas)`` is called per forward of site ``i``'s producer.
    ``weight_grad``: also ``||dL/dP||^2`` over each producer's existing neurons.
    """
    closure = _check_closure(closure)
    sites = list(sites)
    ref = sites[0].producer.weight
    dev = ref.device
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    # per site: [records, M, S, C, S_h, G, samples]; a record per producer forward: [a, h_out, h~, {j: (x, y)}]
    acc = []
    for site in sites:
        with_one = all(c.bias is not None for c in site.consumers)
        k = site.width + int(with_one)
        c_rows = sum(site.rows)
        zeros = lambda *shape: torch.zeros(*shape, device=dev, dtype=dtype)  # noqa: E731
        acc.append({
            "records": [], "samples": 0, "with_one": with_one, "M": zeros(c_rows, site.inputs),
            "S": zeros(site.inputs, site.inputs) if tiny else None, "C": zeros(site.inputs, k) if tiny else None,
            "S_h": zeros(k, k) if tiny else None, "G": zeros(c_rows, k) if tiny else None,
        })

    def producer_hook(i):
        site, st = sites[i], acc[i]

        def hook(module, inputs, output):
            x = inputs[0].detach()
            a = x.reshape(-1, x.shape[-1])[:, : site.inputs].to(dtype)
            h = output.detach().reshape(-1, output.shape[-1])[:, : site.width].to(dtype)
            ht = torch.cat([h, h.new_ones(h.shape[0], 1)], 1) if st["with_one"] else h
            st["samples"] += a.shape[0]
            if tiny:
                st["S"].addmm_(a.T, a)
                st["C"].addmm_(a.T, ht)
                st["S_h"].addmm_(ht.T, ht)
            st["records"].append([a, output, ht, {}])

        return hook

    def consumer_hook(i, j):
        records = acc[i]["records"]

        def hook(module, inputs, output):
            if not records or inputs[0] is not records[-1][1] or j in records[-1][3]:
                raise RuntimeError(
                    "gradient-guided growth needs every consumer to read the producer's output directly, once per "
                    "forward of the producer (nothing in between, e.g. no dropout or normalisation)"
                )
            records[-1][3][j] = (inputs[0], output)

        return hook

    handles = []
    for i, site in enumerate(sites):
        handles.append(site.producer.register_forward_hook(producer_hook(i)))
        handles += [c.register_forward_hook(consumer_hook(i, j)) for j, c in enumerate(site.consumers)]
    layers = {id(m): m for site in sites for m in (site.producer, *site.consumers)}.values()
    params = [t for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    versions = [(t.grad is None, None if t.grad is None else t.grad._version) for t in params]
    try:
        with torch.enable_grad():
            loss = _loss_of(closure)
            if [(t.grad is None, None if t.grad is None else t.grad._version) for t in params] != versions:
                raise RuntimeError(
                    "the closure changed the Parameters' .grad (it called backward): for gradient-guided growth it "
                    "must only compute and return the loss"
                )
            outputs = [y for st in acc for rec in st["records"] for (_, y) in rec[3].values()]
            if any(not st["records"] or not any(rec[3] for rec in st["records"]) for st in acc):
                raise RuntimeError("the closure's loss does not run the producer and its consumers (no forward seen)")
            if loss.grad_fn is None:
                raise RuntimeError("the closure's loss has no autograd graph (was it computed under torch.no_grad()?)")
            try:
                extra = [site.producer.weight for site in sites] if weight_grad else []
                grads = list(torch.autograd.grad(loss, outputs + extra, allow_unused=True))
            except RuntimeError as error:
                raise RuntimeError(
                    f"could not differentiate the closure's loss ({error}); the closure must return the loss "
                    f"with its graph and must not call backward"
                ) from None
        weight_sq: list[Optional[float]] = [None] * len(sites)
        if weight_grad:
            for i, (site, g) in enumerate(zip(sites, grads[len(outputs):])):
                weight_sq[i] = 0.0 if g is None else float(g[: site.width, : site.inputs].double().pow(2).sum())
        g_iter = iter(grads[: len(outputs)])
        for i, (site, st) in enumerate(zip(sites, acc)):
            offsets = [sum(site.rows[:j]) for j in range(len(site.rows))]
            for a, _, ht, seen in st["records"]:
                deltas: list = [None] * len(site.consumers)
                for j, (x, y) in seen.items():
                    g = next(g_iter)
                    if g is None:
                        continue
                    d = _delta(site.consumers[j], g, y, x)
                    d = d.reshape(-1, d.shape[-1])[:, : site.rows[j]].to(dtype)
                    deltas[j] = d
                    st["M"][offsets[j] : offsets[j] + site.rows[j]].addmm_(d.T, a)
                    if tiny:
                        st["G"][offsets[j] : offsets[j] + site.rows[j]].addmm_(d.T, ht)
                if on_batch is not None:
                    on_batch(i, a, deltas)
    finally:
        for handle in handles:
            handle.remove()
        for st in acc:
            st["records"].clear()
    value = float(loss.detach())
    return [
        GrowthStatistics(M=st["M"], rows=site.rows, loss=value, samples=st["samples"], width=site.width,
                         S=st["S"], C=st["C"], S_h=st["S_h"], G=st["G"], weight_grad_sq=weight_sq[i],
                         inputs=site.inputs)
        for i, (site, st) in enumerate(zip(sites, acc))
    ]


# ---- GradMax -----------------------------------------------------------------------------
def _sign_fix(vectors: Tensor) -> Tensor:
    """Each column with its largest-magnitude entry positive (singular vectors' sign is arbitrary)."""
    idx = vectors.abs().argmax(0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def _split_rows(matrix: Tensor, rows: Sequence[int]) -> list[Tensor]:
    return list(torch.split(matrix, list(rows), 0))


def gradmax_slices(
    producer: GrowLinear,
    consumers: Sequence[GrowLinear],
    n: int,
    closure: Optional[Closure] = None,
    *,
    scale: float = 1.0,
    bias: float = 0.0,
    generator: Optional[torch.Generator] = None,
    stats: Optional[GrowthStatistics] = None,
) -> NewNeurons:
    """GradMax (Evci et al., ICLR 2022): the new neurons' slices for a growth by ``n``.

    Incoming weights zero. Outgoing weights (stacked over consumers): the top ``n`` left
    singular vectors ``u_k`` of ``M = sum delta a^T``, each scaled to GradMax's
    ``mean_norm`` rule: norm ``scale`` times the mean Euclidean norm of the existing
    neurons' stacked outgoing columns (``scale`` itself when they are all zero). They
    maximise the norm of the gradient of the new (zero) incoming weights,
    ``Omega^T M``, under that norm. When ``n`` exceeds ``min(M.shape)`` the remaining
    columns are Gaussian directions (from ``generator``) of the same norm.

    ``bias`` is the new neurons' bias. With ``bias = 0`` (GradMax's) the output is
    unchanged; but a ReLU producer's new neurons then sit at ReLU's kink, where the
    derivative is 0, and never learn. With ``bias > 0`` they are active on every input
    (output ``bias``), so their incoming weights receive exactly the gradient GradMax
    maximised; the consumers' biases are lowered by ``bias * sum_k omega_k`` so that the
    output is still unchanged (up to rounding).
    """
    consumers = _check_layers(producer, consumers)
    if stats is None:
        stats = collect_statistics(producer, consumers, _check_closure(closure))
    n = int(n)
    width = stats.width
    M = stats.M.detach().to("cpu", torch.float64)
    r = min(M.shape)
    U, sigma, _ = torch.linalg.svd(M, full_matrices=False)
    k = min(n, r)
    directions = _sign_fix(U[:, :k])
    if n > k:
        extra = torch.randn((M.shape[0], n - k), generator=generator, device=_gen_device(generator), dtype=torch.float64)
        directions = torch.cat([directions, extra.cpu()], 1)
    directions = directions / directions.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    existing = torch.cat([c.weight[:rows, :width].detach().to("cpu", torch.float64)
                          for c, rows in zip(consumers, stats.rows)], 0)
    mean_norm = float(existing.norm(dim=0).mean()) if width > 0 else 0.0
    magnitude = scale * (mean_norm if mean_norm > 0 else 1.0)
    omega = directions * magnitude
    dev, dtype = producer.weight.device, producer.weight.dtype
    outgoing = [o.to(dev, dtype) for o in _split_rows(omega, stats.rows)]
    shift = [None] * len(consumers)
    if bias != 0.0:
        if any(c.bias is None for c in consumers):
            raise ValueError("gradmax with bias > 0 lowers the consumers' biases to keep the output: every consumer "
                             "needs a bias (or pass bias=0)")
        shift = [(-bias * o.sum(1)).to(dev, dtype) for o in _split_rows(omega, stats.rows)]
    predicted = float((omega.T @ M).pow(2).sum())
    return NewNeurons(
        incoming=torch.zeros(n, stats.inputs, device=dev, dtype=dtype),
        bias=torch.full((n,), float(bias), device=dev, dtype=dtype),
        outgoing=outgoing,
        consumer_bias=shift,
        predicted=predicted,
        info={"singular_values": sigma[:k].tolist(), "loss": stats.loss, "mean_norm": mean_norm},
    )


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


# ---- TINY ----------------------------------------------------------------------------------
def _inverse_sqrt(S: Tensor, eps: float) -> Tensor:
    """``S^{-1/2}`` of a symmetric PSD matrix on its eigenvalues above ``eps`` times the largest (0 elsewhere)."""
    values, vectors = torch.linalg.eigh(S)
    top = float(values.max()) if values.numel() else 0.0
    keep = values > eps * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    inv = torch.zeros_like(values)
    inv[keep] = values[keep].rsqrt()
    return (vectors * inv) @ vectors.T


def tiny_slices(
    producer: GrowLinear,
    consumers: Sequence[GrowLinear],
    n: int,
    closure: Optional[Closure] = None,
    *,
    eps: float = 1e-8,
    project: bool = True,
    stats: Optional[GrowthStatistics] = None,
    site: Optional[Site] = None,
) -> NewNeurons:
    """TINY (Verbockhaven et al., TMLR 2024) at its natural scale: the slices for a growth by ``n``.

    With ``v = -delta`` the desired change of the consumers' pre-activations, the best
    change of the existing consumer weights ``dW* = -G S_h^+`` and the projected desired
    update ``v_perp = v - dW* h~`` (``project=False``: ``v``), the new neurons solve
    ``min sum ||v_perp - Omega A^T a||^2`` over rank ``n``: with
    ``N = sum a v_perp^T = -M^T - C dW*^T`` and the SVD ``S^{-1/2} N = U diag(lambda) V^T``,
    ``alpha_k = sqrt(lambda_k) S^{-1/2} u_k`` (incoming) and ``omega_k = sqrt(lambda_k) v_k``
    (outgoing), bias zero. ``predicted`` is ``sum_k lambda_k^2``, the decrease of that
    objective (TINY's expressivity-bottleneck reduction).

    The linear model ignores the producer's activation: a ReLU neuron ``(alpha, omega)``
    and ``(-alpha, -omega)`` give the same ``Omega A^T`` but not the same function. A
    second pass of the closure computes, for each neuron and both signs, the loss's exact
    first-order decrease per unit ``gamma^2`` when both slices are scaled by ``gamma``
    (:func:`first_order_coefficient` per neuron) and keeps the better sign;
    ``info["first_order"]`` is their sum (``info["linear_first_order"]``:
    ``-<Omega A^T, M>``, the same for a linear producer). ``eps``: eigenvalues of ``S``
    below ``eps`` times the largest are treated as zero. Two passes of the closure.
    ``site``: the extents to read (default: the layers as they are).
    """
    consumers = _check_layers(producer, consumers)
    site = Site.of(producer, consumers) if site is None else site
    if stats is None or stats.S is None:
        stats = collect_many([site], _check_closure(closure), tiny=True)[0]
    n = int(n)
    f64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    M, S, C, S_h, G = f64(stats.M), f64(stats.S), f64(stats.C), f64(stats.S_h), f64(stats.G)
    N = -M.T
    dW = torch.zeros_like(G)
    if project:
        dW = -G @ torch.linalg.pinv(S_h, hermitian=True)
        N = N - C @ dW.T
    S_inv_half = _inverse_sqrt(S, eps)
    U, lam, Vh = torch.linalg.svd(S_inv_half @ N, full_matrices=False)
    k = min(n, lam.numel())
    root = lam[:k].sqrt()
    alpha = (S_inv_half @ U[:, :k]) * root  # p x k
    omega = Vh[:k].T * root  # c x k
    if k < n:  # TINY proposes at most rank(N) directions: the rest start at zero
        alpha = torch.cat([alpha, alpha.new_zeros(alpha.shape[0], n - k)], 1)
        omega = torch.cat([omega, omega.new_zeros(omega.shape[0], n - k)], 1)
    dev, dtype = producer.weight.device, producer.weight.dtype
    linear = float(-(omega @ alpha.T * M).sum())
    plus, minus = _signed_first_order(site, alpha.T, _split_rows(omega, stats.rows), closure)
    flip = minus > plus  # a ReLU neuron (alpha, omega) differs from (-alpha, -omega): keep the better one
    signs = torch.where(flip, -1.0, 1.0).to(torch.float64)
    alpha, omega = alpha * signs, omega * signs
    first_order = float(torch.maximum(plus, minus).sum())
    return NewNeurons(
        incoming=alpha.T.contiguous().to(dev, dtype),
        bias=torch.zeros(n, device=dev, dtype=dtype),
        outgoing=[o.to(dev, dtype) for o in _split_rows(omega, stats.rows)],
        consumer_bias=[None] * len(consumers),
        predicted=float(lam[:k].pow(2).sum()),
        info={"eigenvalues": lam[:k].tolist(), "first_order": first_order, "linear_first_order": linear,
              "flipped": int(flip.sum()), "loss": stats.loss, "delta_w": dW},
    )


def _phi(activation: str, u: Tensor) -> Tensor:
    """``lim act(gamma u) / gamma`` as ``gamma -> 0+``: ReLU exactly, linear; GELU, SiLU: ``u / 2``."""
    if activation == "relu":
        return F.relu(u)
    return u if activation == "none" else 0.5 * u


def _signed_first_order(site: Site, incoming: Tensor, outgoing: list[Tensor], closure) -> tuple[Tensor, Tensor]:
    """Per new neuron: the first-order loss decrease (per ``gamma^2``) of ``(alpha, omega)`` and of ``(-alpha, -omega)``."""
    n = incoming.shape[0]
    plus = torch.zeros(n, dtype=torch.float64)
    minus = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return plus, minus
    producer = site.producer
    dev = producer.weight.device
    A = incoming.to(dev, torch.float64)
    W = [o.to(dev, torch.float64) for o in outgoing]
    acc = {"plus": torch.zeros(n, device=dev, dtype=torch.float64), "minus": torch.zeros(n, device=dev, dtype=torch.float64)}

    def on_batch(a, deltas):
        u = a.to(torch.float64) @ A.T
        D = sum(d.to(torch.float64) @ w for d, w in zip(deltas, W) if d is not None)
        if isinstance(D, int):
            return
        acc["plus"] -= (D * _phi(producer.activation, u)).sum(0)
        acc["minus"] += (D * _phi(producer.activation, -u)).sum(0)

    collect_many([site], closure, on_batch=lambda i, a, deltas: on_batch(a, deltas))
    return acc["plus"].cpu(), acc["minus"].cpu()


@torch.no_grad()
def first_order_coefficient(
    producer: GrowLinear, consumers: Sequence[GrowLinear], start: int, stop: int, closure: Closure
) -> float:
    """The ``gamma^2`` coefficient of the loss decrease when the new neurons ``[start, stop)``, in
    place with bias zero, have both their incoming and outgoing slices scaled by ``gamma -> 0``.

    ``-sum delta^T Omega act(A^T a)``, with ``delta`` taken with the new outgoing weights zero
    (the loss before the growth): exact for a ReLU producer (``relu(gamma u) = gamma relu(u)``)
    and a linear one. One pass of the closure; no ``.grad`` changes.
    """
    consumers = _check_layers(producer, consumers)
    if producer.activation not in ("relu", "none"):
        raise ValueError(f"first_order_coefficient is exact for a ReLU or linear producer, not {producer.activation!r}")
    outgoing = [c.weight[: c.out_features, start:stop].clone() for c in consumers]
    seen: list[tuple[int, Tensor, Tensor]] = []

    def hook(j):
        def fn(module, inputs, output):
            seen.append((j, inputs[0], output))

        return fn

    for c in consumers:
        c.weight[: c.out_features, start:stop].zero_()
    handles = [c.register_forward_hook(hook(j)) for j, c in enumerate(consumers)]
    total = 0.0
    try:
        with torch.enable_grad():
            loss = _loss_of(closure)
            grads = torch.autograd.grad(loss, [y for _, _, y in seen], allow_unused=True)
        for (j, x, y), g in zip(seen, grads):
            if g is None:
                continue
            d = _delta(consumers[j], g, y, x).reshape(-1, y.shape[-1]).double()
            h_new = x.detach().reshape(-1, x.shape[-1])[:, start:stop].double()
            total += float(((d.T @ h_new) * outgoing[j].double()).sum())
    finally:
        for handle in handles:
            handle.remove()
        for c, o in zip(consumers, outgoing):
            c.weight[: c.out_features, start:stop].copy_(o)
    return -total


# ---- writing the slices ----------------------------------------------------------------
@torch.no_grad()
def _write(producer: GrowLinear, consumers: Sequence[GrowLinear], start: int, new: NewNeurons, gamma: float = 1.0,
           out_gamma: Optional[float] = None) -> None:
    """Write ``new`` as units ``start, start + n`` (already active): incoming and bias times ``gamma``, outgoing
    times ``out_gamma`` (default ``gamma``), each over the extents the slices have."""
    n, inputs = new.incoming.shape
    out_gamma = gamma if out_gamma is None else out_gamma
    producer.weight[start : start + n, :inputs] = new.incoming * gamma
    if producer.bias is not None:
        producer.bias[start : start + n] = new.bias * gamma
    for c, o in zip(consumers, new.outgoing):
        c.weight[: o.shape[0], start : start + n] = o * out_gamma


# ---- the init strategies (registered as init="gradmax" and init="tiny") -------------------
def _real(name: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"init={name!r}: {key} must be a finite real number >= 0, got {value!r}")
    return float(value)


def _site_of(name: str, change: Change) -> Site:
    """The :class:`Site` of a planned growth: the extents from before it, whatever the layers hold now."""
    producers = [m for m in change.members if m.role == PRODUCER]
    consumers = [m for m in change.members if m.role == CONSUMER]
    others = [m for m in change.members if m.role not in (PRODUCER, CONSUMER)]
    if (
        len(producers) != 1
        or not consumers
        or others
        or not isinstance(producers[0].module, GrowLinear)
        or producers[0].width != "out"
        or any(not isinstance(m.module, GrowLinear) or m.width != "in" for m in consumers)
    ):
        kinds = ", ".join(f"{type(m.module).__name__}.{m.width} ({m.role})" for m in change.members)
        raise TypeError(
            f"init={name!r} grows a width between one GrowLinear producer and GrowLinear consumers with nothing in "
            f"between (no riders); {change.name!r} has {kinds}"
        )

    def extent(member, dim: int) -> int:
        for sl in change.slices:
            if sl.member is member and sl.spec.name == "weight":
                return sl.extent[dim]
        raise TypeError(f"init={name!r}: {type(member.module).__name__} declares no 'weight'")

    producer = producers[0]
    return Site(producer.module, tuple(m.module for m in consumers), change.start, extent(producer, 1),
                tuple(extent(m, 0) for m in consumers))


def _check_gradient(name: str, change: Change, options: dict, allowed: tuple[str, ...]) -> dict:
    """Validate a gradient-guided init's options (and, for a planned change, its layers); the options."""
    gen = change.generator
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(gen).__name__}")
    options = dict(options)
    options.pop("split_noise", None)  # every strategy is handed it; unused here
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise TypeError(f"init={name!r} got unexpected option(s) {extra}; it takes {list(allowed)}")
    if "closure" not in options or options["closure"] is None:
        raise ValueError(
            f"init={name!r} needs closure=: a function that computes and returns the loss on data you choose "
            f"(with its autograd graph; do not call backward in it)"
        )
    _check_closure(options["closure"])
    for key in ("scale", "bias", "eps"):
        if key in options:
            options[key] = _real(name, key, options[key])
    if "line_search_steps" in options:
        steps = options["line_search_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"init={name!r}: line_search_steps must be an int >= 1, got {steps!r}")
    if "project" in options and not isinstance(options["project"], bool):
        raise TypeError(f"init={name!r}: project must be a bool, got {type(options['project']).__name__}")
    if change.members:
        site = _site_of(name, change)
        if options.get("bias", 0.0) != 0.0 and any(c.bias is None for c in site.consumers):
            raise ValueError(
                f"init={name!r} with bias > 0 lowers the consumers' biases to keep the output unchanged: every "
                f"consumer of {change.name!r} needs a bias (or pass bias=0)"
            )
    return options


class GradMaxInit:
    """``"gradmax"``: zero incoming weights (bias ``bias``), outgoing weights from the top singular
    vectors of ``M`` (:func:`gradmax_slices`). Options: ``closure`` (required), ``scale``
    (default 1), ``bias`` (default 0).

    :meth:`apply_many_` grows several widths from one pass of the closure (what
    :meth:`growdense.Wiring.grow_many` and :meth:`growdense.GrowthSchedule.apply` use).
    """

    name = "gradmax"
    options = ("closure", "scale", "bias")

    def check(self, change: Change, **options: Any) -> None:
        _check_gradient(self.name, change, options, self.options)

    def apply_(self, change: Change, **options: Any) -> None:
        self.apply_many_([change], **options)

    def apply_many_(self, changes: Sequence[Change], **options: Any) -> None:
        """Grow every change (their new units active, still zero) from ONE pass of the closure.

        The statistics of each width are taken over its extents from before the growth, so
        they are those of the network before the event: the new units are zero and their
        outgoing weights too, which leaves the closure's loss as it was.
        """
        options = _check_gradient(self.name, Change("", 0, 0, (), ()), options, self.options)
        scale, bias = options.get("scale", 1.0), options.get("bias", 0.0)
        sites = [_site_of(self.name, c) for c in changes]
        stats = collect_many(sites, options["closure"])
        news = [
            gradmax_slices(site.producer, site.consumers, c.n, scale=scale, bias=bias, generator=c.generator, stats=st)
            for c, site, st in zip(changes, sites, stats)
        ]
        for c, site, new in zip(changes, sites, news):
            _write(site.producer, site.consumers, c.start, new)
            for consumer, rows, shift in zip(site.consumers, site.rows, new.consumer_bias):
                if shift is not None:
                    consumer.bias[:rows] += shift


class TinyInit:
    """``"tiny"``: TINY's incoming and outgoing weights (:func:`tiny_slices`), scaled by a line search
    on the closure that never raises its loss. Options: ``closure`` (required),
    ``line_search_steps`` (default 8), ``eps`` (default 1e-8), ``project`` (default ``True``).
    """

    name = "tiny"
    options = ("closure", "line_search_steps", "eps", "project")

    def check(self, change: Change, **options: Any) -> None:
        _check_gradient(self.name, change, options, self.options)

    def apply_(self, change: Change, **options: Any) -> None:
        options = _check_gradient(self.name, Change("", 0, 0, (), ()), options, self.options)
        site = _site_of(self.name, change)
        closure = options["closure"]
        new = tiny_slices(site.producer, site.consumers, change.n, closure, eps=options.get("eps", 1e-8),
                          project=options.get("project", True), site=site)
        _tiny_line_search(site.producer, site.consumers, change.start, new, closure,
                          options.get("line_search_steps", 8))


def takes_closure(init: str) -> bool:
    """Whether the init strategy registered as ``init`` takes a ``closure=`` option (lists it in ``options``)."""
    return "closure" in tuple(getattr(protocol.init_strategy(init), "options", ()))


for _strategy in (GradMaxInit(), TinyInit()):
    if _strategy.name not in protocol.init_names():
        protocol.register_init(_strategy)


def _tiny_line_search(producer, consumers, start, new: NewNeurons, closure: Closure, steps: int) -> None:
    loss0 = new.info["loss"]
    existing = producer.weight[:start, : new.incoming.shape[1]].detach().double().norm(dim=1).mean()
    proposed = new.incoming.double().norm(dim=1)
    proposed = proposed[proposed > 0]
    if proposed.numel() == 0 or not math.isfinite(loss0):
        new.info.update(gamma=0.0, losses=[])
        return  # nothing to add: the new slices stay zero
    gamma0 = float(existing / proposed.mean()) if float(existing) > 0 else 1.0
    tried: list[tuple[float, float]] = []
    best = (0.0, loss0)
    for j in range(steps):
        gamma = gamma0 / 2**j
        _write(producer, consumers, start, new, gamma)
        value = float(_loss_of(closure).detach())
        tried.append((gamma, value))
        if value < best[1]:
            best = (gamma, value)
        elif best[0] > 0:
            break  # past the best: the loss rose again
    if best[0] > 0:
        _write(producer, consumers, start, new, best[0])
    else:
        _write(producer, consumers, start, new, gamma0, out_gamma=0.0)
        warnings.warn(
            "TINY's line search found no scale that lowers the closure's loss; the new neurons start with zero "
            "outgoing weights (the loss is unchanged)",
            RuntimeWarning,
            stacklevel=4,
        )
    new.info.update(gamma=best[0], gamma0=gamma0, losses=tried)
