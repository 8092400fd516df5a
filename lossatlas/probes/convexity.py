"""The convexity map of a 2-D (or 1-D) slice: the Hessian's extreme eigenvalues at points of the plane.

At every point θ(α, β) = θ* + α d_x + β d_y of a grid of the plane (the surface's directions), the largest
and smallest eigenvalues λ_max and λ_min of the Hessian ∇²L(θ(α, β)) of the mean loss, and the ratio

    r(α, β) = |λ_min / λ_max|,

near 0 where the loss is locally convex (or nearly so) and large where it has strong negative curvature
(Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets", §6 "Hessian
eigenvalues": the map of |λ_min/λ_max| over the filter-normalised plane, chaotic landscapes without skip
connections).

Cost: two Lanczos runs per point (``lossatlas.probes.spectrum.top_eigenpairs`` on
``lossatlas.curvature``'s Hessian operator, one Hessian-vector product per Lanczos step, each product a
forward and two backward passes over the data):

- λ_max: "LA" Lanczos on H, stopped when the Ritz residual ‖H y − θ y‖ is ≤ tol·|θ| (an eigenvalue lies
  within the residual of θ);
- λ_min: "LA" Lanczos on the shifted, negated operator B = s·I − H with s the λ_max found (the same Krylov
  space as H's, so the same products), whose largest eigenvalue is s − λ_min; stopped when its residual is
  ≤ tol·(s − λ_min), i.e. λ_min to within tol·(λ_max − λ_min) in absolute terms. A relative tolerance on
  λ_min itself would need the full Krylov space where λ_min ≈ 0 (a locally convex point); the map needs
  only the ratio, which this gets to within ≈ tol·(1 + r).

Both runs stop on the residual, not on the Kato–Temple eigenvalue bound (``criterion="eigenvalue"``): on B
the bottom of the spectrum (H's λ_max, where B ≈ 0) converges within two steps, so short runs at a loose
tolerance have few trustworthy neighbours, and the residual bound needs none.

Default tolerance ``TOL`` = 1e-2 (Li et al. read only the sign and the size of the ratio), at most
``MAX_ITER`` = 100 Lanczos steps per eigenvalue (capped at the parameter count).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.curvature import make_operator
from lossatlas.memory import compute_dtype
from lossatlas.probes.spectrum import top_eigenpairs
from lossatlas.progress import Reporter, report, reporting, task

TOL: float = 1e-2  # Lanczos stops when the Ritz residual is ≤ TOL × its scale (see the module docstring)
MAX_ITER: int = 100  # most Lanczos steps (Hessian-vector products) per eigenvalue and point
STRIDE: int = 5  # every 5th point of the loss grid along each axis: 11×11 points of the default 51×51 grid


class _Silent(Reporter):
    """A reporter that writes nothing: the inner Lanczos runs' product counts stay off the points' progress line."""

    def update(self, done: int, total: int | None, unit: str, what: str, *, bound: bool = False) -> None:
        """Drop the report."""


class ShiftedNegation:
    """B = s·I − A for a symmetric operator A: its largest eigenvalue is s − λ_min(A).

    Has what Lanczos asks of an operator: ``shape``, ``dtype``, ``device`` and ``B @ V`` for V of shape (P,)
    or (P, K); one product of B costs one product of A.
    """

    def __init__(self, A: Any, shift: float) -> None:
        self.A, self.shift = A, float(shift)
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.shift * V - (self.A @ V)  # s·V − A·V


def extreme_eigenvalues(H: Any, *, tol: float = TOL, max_iter: int = MAX_ITER, seed: int = 0) -> dict[str, Any]:
    """λ_max and λ_min of a symmetric operator by two Lanczos runs (see the module docstring).

    λ_max by "LA" Lanczos on H to a Ritz residual ≤ tol·|λ_max|; λ_min = s − λ_max(s·I − H), s the λ_max
    found, to a residual ≤ tol·(λ_max − λ_min). Both runs use the "residual" stopping criterion
    (``lossatlas.estimators.lanczos_eigs``) and at most ``max_iter`` steps each.

    Returns:
        {"lambda_max", "lambda_min", "ratio" = |λ_min/λ_max| (inf when λ_max is 0), "matvecs" (both runs),
        "converged" (both runs met the tolerance)}.
    """
    hi = top_eigenpairs(H, 1, which="LA", tol=tol, max_iter=max_iter, seed=seed, criterion="residual",
                        return_eigenvectors=False)
    lam_max = float(hi.eigenvalues[0])
    lo = top_eigenpairs(ShiftedNegation(H, lam_max), 1, which="LA", tol=tol, max_iter=max_iter, seed=seed + 1,
                        criterion="residual", return_eigenvectors=False)
    lam_min = lam_max - float(lo.eigenvalues[0])  # λ_min(H) = s − λ_max(s·I − H)
    ratio = abs(lam_min / lam_max) if lam_max != 0 else float("inf")
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": ratio, "matvecs": int(hi.matvecs + lo.matvecs),
            "converged": bool(hi.converged[0] and lo.converged[0])}


def map_axes(x: np.ndarray, y: np.ndarray | None, stride: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The map's coordinates: every ``stride``-th point of the loss grid's axes, from the first (x[::stride])."""
    return np.asarray(x)[::stride].copy(), None if y is None else np.asarray(y)[::stride].copy()


def convexity_map(
    model: nn.Module,
    base: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    data: Sequence[tuple[Any, Tensor]],
    loss: str,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    path: str = "auto",
) -> dict[str, Any]:
    """λ_max, λ_min and |λ_min/λ_max| of the Hessian at θ* + x_j d_x (+ y_i d_y) for every grid point.

    The Hessian of the example-weighted mean loss over ``data`` (eval mode: BatchNorm with its running
    statistics, dropout off), with respect to the model's trainable parameters (``requires_grad``), at the point
    whose parameters are ``base`` moved along ``directions`` (tensors by name; names the directions lack stay at
    ``base``); the model itself is never modified. Each point costs two Lanczos runs (``extreme_eigenvalues``,
    tolerance ``tol``, default 1e-2; at most ``max_iter`` products each). Progress goes through
    ``lossatlas.progress.report`` as "points" of the task "convexity".

    Args:
        model: the network.
        base: θ*, tensors by parameter name.
        directions: d_x (and d_y), tensors by name.
        data: (inputs, targets) batches.
        loss: a loss name of ``lossatlas.losses``.
        x: the grid's coordinates along d_x.
        y: the grid's coordinates along d_y (None: a line along d_x).
        tol: the Lanczos tolerance (``extreme_eigenvalues``), default 1e-2.
        max_iter: most Lanczos steps per eigenvalue and point, default 100.
        seed: of the Lanczos start vectors.
        dtype: the products' dtype (None: the model's; a half-precision model runs in float32).
        device: where the products run (None: the model's).
        path: the Hessian-vector-product path of ``lossatlas.curvature`` ("auto").

    Returns:
        {"lambda_max", "lambda_min", "ratio", "matvecs", "converged"}: arrays of shape (len(y), len(x))
        (``[i, j]`` at (x[j], y[i]), as the loss grid) or (len(x),), and "elapsed_s".
    """
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float64)
    yy = np.zeros(1) if y is None else np.asarray(y, dtype=np.float64)
    shape = (len(x),) if y is None else (len(yy), len(x))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if len(directions) != (1 if y is None else 2):
        raise ValueError(f"convexity_map needs {1 if y is None else 2} direction(s) for this grid, got {len(directions)}")
    dtype = compute_dtype(dtype, model)
    out = {k: np.full(len(yy) * len(x), np.nan) for k in ("lambda_max", "lambda_min", "ratio")}
    out["matvecs"] = np.zeros(len(yy) * len(x), dtype=np.int64)
    out["converged"] = np.zeros(len(yy) * len(x), dtype=bool)
    n = len(yy) * len(x)
    with task("convexity map"):
        report(0, n, "points", "convexity")
        for i, b in enumerate(yy):
            for j, a in enumerate(x):
                point = {}
                for k in names:  # θ(α, β) = θ* + α d_x + β d_y, parameter by parameter
                    t = base[k].detach()
                    if k in directions[0]:
                        t = t + float(a) * directions[0][k].to(t)
                    if y is not None and k in directions[1]:
                        t = t + float(b) * directions[1][k].to(t)
                    point[k] = t
                H = make_operator("hessian", model, list(data), loss, params=point, mode="eval", dtype=dtype,
                                  device=device, path=path, check_deterministic=(i == 0 and j == 0))
                with reporting(_Silent()):  # the Lanczos runs' own product counts: not on the points' line
                    e = extreme_eigenvalues(H, tol=tol, max_iter=max_iter, seed=seed)
                idx = i * len(x) + j
                for key in out:
                    out[key][idx] = e[key]
                report(idx + 1, n, "points", "convexity")
    res: dict[str, Any] = {k: v.reshape(shape) for k, v in out.items()}
    res["elapsed_s"] = time.perf_counter() - t0
    return res


__all__ = ["TOL", "MAX_ITER", "STRIDE", "ShiftedNegation", "extreme_eigenvalues", "map_axes", "convexity_map"]
