"""Arithmetic on parameter dicts ``{name: Tensor}``, the form ``torch.func.functional_call`` takes.

Points θ, directions d and gradients g in parameter space are dicts of tensors with the model's
parameter names and shapes. Every function returns fresh tensors and never modifies its inputs.
``dot``, ``cosine`` and ``flatten`` also take a ``Direction`` (``lossatlas.probes.directions``) and
read its ``tensors``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]


def _tensors(x: Any) -> Mapping[str, Tensor]:
    """The dict behind ``x`` (a dict itself, or a Direction's ``tensors``)."""
    return x.tensors if hasattr(x, "tensors") else x


def axpy(a: float, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """a·x + y, over the names of ``y`` (θ + α·d is ``axpy(α, d, θ)``)."""
    return {k: a * x[k] + y[k] for k in y}


def scale(x: Mapping[str, Tensor], a: float | Tensor) -> Params:
    """a·x for a scalar a."""
    return {k: v * a for k, v in x.items()}


def multiply(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """The elementwise product x ⊙ y, over the names of ``x``."""
    return {k: x[k] * y[k] for k in x}


def l2_norm(x: Mapping[str, Tensor]) -> Tensor:
    """‖x‖₂ = (Σ_k Σ_i x_k,i²)^½ over every tensor, a 0-d tensor in the tensors' dtype."""
    return torch.sqrt(sum((v * v).sum() for v in x.values()))


def dot(a: Any, b: Any, *, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """⟨a, b⟩ = Σ_k Σ_i a_k,i b_k,i over the floating tensors of ``a`` (None entries, unused gradients, skipped).

    In ``dtype`` (default float64, for reporting); ``dtype=None`` keeps the tensors' own dtype and
    the autograd graph (a directional derivative g·d inside a double backward). A 0-d tensor
    (the integer 0 when no tensor takes part).
    """
    ta, tb = _tensors(a), _tensors(b)
    keys = [k for k in ta if ta[k] is not None and ta[k].is_floating_point()]
    if dtype is None:
        return sum((ta[k] * tb[k]).sum() for k in keys)  # type: ignore[return-value]
    return sum((ta[k].to(dtype) * tb[k].to(dtype)).sum() for k in keys)  # type: ignore[return-value]


def cosine(a: Any, b: Any) -> float:
    """⟨a, b⟩/(‖a‖‖b‖) in float64 (0 when either is zero; ≈ 0 for two random dicts in high dimension)."""
    na, nb = float(dot(a, a)) ** 0.5, float(dot(b, b)) ** 0.5
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(dot(a, b)) / (na * nb)


def flatten(x: Any, names: Sequence[str]) -> Tensor:
    """The tensors ``names`` of ``x`` concatenated into one flat vector, shape (P,)."""
    t = _tensors(x)
    return torch.cat([t[n].reshape(-1) for n in names])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """A flat vector (P,) cut into tensors with the names, shapes, dtype and device of ``like``."""
    total = sum(t.numel() for t in like.values())
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(f"a flat vector of {total} entries is needed (the model's size), "
                         f"got shape {tuple(vector.shape)}")
    out, i = {}, 0
    for n, t in like.items():
        out[n] = vector[i : i + t.numel()].reshape(t.shape).to(dtype=t.dtype, device=t.device)
        i += t.numel()
    return out


def linear_combination(
    base: Mapping[str, Tensor], coefficients: Sequence[float], directions: Sequence[Mapping[str, Tensor]],
    names: Sequence[str] | None = None,
) -> Params:
    """θ + Σ_k c_k d_k over ``names`` (default: every name of ``base``).

    A direction lacking a name leaves that tensor alone; the terms are added in the order of
    ``directions``, so a point's bits do not depend on which other points are computed.
    """
    out = {}
    for k in base if names is None else names:
        t = base[k]
        for c, d in zip(coefficients, directions):
            if k in d:
                t = t + float(c) * d[k]
        out[k] = t
    return out


__all__ = ["Params", "axpy", "scale", "multiply", "l2_norm", "dot", "cosine", "flatten", "unflatten",
           "linear_combination"]
