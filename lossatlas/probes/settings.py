"""Choices shared by the probes and the runner: train/eval modes, dtypes by name, and their check.

``MODES`` is the curvature engine's (the module's train/eval flag while it is evaluated). ``DTYPES``
names every dtype a checkpoint can be loaded in; the hessian probe computes in ``COMPUTE_DTYPES``
only (half precision is too coarse for Lanczos).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lossatlas.curvature import MODES
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")


def check_choice(name: str, value: Any, choices: Sequence[Any], *, prefix: str = "") -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming the choices.

    ``prefix`` (e.g. ``"hessian: "``) says which probe refused it.
    """
    if value not in choices:
        raise ValueError(f"{prefix}unknown {name} {value!r}; {name} must be one of {', '.join(map(str, choices))}")
    return value


__all__ = ["MODES", "DTYPES", "COMPUTE_DTYPES", "check_choice"]
