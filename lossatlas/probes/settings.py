"""Choices shared by the probes and the runner: train/eval modes, dtypes by name, and the setting checks.

``MODES`` is the curvature engine's (the module's train/eval flag while it is evaluated). ``DTYPES``
names every dtype a checkpoint can be loaded in; the hessian probe computes in ``COMPUTE_DTYPES``
only (half precision is too coarse for Lanczos).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from lossatlas.checks import check_choice
from lossatlas.curvature import MODES

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")


def check_finite_number(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
                        optional: bool = False, prefix: str = "") -> Any:
    """Return ``value`` if it is a finite real number (≥ ``minimum``, or > it when ``strict``), else raise ValueError.

    None passes when ``optional``; NaN, ±inf and bools are refused.
    """
    if optional and value is None:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{prefix}{name} must be a finite number{bound}{' or None' if optional else ''}, got {value!r}")
    return value


def check_nonneg_int(name: str, value: Any, *, optional: bool = False, prefix: str = "") -> Any:
    """Return ``value`` if it is an integer ≥ 0 (a seed, a step), else raise ValueError; None passes when ``optional``."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{prefix}{name} must be an integer >= 0{' or None' if optional else ''}, got {value!r}")
    return value


__all__ = ["MODES", "DTYPES", "COMPUTE_DTYPES", "check_choice", "check_finite_number", "check_nonneg_int"]
