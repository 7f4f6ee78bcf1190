"""``GrowLinear``: a linear layer whose active width changes in place."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from . import ops, protocol, sharded
from ._checks import check_int

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
# Growth writes new neurons into `weight` and keeps what lies outside the active block zero; a
# reparametrized weight is recomputed from another tensor, so neither would hold. Refused.
_PARAMETRIZED = (
    "GrowLinear does not support parametrizations of its {name} (torch.nn.utils.parametrize, weight_norm, "
    "spectral_norm, torch.nn.utils.prune): growth writes new neurons into the weight itself and keeps everything outside the active "
    "block zero, which a recomputed weight would not keep (new neurons would output 0, or NaN under weight_norm). "
    "Reparametrize inside your own module instead, e.g. normalise layer.active_weight in its forward"
)


def he_std(fan_in: int) -> float:
    """He (Kaiming normal) standard deviation for a ReLU layer of the given fan-in."""
    return math.sqrt(2.0 / fan_in)


def _register(param: Tensor, layer: "GrowLinear") -> None:
    protocol.register_owner(param, layer)


def _holders(param: Tensor) -> list["GrowLinear"]:
    """The live growable modules that hold ``param`` as one of their Parameters now."""
    return protocol.holders(param)


class _Owner:
    """Kept so that whole models pickled by growdense 0.1 (which stored one on each
    Parameter) still unpickle; it does nothing."""

    __slots__ = ("ref",)

    def __init__(self, *args) -> None:
        self.ref = None

    def __setstate__(self, state) -> None:
        self.ref = None


active_block = protocol.active_block


def _block_in(layer: "GrowLinear", param: Tensor) -> Optional[tuple[slice, ...]]:
    params = layer._parameters
    if params["weight"] is param:
        return (slice(0, layer._active_out), slice(0, layer._active_in))
    if params.get("bias") is param:
        return (slice(0, layer._active_out),)
    return None


_check_count = check_int


_WEIGHT_SPEC = protocol.TensorSpec(
    "weight",
    (protocol.Axis(0, "out", protocol.PRODUCER), protocol.Axis(1, "in", protocol.CONSUMER)),
    normal=ops.block_normal_,
)
_BIAS_SPEC = protocol.TensorSpec("bias", (protocol.Axis(0, "out", protocol.PRODUCER),), fill=0.0)
_SPEC_BIAS = protocol.GrowthSpec(("in", "out"), (_WEIGHT_SPEC, _BIAS_SPEC))
_SPEC_NO_BIAS = protocol.GrowthSpec(("in", "out"), (_WEIGHT_SPEC,))


class GrowLinear(nn.Module):
    r"""A linear layer, ``y = act(x W^T + b)``, whose widths grow and shrink in place.

    ``weight`` (``capacity_out x capacity_in``) and ``bias`` (``capacity_out``) are
    allocated once; only the block ``weight[:out_features, :in_features]`` is used.
    Everything outside it is zero (weights, bias and their gradients), so growing and
    shrinking never reallocate: the Parameters stay the same objects and an optimizer
    built on them keeps working.

    The layer's own ``grow_out``/``grow_in``/``shrink_out``/``shrink_in`` change the layer
    only (weights, bias, their gradients), not an optimizer's state for them. In a model
    that trains, change its widths through a :class:`~growdense.Wiring` built with the
    optimizer, which edits the Parameters, their gradients and the optimizer state
    together (without it, a removed slice keeps its moments: a torch optimizer stepping
    the whole tensor moves the zeroed weights again, a regrown slice starts from the old
    moments). The other growable modules' methods behave the same way.

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
        self.reset_parameters()

    # ---- the growable-module protocol (see growdense.protocol) ---------------------
    def growth_spec(self) -> protocol.GrowthSpec:
        """Rows (and bias) ride width ``"out"`` as producer; columns ride ``"in"`` as consumer."""
        return _SPEC_BIAS if self._parameters.get("bias") is not None else _SPEC_NO_BIAS

    def active_width(self, width: str) -> int:
        """The active count of module-local width ``"in"`` or ``"out"``."""
        return int(self._active_in) if width == "in" else int(self._active_out)

    def set_active_width_(self, width: str, units: int) -> None:
        if width == "in":
            self._active_in = units
        elif width == "out":
            self._active_out = units
        else:
            raise KeyError(f"GrowLinear has widths 'in' and 'out', not {width!r}")

    def _growth_block(self, param: Tensor) -> Optional[tuple[slice, ...]]:
        return _block_in(self, param)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        super().register_parameter(name, param)
        if param is not None:  # `layer.weight = p` comes through here too
            _register(param, self)

    def _register_owner(self) -> None:
        """Let :func:`active_block` find this layer from its Parameters."""
        for param in self._parameters.values():
            if param is not None:
                param.__dict__.pop("_growdense_owner", None)  # left by growdense 0.1 pickles
                _register(param, self)

    def __delattr__(self, name: str) -> None:
        # torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal, your own) starts by
        # deleting the tensor it wraps: refused here, before the module changes.
        if name in ("weight", "bias") and name in self._parameters:
            raise RuntimeError(_PARAMETRIZED.format(name=name))
        super().__delattr__(name)

    def _check_not_shared(self) -> None:
        """Refuse to resize a layer whose weight or bias another GrowLinear holds too, or that is
        not its own plain Parameters any more (a parametrization or the old hook-based
        ``torch.nn.utils.weight_norm`` / ``spectral_norm`` removed them)."""
        if "weight" not in self._parameters or torch.nn.utils.parametrize.is_parametrized(self):
            raise RuntimeError(_PARAMETRIZED.format(name="weight"))
        for name, param in self._parameters.items():
            if param is not None and len(_holders(param)) > 1:
                raise RuntimeError(
                    f"this GrowLinear shares its {name} with another GrowLinear; resizing one would break "
                    f"the other (its active block would no longer match the tensor): give each layer its "
                    f"own Parameters to grow or shrink them"
                )

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle come through here
        super().__setstate__(state)
        for name in _WIDTH_ATTRS:
            value = self.__dict__.get(name)
            if isinstance(value, int) and type(value) is not _Width:
                self.__dict__[name] = _Width(int(value))
        self._register_owner()

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double() may replace Parameters
        protocol.forget_owners(self.parameters())  # or swap them in place (DTensors): no weak references then
        try:
            return super()._apply(fn, recurse)
        finally:
            self._register_owner()

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
        if name in _WIDTH_ATTRS and isinstance(value, int):
            if type(value) is not _Width:
                value = _Width(int(value))  # DynamicInt's arithmetic returns DynamicInt
            if name in self.__dict__:  # a plain attribute already: nn.Module's checks have nothing to do
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    def forward(self, input: Tensor) -> Tensor:
        # torch.compile and torch.func see the composite formula, aten ops on views of the
        # active block: the op's int widths would specialise a compiled graph to one width
        # (the widths are DynamicInts, symbolic under compile, so one graph serves them
        # all and inductor fuses bias and activation itself), and functorch transforms
        # cannot run the op's C++ autograd. The op checks its arguments itself; the
        # descriptive errors below are built only when it refuses them.
        if torch.compiler.is_compiling() or _functorch_active():
            return ops.composite_linear(
                input, self.weight, self.bias, self._active_in, self._active_out, self.activation
            )
        try:
            return _linear_op(input, self.weight, self.bias, self._active_in, self._active_out, self.activation)
        except (RuntimeError, TypeError, ValueError):
            if isinstance(input, Tensor):
                self._check_input(input)
            raise

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
    def _check_grow(self, side: str, n: int, active: int, capacity: int) -> int:
        n, active, capacity = _check_count("n", n), int(active), int(capacity)  # messages in plain ints
        if n < 0:
            raise ValueError(f"cannot grow {side} by {n}: n must be >= 0 (use shrink_{side[:-9]}() to shrink)")
        if active + n > capacity:
            raise ValueError(
                f"cannot grow {side} from {active} to {active + n}: capacity is {capacity}; "
                f"construct the layer with a capacity of at least {active + n}"
            )
        self._check_not_shared()
        return n

    def _check_shrink(self, side: str, to: int, active: int) -> int:
        to, active = _check_count("to", to), int(active)  # messages in plain ints
        if not 1 <= to <= active:
            raise ValueError(
                f"cannot shrink {side} from {active} to {to}: the new width must be between 1 and {active}"
                + ("; use grow to widen" if to > active else "")
            )
        self._check_not_shared()
        return to

    def _agree(self, what: str, call: dict, generator: Optional[torch.Generator] = None) -> None:
        """Under FSDP2 (DTensor Parameters), that every rank makes this change from the same widths.

        A collective (:func:`growdense.sharded.agree`), so it runs before any check that
        could raise on one rank only: the ranks then raise together, and nothing changes.
        """
        if not sharded.is_sharded(self.weight):
            return
        problem = None
        try:
            sharded.check_supported([t for t in (self.weight, self.bias) if t is not None])
        except NotImplementedError as error:
            problem = str(error)
        widths = {"in_features": (self._active_in, self.capacity_in),
                  "out_features": (self._active_out, self.capacity_out)}
        sharded.agree(self.weight, f"{what} of a sharded GrowLinear", {k: repr(v) for k, v in call.items()}, widths,
                      generator, problem)

    @torch.no_grad()
    def grow_out(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` output neurons with zero bias.

        ``init`` sets the new rows: ``"he"`` draws He-normal incoming weights (fan_in =
        ``in_features``); ``"zero"`` leaves them zero (for a caller that writes them itself).
        Changes this layer only, not an optimizer's state (see the class docstring).
        """
        self._agree("grow out_features", {"n": n, "init": init}, generator if init == "he" else None)
        if init not in INPUT_INITS:
            raise ValueError(f"unknown init {init!r} for new output rows; expected one of {INPUT_INITS}")
        n = self._check_grow("out_features", n, self._active_out, self.capacity_out)
        start, stop = self._active_out, self._active_out + n
        if init == "he":
            index = (slice(start, stop), slice(0, self._active_in))  # sharded.normal_: a DTensor's local rows too
            sharded.normal_(ops.block_normal_, self.weight, index, he_std(self._active_in), generator)
        self._active_out = stop

    @torch.no_grad()
    def grow_in(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` input features.

        ``init`` sets the new columns: ``"he"`` draws He-normal values with fan_in the new
        ``in_features`` (as the study did); ``"zero"`` leaves them zero, so the layer's
        output is exactly unchanged for any value of the new inputs.
        Changes this layer only, not an optimizer's state (see the class docstring).
        """
        self._agree("grow in_features", {"n": n, "init": init}, generator if init == "he" else None)
        if init not in INPUT_INITS:
            raise ValueError(f"unknown init {init!r} for new input columns; expected one of {INPUT_INITS}")
        n = self._check_grow("in_features", n, self._active_in, self.capacity_in)
        start, stop = self._active_in, self._active_in + n
        if init == "he":
            index = (slice(0, self._active_out), slice(start, stop))
            sharded.normal_(ops.block_normal_, self.weight, index, he_std(stop), generator)
        self._active_in = stop

    @torch.no_grad()
    def shrink_out(self, to: int) -> None:
        """Keep the first ``to`` output neurons; zero the others (weights, bias, gradients).

        Changes this layer only, not an optimizer's state (see the class docstring).
        """
        self._agree("shrink out_features", {"to": to})
        to = self._check_shrink("out_features", to, self._active_out)
        for tensor in self._with_grads():
            sharded.narrow(tensor, 0, to, self._active_out - to).zero_()
        self._active_out = to

    @torch.no_grad()
    def shrink_in(self, to: int) -> None:
        """Keep the first ``to`` input features; zero the other columns (weights, gradients).

        Changes this layer only, not an optimizer's state (see the class docstring).
        """
        self._agree("shrink in_features", {"to": to})
        to = self._check_shrink("in_features", to, self._active_in)
        for tensor in (self.weight, self.weight.grad):
            if tensor is not None:
                sharded.narrow(tensor, 1, to, self._active_in - to).zero_()
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
        """Set the active widths from :meth:`get_extra_state`'s dict; what leaves the block is zeroed."""
        widths = self._widths_from_extra_state(state)
        with torch.no_grad():
            self._set_widths_zeroing_outside(*widths)

    def _widths_from_extra_state(self, state: Any) -> tuple[int, int]:
        if not isinstance(state, dict) or "in_features" not in state or "out_features" not in state:
            raise ValueError(f"GrowLinear extra state must be a dict with in_features and out_features, got {state!r}")
        try:
            active_in = check_int("in_features", state["in_features"])
            active_out = check_int("out_features", state["out_features"])
        except TypeError as error:
            raise ValueError(f"GrowLinear extra state: {error}") from None
        if not (1 <= active_in <= self.capacity_in and 1 <= active_out <= self.capacity_out):
            raise ValueError(
                f"checkpoint widths {active_in}->{active_out} do not fit this layer's capacity "
                f"{self.capacity_in}->{self.capacity_out}"
            )
        return active_in, active_out

    def _set_widths_zeroing_outside(self, active_in: int, active_out: int) -> None:
        """Set the widths and zero everything outside the new block (weights and gradients)."""
        self._active_in, self._active_out = active_in, active_out
        for name, param in self._parameters.items():
            if param is None:
                continue
            for tensor in (param, param.grad):
                if tensor is None:
                    continue
                sharded.narrow(tensor, 0, active_out, tensor.shape[0] - active_out).zero_()  # DTensors: local rows
                if name == "weight":
                    sharded.part(tensor, (slice(0, active_out), slice(active_in, None))).zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # nn.Linear's semantics (missing and unexpected keys, partial states, assign=True),
        # except that a layer whose tensors do not fit is left as it was (load_state_dict
        # then raises). nn.Module always passes strict=True here and applies the caller's
        # `strict` afterwards, so within a container a missing key is reported after the
        # present ones were loaded, as for nn.Linear; GrowLinear.load_state_dict checks its
        # keys first.
        #
        # A state_dict with extra state is a GrowLinear's: its tensors have the capacity
        # shapes and it sets the active widths. One without is an nn.Linear's: its tensors
        # are the active block. Tensors absent from a partial state (strict=False) keep
        # their values, except what falls outside the new active block, which is zeroed.
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        extra_key = prefix + "_extra_state"
        names = [name for name, param in self._parameters.items() if param is not None]
        present = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        missing = [prefix + name for name in names if name not in present]
        unexpected = []
        if strict:
            unexpected = [
                key for key in state_dict
                if key.startswith(prefix) and key != extra_key and key[len(prefix):] not in names
            ]
        missing_keys.extend(missing)
        unexpected_keys.extend(unexpected)
        errors = []
        if extra_key in state_dict:
            try:
                widths = self._widths_from_extra_state(state_dict[extra_key])
            except ValueError as error:
                error_msgs.append(f"{prefix}_extra_state: {error}")
                return
            shapes = {name: param.shape for name, param in self._parameters.items() if param is not None}
            what = "capacity"
        else:
            widths = (self._active_in, self._active_out)
            shapes = {"weight": self.active_weight.shape}
            if self.bias is not None:
                shapes["bias"] = self.active_bias.shape
            what = "active size (an nn.Linear state_dict)"
        for name, value in present.items():
            if not isinstance(value, Tensor) or value.shape != shapes[name]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                errors.append(
                    f"size mismatch for {prefix}{name}: the checkpoint has {shape} but this layer's {what} "
                    f"is {tuple(shapes[name])} (capacity {self.capacity_in}->{self.capacity_out}); "
                    f"construct GrowLinear with capacity_in/capacity_out matching the checkpoint"
                )
        if errors:
            error_msgs.extend(errors)
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            for name, value in present.items():
                param = self._parameters[name]
                if extra_key in state_dict:
                    if assign:
                        self._assign(name, value)
                    else:
                        param.copy_(value)
                elif assign and value.shape != param.shape:
                    # An active-size tensor cannot be the capacity-sized Parameter: a new
                    # capacity tensor on the value's device and dtype holds it.
                    full = torch.zeros(param.shape, device=value.device, dtype=value.dtype)
                    full[tuple(slice(0, n) for n in value.shape)] = value
                    self._assign(name, full)
                elif assign:
                    self._assign(name, value)
                else:
                    param[tuple(slice(0, n) for n in value.shape)] = value
            self._set_widths_zeroing_outside(*widths)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`; with ``strict=True`` wrong keys raise before anything changes.

        A GrowLinear's own state_dict (with ``_extra_state``) sets the active widths and
        has the capacity shapes; an :class:`torch.nn.Linear`'s fills the active block.
        With ``strict=False`` the tensors it lacks keep their values (whatever falls
        outside the new active block is zeroed).
        """
        if strict and isinstance(state_dict, Mapping):
            names = [name for name, param in self._parameters.items() if param is not None]
            missing = [name for name in names if name not in state_dict]
            unexpected = [key for key in state_dict if key not in names and key != "_extra_state"]
            if missing or unexpected:
                msgs = []
                if missing:
                    msgs.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
                if unexpected:
                    msgs.append("Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(msgs))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _assign(self, name: str, value: Tensor) -> None:
        """``load_state_dict(..., assign=True)``: ``value`` becomes the Parameter, as in nn.Module."""
        old = self._parameters[name]
        if isinstance(value, nn.Parameter):
            value.requires_grad_(old.requires_grad)
        else:
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(self, name, value)

    def extra_repr(self) -> str:
        return (
            f"in_features={self._active_in}, out_features={self._active_out}, "
            f"capacity_in={self.capacity_in}, capacity_out={self.capacity_out}, "
            f"bias={self.bias is not None}, activation={self.activation}"
        )
