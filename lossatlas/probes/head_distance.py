"""‖H_A − H_B‖₂: how far apart two groups' classifier-head Hessians are (Hemati et al. 2023).

Hessian alignment across domains bounds transfer by the spectral norm of the difference of the two
domains' Hessians of the classifier head. A function on any model and two lists of batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lossatlas.batches import as_batches
from lossatlas.curvature import make_operator
from lossatlas.probes.spectrum import TOL, top_eigenpairs


class _Difference:
    """v ↦ A v − B v for two operators on the same parameters."""

    def __init__(self, A: Any, B: Any) -> None:
        if tuple(A.shape) != tuple(B.shape):
            raise ValueError(f"operators differ in shape: {tuple(A.shape)} vs {tuple(B.shape)}")
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.A @ V - self.B @ V


def last_linear_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the model's last ``nn.Linear`` (the classifier head)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    found: list[str] = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            names = [f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)]
            names = [n for n in names if n in trainable]
            if names:
                found = names
    if not found:
        raise ValueError("the model has no trainable nn.Linear layer; pass params=[names] for the head")
    return found


def head_hessian_distance(
    model: nn.Module,
    batches_a: Any,
    batches_b: Any,
    loss: str = "cross_entropy",
    *,
    params: None | str | Sequence[str] = None,
    curvature: str = "hessian",
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    tol: float = TOL,
    max_iter: int | None = None,
    seed: int = 0,
) -> float:
    """‖H_A − H_B‖₂: the spectral norm of the difference of two groups' classifier-head Hessians.

    H_A, H_B are the Hessians of the mean loss over ``batches_a`` and ``batches_b`` restricted to
    the last linear layer's parameters (or ``params``); the norm is the largest-magnitude eigenvalue
    of the symmetric difference operator v ↦ H_A v − H_B v, by Lanczos ``which="LM"`` (largest magnitude:
    the difference is indefinite).
    """
    names = last_linear_parameters(model) if params is None else params
    kw = dict(params=names, mode=mode, dtype=dtype)
    op_a = make_operator(curvature, model, as_batches(batches_a), loss, **kw)
    op_b = make_operator(curvature, model, as_batches(batches_b), loss, **kw)
    res = top_eigenpairs(_Difference(op_a, op_b), 1, which="LM", tol=tol, max_iter=max_iter, seed=seed,
                         return_eigenvectors=False)
    return float(abs(res.eigenvalues[0]))


__all__ = ["head_hessian_distance", "last_linear_parameters"]
