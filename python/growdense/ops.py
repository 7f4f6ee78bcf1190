"""The growdense operators: Python entry points and fake kernels.

The kernels are registered in C++ (``csrc/``) under the ``growdense`` namespace, their
derivatives too (``csrc/autograd/linear.cpp``); this module gives them shape
inference (so they trace under ``torch.compile``), and the composite formula that
``torch.func`` transforms see in their place.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _extension  # noqa: F401  (loads the operator library)

__all__ = ["linear", "linear_reference", "normal_block_", "block_normal_", "ACTIVATIONS"]

# The activations the ops fuse (csrc/activation.h), each with its torch.nn.functional
# twin: the composite path computes it, the tests compare against it.
ACTIVATION_FUNCTIONS: dict[str, Optional[Callable[[Tensor], Tensor]]] = {
    "none": None,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)
# The activations whose backward reads the pre-activation (`linear_forward` returns it).
_SAVES_PRE_ACTIVATION = frozenset({"gelu", "gelu_tanh", "silu"})

# True inside torch.func transforms (grad, vmap, jacrev, ...), which cannot run the
# C++ autograd kernel: `linear` then takes the composite formula, which they can.
_functorch_active = torch._C._are_functorch_transforms_active


def _activation_name(activation: Optional[str]) -> str:
    name = "none" if activation is None else activation
    if name not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"unknown activation {activation!r}; expected None or one of {ACTIVATIONS}")
    return name


def composite_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], active_in: int, active_out: int, activation: str
) -> Tensor:
    """:func:`linear` written with ``F.linear`` on views of the active block.

    What ``torch.func`` transforms and ``torch.compile`` run instead of the fused op;
    differentiable to any order (gradients of ``weight`` and ``bias`` have their capacity
    shapes, zero outside the active block). ``narrow``, not slicing: a slice's bound
    check would make the compiler tell a width equal to the capacity apart.
    """
    bias = None if bias is None else bias.narrow(0, 0, active_out)
    y = F.linear(x, weight.narrow(0, 0, active_out).narrow(1, 0, active_in), bias)
    fn = ACTIVATION_FUNCTIONS[activation]
    return y if fn is None else fn(y)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    active_in: int,
    active_out: int,
    activation: Optional[str] = None,
) -> Tensor:
    """``act(x @ weight[:active_out, :active_in].T + bias[:active_out])``.

    ``weight`` (capacity_out, capacity_in) and ``bias`` (capacity_out) are read in
    place; ``x`` has shape (..., active_in) and the result (..., active_out).
    Differentiable in ``x``, ``weight`` and ``bias``; the gradients of ``weight`` and
    ``bias`` have their capacity shapes and are zero outside the active block.
    ``activation``: ``None`` or one of :data:`ACTIVATIONS`.
    """
    name = _activation_name(activation)
    if _functorch_active():
        return composite_linear(x, weight, bias, active_in, active_out, name)
    return torch.ops.growdense.linear(x, weight, bias, active_in, active_out, name)


def linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    active_in: int,
    active_out: int,
    activation: Optional[str] = None,
) -> Tensor:
    """The plain-loop CPU reference of :func:`linear` (differentiable likewise)."""
    return torch.ops.growdense.linear_reference(
        x, weight, bias, active_in, active_out, _activation_name(activation)
    )


def normal_block_(
    tensor: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    std: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Fill ``tensor[rows[0]:rows[1], cols[0]:cols[1]]`` with N(0, std²) in place.

    The values are those of :func:`growdense.protocol.draw_normal_` (torch's ``normal_`` of
    the block, drawn in contiguous chunks where it is not contiguous), and the generator
    ends where that leaves it. On the CPU, float32 chunks of 16 values or more are drawn by
    growdense's own kernel, several times faster than torch's, where it gives torch's values
    exactly (checked against torch once per process; ``growdense info`` says whether it does).
    """
    torch.ops.growdense.normal_block_(tensor, rows[0], rows[1], cols[0], cols[1], float(std), generator)
    return tensor


def block_normal_(tensor: Tensor, index: tuple, std: float, generator: Optional[torch.Generator] = None) -> None:
    """N(0, std²) into ``tensor[index]`` in place: :func:`normal_block_` for a block of a 2-D tensor, else
    :func:`growdense.protocol.normal_`. The kernel growdense's modules declare for their weights
    (``TensorSpec.normal``)."""
    if (tensor.dim() == 2 and len(index) == 2 and all(isinstance(s, slice) for s in index)
            and index[0].step in (None, 1) and index[1].step in (None, 1)):
        (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(index, tensor.shape))
        normal_block_(tensor, (r0, max(r0, r1)), (c0, max(c0, c1)), std, generator)
    else:
        from .protocol import normal_

        normal_(tensor, index, std, generator)


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    """Adam's update of CPU blocks in place, one pass over each (``growdense.optim``'s ``fused=True``).

    Each block is a parameter (or a view of its active block), its gradient and its two
    moments: same shape and dtype, at most 2-D, contiguous columns; ``steps[i]`` is the
    block's step count after this step. The order of operations is torch's single-tensor
    Adam's (AdamW's with ``decoupled_weight_decay``), in the accumulation type.
    """
    torch.ops.growdense.adam_step_(params, grads, exp_avgs, exp_avg_sqs, [float(s) for s in steps], float(lr),
                                   float(beta1), float(beta2), float(weight_decay), float(eps), bool(maximize),
                                   bool(decoupled_weight_decay))


def _out_shape(x: Tensor, active_out: int) -> list:
    return [*x.shape[:-1], active_out]


def _linear_fake(x, weight, bias, active_in, active_out, activation):
    torch._check(x.shape[-1] == active_in, lambda: f"input has {x.shape[-1]} features, expected {active_in}")
    torch._check(x.dtype == weight.dtype, lambda: f"input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if x.device != weight.device:  # as the real kernels check (a meta input lands here)
        raise RuntimeError(f"growdense: input is on {x.device} but weight is on {weight.device}")
    return x.new_empty(_out_shape(x, active_out))


def _linear_forward_fake(x, weight, bias, active_in, active_out, activation):
    y = _linear_fake(x, weight, bias, active_in, active_out, activation)
    saved = x.new_empty(_out_shape(x, active_out)) if activation in _SAVES_PRE_ACTIVATION else x.new_empty(0)
    return y, saved


def _linear_backward_fake(grad_out, x, weight, saved, active_in, active_out, activation, output_mask):
    grad_x = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
    grad_b = weight.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
    return grad_x, grad_w, grad_b


def _normal_block_fake(tensor, row_start, row_end, col_start, col_end, std, generator=None):
    return None


for _name in ("linear", "linear_reference"):
    torch.library.register_fake(f"growdense::{_name}")(_linear_fake)
for _name in ("linear_forward", "linear_forward_reference"):
    torch.library.register_fake(f"growdense::{_name}")(_linear_forward_fake)
for _name in ("linear_backward", "linear_backward_reference"):
    torch.library.register_fake(f"growdense::{_name}")(_linear_backward_fake)
torch.library.register_fake("growdense::normal_block_")(_normal_block_fake)
torch.library.register_fake("growdense::adam_step_")(lambda *args: None)


# Derivatives: `linear` and `linear_reference` have their autograd kernel in C++
# (csrc/autograd/linear.cpp, registered for the Autograd dispatch key, so it serves
# every device); their forward calls `linear_forward` when the activation's backward
# needs the pre-activation, their backward `linear_backward` / `linear_backward_reference`.
# It is in C++ because a Python autograd wrapper costs tens of microseconds per
# forward+backward, as much as a small layer's GEMMs.
for _name in ("linear", "linear_reference"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"growdense::{_name}", "Autograd"):
        raise ImportError(
            f"growdense's operator library has no autograd kernel for growdense::{_name}: it was built from "
            "older sources. Rebuild it: `pip install --no-build-isolation --force-reinstall --no-deps .` "
            "from the source tree."
        )


# ---- the fused negative ELBO -------------------------------------------------------
# growdense::negative_elbo(logits, target, mu, logvar): CPU kernels in csrc/cpu/elbo.cpp,
# CUDA in csrc/cuda/elbo.cu, autograd in csrc/cpu/elbo_autograd.cpp, autocast in
# csrc/cpu/autocast.cpp.

__all__ += ["negative_elbo", "composite_negative_elbo", "cpu_capability", "cpu_capabilities", "cpu_normal_draws"]


def composite_negative_elbo(logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """:func:`negative_elbo` written with PyTorch ops (the formula it fuses).

    What ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) run instead of the
    fused op, whose C++ autograd kernel they cannot use; differentiable to any order.
    Computed in the logits' accumulation type, as the fused op is.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    v, x, mu, logvar = logits.to(acc), target.to(acc), mu.to(acc), logvar.to(acc)
    nll = F.binary_cross_entropy_with_logits(v, x.expand_as(v), reduction="none").sum(-1).mean(0)
    return nll - 0.5 * (1.0 + logvar - mu.square() - logvar.exp()).sum(-1)


def negative_elbo(logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-image negative ELBO, fused: (B,) in float32 (float64 for float64 logits).

    ``mean_l sum_d BCE(sigmoid(logits[l, b, d]), target[b, d]) + KL(N(mu[b], exp(logvar[b])) || N(0, I))``
    for ``logits`` (L, B, D) (float32, bfloat16, float16 or float64), ``target`` (B, D)
    and ``mu``, ``logvar`` (B, Z). Reads the logits once forward and once backward,
    accumulating in float32; ``target``, ``mu`` and ``logvar`` are converted to that
    accumulation type first. Differentiable in all four, to any order (a backward with
    ``create_graph=True`` is itself differentiable). Infinite logits give what
    ``F.binary_cross_entropy_with_logits`` gives. Under ``torch.func`` transforms it
    computes :func:`composite_negative_elbo`.
    """
    if _functorch_active():
        return composite_negative_elbo(logits, target, mu, logvar)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.ops.growdense.negative_elbo(logits, target.to(acc), mu.to(acc), logvar.to(acc))


# ---- which compilation of the CPU kernels runs ---------------------------------------
# The hand-written CPU kernels (the fused loss, the linear op's epilogues) are compiled
# once per CPU capability and one is chosen at import: the best this CPU runs and ATen
# itself uses (ATEN_CPU_CAPABILITY lowers both), or the one the environment variable
# GROWDENSE_CPU_CAPABILITY names (default, avx2, avx512, sve256).

CPU_CAPABILITY_ENV = "GROWDENSE_CPU_CAPABILITY"


def cpu_capability() -> str:
    """The CPU kernels in use: ``"default"``, ``"avx2"``, ``"avx512"`` or ``"sve256"``."""
    return torch.ops.growdense._cpu_capability()


def cpu_capabilities(compiled: bool = False) -> list[str]:
    """The CPU kernels this CPU can run (``compiled=True``: all those this build contains)."""
    names = (
        torch.ops.growdense._cpu_capabilities_compiled()
        if compiled
        else torch.ops.growdense._cpu_capabilities_supported()
    )
    return names.split()


def cpu_normal_draws() -> str:
    """Which kernel draws :func:`normal_block_`'s float32 values on the CPU: the capability name of
    growdense's own kernel (torch's values, several times faster; checked against torch once
    per process), or ``"torch"`` where it would not give torch's values (then torch draws them)."""
    return torch.ops.growdense._cpu_normal_draws()


def _set_cpu_capability(name: str) -> str:
    """Use the CPU kernels ``name`` from now on (tests, benchmarks); returns the previous name.

    Raises, changing nothing, when this build or this CPU lacks them.
    """
    return torch.ops.growdense._set_cpu_capability(name)


try:  # choose now, so that a bad GROWDENSE_CPU_CAPABILITY fails at import, clearly
    cpu_capability()
except (RuntimeError, ValueError) as _error:
    raise ImportError(str(_error).split("\nException raised from")[0]) from None


def _elbo_check_fake(logits, target, mu, logvar) -> None:
    torch._check(logits.dim() == 3, lambda: f"negative_elbo needs logits of shape (L, B, D), got {tuple(logits.shape)}")
    torch._check(
        target.dim() == 2 and target.shape[0] == logits.shape[1] and target.shape[1] == logits.shape[2],
        lambda: f"negative_elbo's target must have shape (B, D) matching logits {tuple(logits.shape)}",
    )
    torch._check(mu.dim() == 2 and mu.shape[0] == logits.shape[1], lambda: "negative_elbo's mu must be (B, Z)")
    torch._check(logvar.shape == mu.shape, lambda: "negative_elbo's logvar must have the shape of mu")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for name, t in (("target", target), ("mu", mu), ("logvar", logvar)):
        if t.dtype != acc:
            raise TypeError(f"growdense: negative_elbo's {name} must be {acc}, got {t.dtype}")


@torch.library.register_fake("growdense::negative_elbo")
def _negative_elbo_fake(logits, target, mu, logvar):
    _elbo_check_fake(logits, target, mu, logvar)
    return target.new_empty(logits.shape[1])


@torch.library.register_fake("growdense::negative_elbo_backward")
def _negative_elbo_backward_fake(grad, logits, target, mu, logvar, output_mask):
    _elbo_check_fake(logits, target, mu, logvar)
    return (
        logits.new_empty(logits.shape) if output_mask[0] else logits.new_empty(0),
        target.new_empty(target.shape) if output_mask[1] else target.new_empty(0),
        mu.new_empty(mu.shape) if output_mask[2] else target.new_empty(0),
        logvar.new_empty(logvar.shape) if output_mask[3] else target.new_empty(0),
    )


if not torch._C._dispatch_has_kernel_for_dispatch_key("growdense::negative_elbo", "Autograd"):
    raise ImportError(
        "growdense's operator library has no autograd kernel for growdense::negative_elbo: it was built from "
        "older sources. Rebuild it: `pip install --no-build-isolation --force-reinstall --no-deps .`"
    )
