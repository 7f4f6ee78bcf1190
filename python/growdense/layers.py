"""``GrowLinear``: a linear layer whose active width changes in place."""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

try:
    from torch.fx.experimental.sym_node import DynamicInt
except ImportError:  # pragma: no cover - older torch: widths specialise under torch.compile
    DynamicInt = int


class _Width(DynamicInt):
    """An active width: an int to eager code, a dynamic size to torch.compile.

    Prints and pickles as a plain int (a checkpoint never holds this type).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return int.__repr__(self)

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return int.__format__(int(self), spec)

    def __reduce__(self):
        return (int, (int(self),))

__all__ = ["GrowLinear", "INPUT_INITS", "active_block"]

INPUT_INITS = ("he", "zero")
_linear_op = torch.ops.growdense.linear.default  # ops.linear without its Python wrapper
_functorch_active = ops._functorch_active
# The active widths, stored as DynamicInt so that a torch.compile'd model traces them as
# symbolic sizes: one graph serves every width (see GrowLinear.forward).
_WIDTH_ATTRS = frozenset(("_active_in", "_active_out"))
_EXTRA_STATE_VERSION = 1


def he_std(fan_in: int) -> float:
    """He (Kaiming normal) standard deviation for a ReLU layer of the given fan-in."""
    return math.sqrt(2.0 / fan_in)


class _Owner:
    """A weak reference from a Parameter to its GrowLinear (``param._growdense_owner``).

    It lets code that holds only a Parameter (an optimizer) find the block in use: see
    :func:`active_block`. It pickles and copies as an empty reference: a copied or
    unpickled layer registers its own Parameters again.
    """

    __slots__ = ("ref",)

    def __init__(self, layer: Optional["GrowLinear"] = None) -> None:
        self.ref = None if layer is None else weakref.ref(layer)

    def __call__(self) -> Optional["GrowLinear"]:
        return None if self.ref is None else self.ref()

    def __reduce__(self):
        return (_Owner, ())

    def __deepcopy__(self, memo) -> "_Owner":
        return _Owner()


def active_block(param: Tensor) -> Optional[tuple[slice, ...]]:
    """The slices of ``param`` that its :class:`GrowLinear` uses now, or ``None``.

    ``(slice(0, out_features), slice(0, in_features))`` for a layer's ``weight``,
    ``(slice(0, out_features),)`` for its ``bias``; ``None`` for a tensor that is not a
    GrowLinear's Parameter. Everything outside the block is zero (the weights, their
    gradients and the optimizer state), which is what lets an optimizer step over the
    block only (:mod:`growdense.optim`).
    """
    owner = getattr(param, "_growdense_owner", None)
    layer = None if owner is None else owner()
    if layer is None:
        return None
    params = layer._parameters
    if params["weight"] is param:
        return (slice(0, layer._active_out), slice(0, layer._active_in))
    if params["bias"] is param:
        return (slice(0, layer._active_out),)
    return None


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


class GrowLinear(nn.Module):
    r"""A linear layer, ``y = act(x W^T + b)``, whose widths grow and shrink in place.

    ``weight`` (``capacity_out x capacity_in``) and ``bias`` (``capacity_out``) are
    allocated once; only the block ``weight[:out_features, :in_features]`` is used.
    Everything outside it is zero (weights, bias and their gradients), so growing and
    shrinking never reallocate: the Parameters stay the same objects and an optimizer
    built on them keeps working.

    With the capacities equal to the sizes it is a drop-in for :class:`torch.nn.Linear`
    (same initialisation, same output, loads its ``state_dict``), optionally with a
    fused activation.

    Args:
        in_features: active input width.
        out_features: active output width.
        bias: whether the layer has a bias.
        capacity_in: allocated input width (default: ``in_features``).
        capacity_out: allocated output width (default: ``out_features``).
        activation: ``None`` or one of ``"relu"``, ``"gelu"`` (exact, erf form, as
            :func:`torch.nn.functional.gelu`), ``"gelu_tanh"`` (its tanh approximation)
            and ``"silu"``, fused into the kernel.
        device, dtype: as for :class:`torch.nn.Linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        capacity_in: Optional[int] = None,
        capacity_out: Optional[int] = None,
        activation: Optional[str] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_features = _check_count("in_features", in_features)
        out_features = _check_count("out_features", out_features)
        capacity_in = in_features if capacity_in is None else _check_count("capacity_in", capacity_in)
        capacity_out = out_features if capacity_out is None else _check_count("capacity_out", capacity_out)
        for name, active, capacity in (
            ("in_features", in_features, capacity_in),
            ("out_features", out_features, capacity_out),
        ):
            if not 1 <= active <= capacity:
                raise ValueError(
                    f"{name}={active} must be between 1 and its capacity {capacity}; "
                    f"pass a capacity at least as large as the width"
                )
        self.activation = ops._activation_name(activation)
        self._active_in = in_features
        self._active_out = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((capacity_out, capacity_in), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(capacity_out, **factory))
        else:
            self.register_parameter("bias", None)
        self._register_owner()
        self.reset_parameters()

    def _register_owner(self) -> None:
        """Let :func:`active_block` find this layer from its Parameters."""
        for param in (self.weight, self.bias):
            if param is not None:
                param._growdense_owner = _Owner(self)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle come through here
        super().__setstate__(state)
        for name in _WIDTH_ATTRS:
            value = self.__dict__.get(name)
            if isinstance(value, int) and type(value) is not _Width:
                self.__dict__[name] = _Width(int(value))
        self._register_owner()

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double() may replace Parameters
        result = super()._apply(fn, recurse)
        self._register_owner()
        return result

    # ---- widths --------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """The active input width."""
        return int(self._active_in)

    @property
    def out_features(self) -> int:
        """The active output width."""
        return int(self._active_out)

    @property
    def capacity_in(self) -> int:
        return self.weight.shape[1]

    @property
    def capacity_out(self) -> int:
        return self.weight.shape[0]

    @property
    def active_weight(self) -> Tensor:
        """A view of the active block of ``weight`` (no copy)."""
        return self.weight[: self._active_out, : self._active_in]

    @property
    def active_bias(self) -> Optional[Tensor]:
        """A view of the active part of ``bias`` (no copy), or ``None``."""
        return None if self.bias is None else self.bias[: self._active_out]

    # ---- initialisation ------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the active block as :class:`torch.nn.Linear` does; zero the rest."""
        self.weight.zero_()
        nn.init.kaiming_uniform_(self.active_weight, a=math.sqrt(5))
        if self.bias is not None:
            self.bias.zero_()
            bound = 1.0 / math.sqrt(self._active_in)
            nn.init.uniform_(self.active_bias, -bound, bound)

    # ---- forward -------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WIDTH_ATTRS and type(value) is not _Width and isinstance(value, int):
            value = _Width(int(value))  # DynamicInt's arithmetic returns DynamicInt
        super().__setattr__(name, value)

    def forward(self, input: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._forward_traced(input)
        # The op checks its arguments itself; the descriptive errors below are built only
        # when it refuses them, so a call costs no more than the op's. torch.func
        # transforms cannot run the op's C++ autograd: they get the composite formula.
        if _functorch_active():
            return ops.composite_linear(
                input, self.weight, self.bias, self._active_in, self._active_out, self.activation
            )
        try:
            return _linear_op(input, self.weight, self.bias, self._active_in, self._active_out, self.activation)
        except (RuntimeError, TypeError, ValueError):
            if isinstance(input, Tensor):
                self._check_input(input)
            raise

    def _forward_traced(self, input: Tensor) -> Tensor:
        """The forward as torch.compile sees it: aten ops on views of the active block.

        The widths are symbolic there (they are DynamicInt), so the graph holds for every
        width and inductor fuses the bias and activation itself; the op's int arguments
        would specialise the graph to one width. Same values and gradients as the op
        (zero outside the block, through the views).
        """
        ai, ao = self._active_in, self._active_out
        # narrow, not [:ao]: a slice's bound check would tell width == capacity apart
        bias = None if self.bias is None else self.bias.narrow(0, 0, ao)
        y = F.linear(input, self.weight.narrow(0, 0, ao).narrow(1, 0, ai), bias)
        act = ops.ACTIVATION_FUNCTIONS[self.activation]
        return y if act is None else act(y)

    def _check_input(self, input: Tensor) -> None:
        if input.dim() == 0 or input.shape[-1] != self._active_in:
            got = "a 0-d tensor" if input.dim() == 0 else f"shape {tuple(input.shape)}"
            raise ValueError(
                f"GrowLinear expected input of shape (..., {self._active_in}) (its active in_features), "
                f"got {got}; grow or shrink the layer's inputs with grow_in()/shrink_in() to match"
            )
        # Under torch.autocast the op casts input and weight to the autocast dtype itself.
        if input.dtype != self.weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(
                f"GrowLinear got input of dtype {input.dtype} but its weight is {self.weight.dtype}; "
                f"convert one of them (e.g. input.to({self.weight.dtype}) or layer.to({input.dtype})), "
                f"or run the model under torch.autocast for mixed precision"
            )
        if input.device != self.weight.device:
            raise RuntimeError(
                f"GrowLinear got input on {input.device} but its weight is on {self.weight.device}; "
                f"move them to the same device"
            )

    # ---- growth and shrinking ------------------------------------------------
    def _check_grow(self, side: str, n: int, active: int, capacity: int) -> None:
        n = _check_count("n", n)
        if n < 0:
            raise ValueError(f"cannot grow {side} by {n}: n must be >= 0 (use shrink_{side[:-9]}() to shrink)")
        if active + n > capacity:
            raise ValueError(
                f"cannot grow {side} from {active} to {active + n}: capacity is {capacity}; "
                f"construct the layer with a capacity of at least {active + n}"
            )

    def _check_shrink(self, side: str, to: int, active: int) -> None:
        to = _check_count("to", to)
        if not 1 <= to <= active:
            raise ValueError(
                f"cannot shrink {side} from {active} to {to}: the new width must be between 1 and {active}"
                + ("; use grow to widen" if to > active else "")
            )

    @torch.no_grad()
    def grow_out(self, n: int, *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` output neurons: He-normal incoming weights (fan_in = ``in_features``), zero bias."""
        self._check_grow("out_features", n, self._active_out, self.capacity_out)
        start, stop = self._active_out, self._active_out + n
        ops.normal_block_(self.weight, (start, stop), (0, self._active_in), he_std(self._active_in), generator)
        self._active_out = stop

    @torch.no_grad()
    def grow_in(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` input features.

        ``init`` sets the new columns: ``"he"`` draws He-normal values with fan_in the new
        ``in_features`` (as the study did); ``"zero"`` leaves them zero, so the layer's
        output is exactly unchanged for any value of the new inputs.
        """
        if init not in INPUT_INITS:
            raise ValueError(f"unknown init {init!r} for new input columns; expected one of {INPUT_INITS}")
        self._check_grow("in_features", n, self._active_in, self.capacity_in)
        start, stop = self._active_in, self._active_in + n
        if init == "he":
            ops.normal_block_(self.weight, (0, self._active_out), (start, stop), he_std(stop), generator)
        self._active_in = stop

    @torch.no_grad()
    def shrink_out(self, to: int) -> None:
        """Keep the first ``to`` output neurons; zero the others (weights, bias, gradients)."""
        self._check_shrink("out_features", to, self._active_out)
        for tensor in self._with_grads():
            tensor[to : self._active_out].zero_()
        self._active_out = to

    @torch.no_grad()
    def shrink_in(self, to: int) -> None:
        """Keep the first ``to`` input features; zero the other columns (weights, gradients)."""
        self._check_shrink("in_features", to, self._active_in)
        for tensor in (self.weight, self.weight.grad):
            if tensor is not None:
                tensor[:, to : self._active_in].zero_()
        self._active_in = to

    def _with_grads(self) -> list[Tensor]:
        tensors = [self.weight, self.weight.grad]
        if self.bias is not None:
            tensors += [self.bias, self.bias.grad]
        return [t for t in tensors if t is not None]

    # ---- nn.Linear interop -----------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        capacity_in: Optional[int] = None,
        capacity_out: Optional[int] = None,
        activation: Optional[str] = None,
    ) -> "GrowLinear":
        """A ``GrowLinear`` holding a copy of ``linear``'s weights as its active block."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            capacity_in=capacity_in,
            capacity_out=capacity_out,
            activation=activation,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.active_weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.active_bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """An :class:`torch.nn.Linear` of the active size holding a copy of the active block."""
        w = self.weight
        linear = nn.Linear(self._active_in, self._active_out, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.active_weight)
            if self.bias is not None:
                linear.bias.copy_(self.active_bias)
        return linear

    # ---- state_dict ------------------------------------------------------------
    def get_extra_state(self) -> dict[str, int]:
        return {
            "version": _EXTRA_STATE_VERSION,
            "in_features": int(self._active_in),
            "out_features": int(self._active_out),
        }

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._active_in, self._active_out = self._widths_from_extra_state(state)

    def _widths_from_extra_state(self, state: Any) -> tuple[int, int]:
        if not isinstance(state, dict) or "in_features" not in state or "out_features" not in state:
            raise ValueError(f"GrowLinear extra state must be a dict with in_features and out_features, got {state!r}")
        active_in, active_out = int(state["in_features"]), int(state["out_features"])
        if not (1 <= active_in <= self.capacity_in and 1 <= active_out <= self.capacity_out):
            raise ValueError(
                f"checkpoint widths {active_in}->{active_out} do not fit this layer's capacity "
                f"{self.capacity_in}->{self.capacity_out}"
            )
        return active_in, active_out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Validates everything before changing anything, so a failed load leaves the
        # layer as it was. A state_dict without extra state is an nn.Linear's: its
        # tensors are the active block.
        extra_key = prefix + "_extra_state"
        names = ["weight"] + (["bias"] if self.bias is not None else [])
        present = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        for name in names:
            if name not in present:
                missing_keys.append(prefix + name)
        if self.bias is None and prefix + "bias" in state_dict:
            unexpected_keys.append(prefix + "bias")
        if extra_key in state_dict:
            try:
                widths = self._widths_from_extra_state(state_dict[extra_key])
            except ValueError as error:
                error_msgs.append(str(error))
                return
            targets = {"weight": self.weight, "bias": self.bias}
            what = "capacity"
        else:
            widths = (self._active_in, self._active_out)
            targets = {"weight": self.active_weight, "bias": self.active_bias}
            what = "active size (an nn.Linear state_dict)"
        for name, value in present.items():
            if not isinstance(value, Tensor) or value.shape != targets[name].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {prefix}{name}: the checkpoint has {shape} but this layer's {what} "
                    f"is {tuple(targets[name].shape)} (capacity {self.capacity_in}->{self.capacity_out}); "
                    f"construct GrowLinear with capacity_in/capacity_out matching the checkpoint"
                )
        if error_msgs:
            return
        with torch.no_grad():
            if extra_key not in state_dict:
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
            for name, value in present.items():
                targets[name].copy_(value)
        self._active_in, self._active_out = widths

    def extra_repr(self) -> str:
        return (
            f"in_features={self._active_in}, out_features={self._active_out}, "
            f"capacity_in={self.capacity_in}, capacity_out={self.capacity_out}, "
            f"bias={self.bias is not None}, activation={self.activation}"
        )
