"""``GrowLayerNorm`` and ``GrowRMSNorm``: normalisations over an active width that grows in place.

Both normalise the last dimension of their input, of the active width ``features``;
``weight`` and ``bias`` are allocated at capacity and their active slices ride the width
(a new slice: weight 1, bias 0; outside the active part both are zero).

Growing a width that a norm normalises changes its statistics (the mean and variance run
over more features), so no init of the new slice alone keeps the output. ``init="zero_out"``
ramps the new features in instead: they enter with a factor ``r`` that starts at 0 and
rises by ``1 / ramp_steps`` on every :meth:`ramp_step` (call it after each optimizer
step) until it reaches 1. With factors ``r_i`` (1 for the old features)::

    mean = sum(r_i x_i) / sum(r_i)      var = sum(r_i (x_i - mean)^2) / sum(r_i)
    y_i  = r_i * ((x_i - mean) / sqrt(var + eps) * weight_i + bias_i)

At the growth (``r = 0`` on the new features) the old outputs are exactly those of the
norm before the growth and the new ones are zero, whatever the new inputs; at ``r = 1``
it is the plain norm of the full width; in between it moves continuously. The same holds
for RMSNorm (``ms = sum(r_i x_i^2) / sum(r_i)``): its mean of squares over the larger
width would change even when the new inputs are zero (the divisor grows), so it ramps too.

Under a :class:`~growdense.Wiring` the same happens: growing a width that holds a norm
with ``init="zero_out"`` starts the ramp (``ramp_steps``: an option of ``grow``, default
the norm's :attr:`ramp_steps`); the ramp's factors move with the features (a permutation,
``keep="norm"``). Other inits let the new features in at once.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from ._grow_module import Layout, _GrowModule, check_growth

__all__ = ["GrowLayerNorm", "GrowRMSNorm", "ramp_step"]

_NORM_INITS = ("he", "default", "zero_out")


def _normalized_width(normalized_shape: Union[int, Sequence[int]], what: str) -> int:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return int(normalized_shape)
    shape = tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(
            f"{what} grows one normalised dimension: normalized_shape must be an int or a 1-tuple, got "
            f"{shape}; normalise over the last dimension only (reshape the input) to grow it"
        )
    return check_int("normalized_shape", shape[0])


class _GrowNorm(_GrowModule):
    _width_names = ("features",)
    _inits = _NORM_INITS

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: Optional[float],
        elementwise_affine: bool,
        bias: bool,
        capacity: Optional[int],
        device,
        dtype,
    ) -> None:
        super().__init__()
        width = _normalized_width(normalized_shape, type(self).__name__)
        self._init_widths({"features": width}, {"features": capacity})
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        cap = self._capacities["features"]
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(cap, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(cap, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The ramp (see the module docstring): a factor per feature and its rise per step
        # (zero outside the active part, as every declared tensor).
        self.register_buffer("_ramp", torch.zeros(cap, **factory), persistent=False)
        self.register_buffer("_ramp_rate", torch.zeros(cap, **factory), persistent=False)
        self.ramp_steps = 100  # the default length of a ramp started by a Wiring's zero_out growth
        self._ramping = False
        self._ramp_left = 0
        self.reset_parameters()

    def _layout(self) -> Layout:
        cap = self._capacities["features"]
        return {"weight": (((cap, "features"),),), "bias": (((cap, "features"),),)}

    def _growth_spec(self):
        """The declaration for :mod:`growdense.protocol`: weight (new: 1) and bias (new: 0) ride ``features``.

        So do the ramp's factor (new: 1; :meth:`on_grow_` sets 0 under ``zero_out``) and
        rate (new: 0), so that they move with their features.
        """
        from . import protocol as p

        axes = (p.Axis(0, "features", p.RIDER),)
        return p.GrowthSpec(("features",), (
            p.TensorSpec("weight", axes, fill=1.0),
            p.TensorSpec("bias", axes, fill=0.0),
            p.TensorSpec("_ramp", axes, fill=1.0),
            p.TensorSpec("_ramp_rate", axes, fill=0.0),
        ))

    def on_grow_(self, width: str, start: int, stop: int, init: str, **options: Any) -> None:
        """Called by a :class:`~growdense.Wiring` after it wrote features ``[start, stop)``:
        under ``init="zero_out"`` they ramp in over ``options["ramp_steps"]`` steps (default
        :attr:`ramp_steps`), so that the output is exactly unchanged at the growth."""
        if init != "zero_out" or stop <= start:
            return
        steps = options.get("ramp_steps", self.ramp_steps)
        self._start_ramp(start, stop, steps)

    def _start_ramp(self, start: int, stop: int, steps: int) -> None:
        self._ramp[start:stop].zero_()
        self._ramp_rate[start:stop].fill_(1.0 / steps)
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ has nothing to check
        state["_ramp_left"] = max(state["_ramp_left"], steps)
        state["_ramping"] = True

    @property
    def normalized_shape(self) -> tuple[int]:
        """``(features,)``: the active width, as the torch twin's attribute."""
        return (self.width("features"),)

    @property
    def features(self) -> int:
        """The active width."""
        return self.width("features")

    @property
    def capacity_features(self) -> int:
        return self._capacities["features"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weight 1 and bias 0 on the active part, as the torch twin; zero outside. Ends any ramp."""
        self._end_ramp()
        if self.weight is not None:
            self.weight.zero_()
            self.weight[: self.features].fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    # ---- growth --------------------------------------------------------------------
    def _init_slice(self, width: str, start: int, stop: int, init: str, generator) -> None:
        if self.weight is not None:
            self.weight[start:stop].fill_(1.0)
        if self.bias is not None:
            self.bias[start:stop].zero_()
        self._ramp[start:stop].fill_(1.0)
        self._ramp_rate[start:stop].zero_()

    @torch.no_grad()
    def grow(self, n: int, init: str = "he", *, ramp_steps: int = 100) -> None:
        """Add ``n`` features (weight 1, bias 0).

        ``init``: ``"he"`` or ``"default"`` let them enter at once; ``"zero_out"`` ramps them
        in over ``ramp_steps`` calls of :meth:`ramp_step`, so that the output is exactly
        unchanged at the growth (see the module docstring).
        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        n = check_growth(n)
        if init == "zero_out":
            ramp_steps = check_int("ramp_steps", ramp_steps)
            if ramp_steps < 1:
                raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")
        start = self.features
        self.resize("features", start + n, init)
        if init == "zero_out" and n:
            self._start_ramp(start, start + n, ramp_steps)

    def shrink(self, to: int) -> None:
        """Keep the first ``to`` features; zero the others (weight, bias, gradients).

        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        to = check_int("to", to)
        if to > self.features:
            raise ValueError(f"cannot shrink features from {self.features} to {to}; use grow to widen")
        self.resize("features", to)

    def _after_shrink(self, width: str, new: int, old: int) -> None:
        with torch.no_grad():
            self._ramp[new:old].zero_()
            self._ramp_rate[new:old].zero_()

    @torch.no_grad()
    def ramp_step(self) -> None:
        """Advance the ramp of features that entered with ``init="zero_out"`` by one step (no-op without one)."""
        if not self._ramping:
            return
        self._ramp.add_(self._ramp_rate).clamp_(max=1.0)
        self._ramp_left -= 1
        if self._ramp_left <= 0:
            self._end_ramp()

    @property
    def ramping(self) -> bool:
        """Whether features are still ramping in."""
        return self._ramping

    def _end_ramp(self) -> None:
        with torch.no_grad():
            self._ramp.zero_()
            self._ramp[: self.features].fill_(1.0)
            self._ramp_rate.zero_()
        self._ramping = False
        self._ramp_left = 0

    # ---- state ------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        if self._ramping:
            n = self.features
            state["ramp"] = {
                "left": self._ramp_left,
                "factor": self._ramp[:n].detach().clone(),
                "rate": self._ramp_rate[:n].detach().clone(),
            }
        return state

    def _set_widths(self, widths, extra: Any = None) -> None:
        super()._set_widths(widths, extra)
        self._end_ramp()
        ramp = extra.get("ramp") if isinstance(extra, dict) else None
        if ramp:
            n = self.features
            self._ramp[:n].copy_(ramp["factor"])
            self._ramp_rate[:n].copy_(ramp["rate"])
            self._ramp_left = int(ramp["left"])
            self._ramping = True

    # ---- forward ------------------------------------------------------------------------
    def _affine(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        n = self._active_features
        weight = None if self.weight is None else self.weight.narrow(0, 0, n)
        bias = None if self.bias is None else self.bias.narrow(0, 0, n)
        return weight, bias

    def _check_input(self, input: Tensor) -> None:
        if input.dim() == 0 or input.shape[-1] != self._active_features:
            got = "a 0-d tensor" if input.dim() == 0 else f"shape {tuple(input.shape)}"
            raise ValueError(
                f"{type(self).__name__} expected input of shape (..., {int(self._active_features)}) (its active "
                f"features), got {got}; grow or shrink the norm with its width"
            )


class GrowLayerNorm(_GrowNorm):
    r"""A :class:`torch.nn.LayerNorm` over the last dimension whose width grows in place.

    Args:
        normalized_shape: the active width (an int or a 1-tuple).
        eps, elementwise_affine, bias, device, dtype: as for :class:`torch.nn.LayerNorm`.
        capacity: the allocated width (default: ``normalized_shape``).
    """

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        capacity: Optional[int] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, capacity, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            self._check_input(input)
        weight, bias = self._affine()
        n = self._active_features
        if not self._ramping:
            return F.layer_norm(input, (n,), weight, bias, self.eps)
        r = self._ramp.narrow(0, 0, n).to(input.dtype)
        total = r.sum().clamp_min(torch.finfo(r.dtype).tiny)  # every factor 0 (a shrink kept only new features): output 0
        mean = (input * r).sum(-1, keepdim=True) / total
        centred = input - mean
        var = (centred * centred * r).sum(-1, keepdim=True) / total
        y = centred * torch.rsqrt(var + self.eps)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y * r

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"capacity={self.capacity_features}"
        )


class GrowRMSNorm(_GrowNorm):
    r"""A :class:`torch.nn.RMSNorm` over the last dimension whose width grows in place.

    Args:
        normalized_shape: the active width (an int or a 1-tuple).
        eps, elementwise_affine, device, dtype: as for :class:`torch.nn.RMSNorm`
            (``eps=None``: the machine epsilon of the input's dtype).
        capacity: the allocated width (default: ``normalized_shape``).
    """

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        capacity: Optional[int] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, capacity, device, dtype)

    def _layout(self) -> Layout:
        return {"weight": (((self._capacities["features"], "features"),),)}

    def forward(self, input: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            self._check_input(input)
        weight, _ = self._affine()
        n = self._active_features
        if not self._ramping:
            return F.rms_norm(input, (n,), weight, self.eps)
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        r = self._ramp.narrow(0, 0, n).to(input.dtype)
        ms = (input * input * r).sum(-1, keepdim=True) / r.sum().clamp_min(torch.finfo(r.dtype).tiny)
        y = input * torch.rsqrt(ms + eps)
        if weight is not None:
            y = y * weight
        return y * r

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"capacity={self.capacity_features}"
        )


def ramp_step(module: nn.Module) -> None:
    """Advance the ramp of every growable norm in ``module`` (itself included) by one step."""
    for m in module.modules():
        if isinstance(m, _GrowNorm):
            m.ramp_step()
