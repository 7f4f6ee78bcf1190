"""Every private torch interface the Python package uses, each behind a version check.

growdense supports ``torch>=2.11,<2.16``. Within that range the private interfaces below
are known to behave as used here; outside it, or if one is missing, the public fallback
next to it is used instead (same results, possibly slower). Nothing else in the Python
package may reach into torch's private names.

Underscored names used elsewhere, which are not version-dependent internals: the
``nn.Module`` extension points ``_apply`` and ``_load_from_state_dict`` and the
``_parameters`` dict (``layers.py``), ``torch._check`` and
``torch._C._dispatch_has_kernel_for_dispatch_key`` (``ops.py``), and ``Tensor._version``,
the counter of in-place writes that autograd keeps (``wiring.py``, ``gradient_growth.py``).

Uses gated here:

- ``_init_group`` of ``torch.optim.Adam`` (and AdamW), ``RAdam``, ``Adamax`` and
  ``Adagrad``: their ``step`` calls it to build the lists of parameters, gradients and
  state that it hands to their functional form; :mod:`growdense.optim` overrides it to
  hand over views of the active blocks, one per age of neuron. Fallback for Adam and
  AdamW: :mod:`growdense.optim` builds the lists itself and calls the public functional
  ``torch.optim.adam.adam`` from its own ``step``. Fallback for the others: they behave
  exactly as torch's own (whole tensors, one step count per Parameter), and growing
  under ``optimizer_state="keep"`` is refused with an error saying why.
"""

from __future__ import annotations

import inspect
import re

import torch

__all__ = ["TESTED_TORCH", "torch_version", "in_tested_range", "INIT_GROUP", "ADAM_INIT_GROUP"]

#: The torch versions (``>=``, ``<``) whose private interfaces below were checked.
TESTED_TORCH = ((2, 11), (2, 16))


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``"2.14.1+cu130"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def in_tested_range(version: str = torch.__version__) -> bool:
    """Whether ``version`` is in :data:`TESTED_TORCH`."""
    low, high = TESTED_TORCH
    return low <= torch_version(version) < high


_INIT_GROUP_ARGS = {
    "Adam": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"],
    "RAdam": ["exp_avgs", "exp_avg_sqs", "state_steps"],
    "Adamax": ["exp_avgs", "exp_infs", "state_steps"],
    "Adagrad": ["state_sums", "state_steps"],
}


def _init_group_usable(name: str) -> bool:
    if not in_tested_range():
        return False
    method = getattr(getattr(torch.optim, name, None), "_init_group", None)
    if method is None:
        return False
    try:
        params = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return params[:3] == ["self", "group", "params_with_grad"] and params[3:] == ["grads"] + _INIT_GROUP_ARGS[name]


#: For each of torch's optimizers that :mod:`growdense.optim` extends: whether its
#: ``step`` is known to build its lists through ``_init_group(group, params_with_grad,
#: grads, <its state lists>..., state_steps)``, the last list holding the step counts,
#: so that overriding that method is enough.
INIT_GROUP: dict[str, bool] = {name: _init_group_usable(name) for name in _INIT_GROUP_ARGS}

#: ``INIT_GROUP["Adam"]`` (Adam and AdamW).
ADAM_INIT_GROUP: bool = INIT_GROUP["Adam"]
