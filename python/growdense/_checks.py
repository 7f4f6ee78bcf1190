"""Argument checks shared by every public entry point.

Integers: anything :func:`operator.index` accepts (``int``, NumPy integer scalars such as
``np.int64``) except booleans (``True``, ``np.bool_``) and tensors, and it comes back as a
plain Python ``int``. ``1.5``, ``2.0``, ``"3"`` and ``True`` are refused with a
``TypeError``: a width or a count must be an integer, and a boolean is almost always a
mistake. Tensors are refused so that a count never costs a device synchronisation (pass
``int(t)``).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np
import torch

__all__ = ["check_int", "check_nonnegative_real"]


def check_int(what: str, value: Any) -> int:
    """``value`` as a Python ``int``; ``TypeError`` naming ``what`` unless it is a non-bool integer."""
    if type(value) is int:  # the common case, fast
        return value
    if not isinstance(value, (bool, np.bool_, torch.Tensor)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {value!r} of type {type(value).__name__}")


def check_nonnegative_real(what: str, value: Any) -> float:
    """``value`` as a ``float``; ``TypeError`` unless a real number, ``ValueError`` unless finite and >= 0."""
    if isinstance(value, (bool, np.bool_, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return value
