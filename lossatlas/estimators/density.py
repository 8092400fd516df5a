"""Spectral density by stochastic Lanczos quadrature, and the bulk/outlier split.

Conventions follow Ghorbani, Krishnan & Xiao 2019 (google/spectral-density ``tridiag_to_density``)
and PyHessian's ``density_generate``: Rademacher starts, Gaussian kernel of variance
``sigma_squared·max(1, λmax − λmin)``, a grid padded by ``grid_expand``, renormalized to integrate to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch

from lossatlas.distributed import Distributed
from lossatlas.estimators._checks import (
    check_choice,
    check_operator,
    check_positive_float,
    check_positive_int,
    probe_seed,
    probe_vectors,
)
from lossatlas.estimators.lanczos import lanczos_tridiagonal
from lossatlas.progress import task

SCALES: tuple[str, ...] = ("linear", "log")
BULK_LEVEL = 1e-6  # the density "returns to the bulk level" below this fraction of its maximum
_KERNEL_HALF_WIDTH = 12.0  # kernel terms beyond 12σ (< 1e-31 of the peak) are skipped


@dataclass(frozen=True)
class Density:
    """A smoothed spectral density φ̂ on a grid, with the quadrature it came from.

    ``scale="linear"``: ``grid`` holds λ (evenly spaced) and Σ density·Δλ = 1.
    ``scale="log"``: ``grid`` holds |λ| + ε (log-spaced) and ``density`` is the density of
    u = ln(|λ| + ε) (Papyan 2020 §C.7), so Σ density·Δu = 1 with Δu = ln(grid[1]/grid[0]).
    ``nodes``/``weights`` (n_v, m) are each run's Ritz values θ and weights τ² (Σ_k τ_k² = 1),
    always in λ units. ``bulk_edge`` is in grid units; ``outliers`` are Ritz values above it
    (λ units, descending; the probe with the median count). ``sigma_squared_abs`` is the kernel
    variance actually used (grid units squared).
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma_squared_abs: float
    num_probes: int
    num_steps: int
    matvecs: int
    outliers: np.ndarray
    bulk_edge: float
    scale: str = "linear"
    log_epsilon: float = 1e-5


def tridiag_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes θ_k and weights τ_k² from a Lanczos tridiagonal T = tridiag(β, α, β).

    θ = eig(T), τ_k = first component of the k-th unit eigenvector; for the unit start vector v
    Σ_k τ_k² f(θ_k) ≈ vᵀ f(A) v, exact for polynomials of degree ≤ 2m − 1 (Golub & Meurant).
    Accepts (m,)/(m−1,) or batched (n, m)/(n, m−1); float64 output.

    Example:
        T = [[2, 1], [1, 2]] has eigenvalues 1 and 3 with equal first components:

        >>> nodes, weights = tridiag_quadrature(np.array([2.0, 2.0]), np.array([1.0]))
        >>> nodes.round(12).tolist(), weights.round(12).tolist()
        ([1.0, 3.0], [0.5, 0.5])
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.ndim == 2:
        if beta.ndim != 2 or beta.shape[0] != alpha.shape[0]:
            raise ValueError(f"batched alpha {alpha.shape} needs beta of shape ({alpha.shape[0]}, m-1), got {beta.shape}")
        pairs = [tridiag_quadrature(a, bb) for a, bb in zip(alpha, beta)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    if alpha.ndim != 1 or beta.shape != (max(alpha.shape[0] - 1, 0),) or alpha.shape[0] < 1:
        raise ValueError(f"alpha must be (m,) and beta (m-1,), got {alpha.shape} and {beta.shape}")
    if alpha.shape[0] == 1:
        return alpha.copy(), np.ones(1)
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
    return theta, S[0] ** 2


def slq_density(
    A: Any,
    *,
    num_probes: int = 4,
    num_steps: int = 90,
    sigma_squared: float = 1e-5,
    grid_len: int = 10000,
    grid_expand: float = 1e-2,
    scale: str = "linear",
    seed: int = 0,
    distribution: str = "rademacher",
    log_epsilon: float = 1e-5,
    progress: Callable[[int, int], None] | None = None,
    dist: Distributed | None = None,
    basis_device: str | None = None,
) -> Density:
    """Spectral density φ(t) = (1/P) Σ_i δ(t − λ_i) smoothed by a Gaussian, by stochastic Lanczos quadrature.

    φ̂(t) = (1/n_v) Σ_l Σ_k τ_k^(l)² g_σ(t − θ_k^(l)) from n_v runs of m Lanczos steps with
    normalized random starts (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).
    The n_v runs advance together: one ``A @ (P, n_v)`` per step, the same arithmetic as separate runs.

    Grid and kernel as google/spectral-density and PyHessian: grid = linspace(mean_l min θ − expand,
    mean_l max θ + expand, grid_len); kernel variance σ² = sigma_squared·max(1, grid width);
    density renormalized so that Σ density·Δgrid = 1. ``scale="log"`` applies the same recipe to
    u = ln(|θ| + ε) (Papyan 2020's log-spectrum, ε = ``log_epsilon``): grid = exp(u-grid), density
    with respect to u, so outliers separated by orders of magnitude stay visible. Signs are folded.

    Start vector l (and its restart vectors) comes from its own generator seeded by (seed, l), so the
    probe set does not depend on how it is split. With an active ``dist`` (torchrun) each rank runs
    its contiguous share of the n_v runs with ``A`` over the full data (no collective per product)
    and the nodes and weights are all-gathered: every rank gets the single-process result, identical
    up to floating-point reduction order (the products of a share are batched differently).

    Args:
        A: symmetric operator (``shape``, ``dtype``, ``device``, ``A @ V``).
        num_probes: n_v, independent start vectors.
        num_steps: m, Lanczos steps per run (≤ P).
        sigma_squared: kernel variance relative to the spectral width (try 1e-5 … 1e-1).
        grid_len: number of grid points.
        grid_expand: padding added on both sides of the grid (grid units).
        scale: ``"linear"`` or ``"log"``.
        seed: seed of the torch.Generator for the start (and restart) vectors.
        distribution: ``"rademacher"`` or ``"normal"`` start vectors.
        log_epsilon: the shift ε of the log scale.
        progress: called as ``progress(step, num_steps)``.
        dist: the torchrun job to split the runs over (None or one process: all runs here).
        basis_device: where the n_v·m·P basis values live: None (the operator's device), ``"cpu"`` or
            ``"disk"`` (memory-mapped; ``lossatlas.estimators.lanczos_tridiagonal``).

    Returns:
        A :class:`Density`; ``bulk_edge`` and ``outliers`` as in :func:`find_bulk_edge`.

    Example:
        A bulk of 40 eigenvalues in [0, 1] and two outliers, 10 and 20:

        >>> import torch
        >>> spectrum = torch.cat([torch.linspace(0.0, 1.0, 40), torch.tensor([10.0, 20.0])]).double()
        >>> d = slq_density(torch.diag(spectrum), num_probes=2, num_steps=30, sigma_squared=1e-4, grid_len=2000)
        >>> d.outliers.round(6).tolist(), d.matvecs
        ([20.0, 10.0], 60)
        >>> round(float(d.density.sum() * (d.grid[1] - d.grid[0])), 12)
        1.0
    """
    P, dtype, device = check_operator(A)
    n_v = check_positive_int("num_probes", num_probes)
    m = check_positive_int("num_steps", num_steps)
    if m > P:
        raise ValueError(f"num_steps={m} exceeds the operator size P={P}; use num_steps <= {P}")
    grid_len = check_positive_int("grid_len", grid_len, minimum=2)
    sigma_squared = check_positive_float("sigma_squared", sigma_squared)
    log_epsilon = check_positive_float("log_epsilon", log_epsilon)
    grid_expand = float(grid_expand)
    if not (grid_expand >= 0 and math.isfinite(grid_expand)):
        raise ValueError(f"grid_expand must be a finite number >= 0, got {grid_expand!r}")
    check_choice("scale", scale, SCALES)
    check_choice("distribution", distribution, ("rademacher", "normal"))
    dist = dist if dist is not None else Distributed()
    mine = dist.split(n_v)  # this rank's runs
    nodes = weights = np.zeros((0, m))
    if len(mine):
        V0 = probe_vectors(P, mine, distribution, seed, dtype, device)  # (P, n_mine), normalized inside
        restarts = [probe_seed(seed, l, stream=1) for l in mine]
        with task("SLQ"):  # its Lanczos reports read "SLQ · Lanczos: ..."
            alpha, beta = lanczos_tridiagonal(A, V0, m, seed=restarts, progress=progress, basis_device=basis_device)
        nodes, weights = tridiag_quadrature(alpha, beta)  # (n_mine, m) each
    nodes = dist.all_gather_split(torch.from_numpy(nodes), n_v).numpy()  # (n_v, m)
    weights = dist.all_gather_split(torch.from_numpy(weights), n_v).numpy()

    x = nodes if scale == "linear" else np.log(np.abs(nodes) + log_epsilon)
    lo = float(np.mean(x.min(axis=1))) - grid_expand
    hi = float(np.mean(x.max(axis=1))) + grid_expand
    if hi - lo <= 0:
        hi, lo = hi + 0.5, lo - 0.5  # a single point spectrum with no padding
    u = np.linspace(lo, hi, grid_len)
    var = sigma_squared * max(1.0, hi - lo)
    dens = _kernel_sum(u, x.ravel(), weights.ravel(), var) / n_v
    du = u[1] - u[0]
    total = dens.sum() * du
    if total > 0:
        dens /= total
    grid = u if scale == "linear" else np.exp(u)
    edge = find_bulk_edge(grid, dens, scale=scale)
    outliers = _median_probe_outliers(nodes, edge, scale, log_epsilon)
    return Density(
        grid=grid,
        density=dens,
        nodes=nodes,
        weights=weights,
        sigma_squared_abs=float(var),
        num_probes=n_v,
        num_steps=m,
        matvecs=n_v * m,
        outliers=outliers,
        bulk_edge=float(edge),
        scale=scale,
        log_epsilon=log_epsilon,
    )


def _kernel_sum(u: np.ndarray, centers: np.ndarray, weights: np.ndarray, var: float) -> np.ndarray:
    """Σ_k w_k g(u − c_k) for a Gaussian g of variance ``var``, each term evaluated within ±12σ only."""
    out = np.zeros_like(u)
    half = _KERNEL_HALF_WIDTH * math.sqrt(var)
    lo = np.searchsorted(u, centers - half, side="left")
    hi = np.searchsorted(u, centers + half, side="right")
    for c, w, i0, i1 in zip(centers, weights, lo, hi):
        if w != 0.0 and i1 > i0:
            out[i0:i1] += w * np.exp(-((u[i0:i1] - c) ** 2) / (2 * var))
    return out / math.sqrt(2 * math.pi * var)


def find_bulk_edge(grid: np.ndarray, density: np.ndarray, *, scale: str = "linear", level: float = BULK_LEVEL) -> float:
    """Upper edge of the bulk: the top of the heaviest connected region where density > level·max.

    Walking down from the top of the grid, outlier bumps (weight ≈ 1/P each) are separated from
    the bulk by gaps where the log-density falls to the floor; the bulk is the region holding the
    most mass and its upper end is the edge. Works on either scale
    (mass measured with Δλ or Δln|λ|).

    Example:
        >>> grid = np.linspace(0.0, 10.0, 101)
        >>> density = np.where(grid <= 2.0, 1.0, 0.0) + np.where(abs(grid - 8.0) < 0.25, 0.1, 0.0)
        >>> find_bulk_edge(grid, density)
        2.0
    """
    check_choice("scale", scale, SCALES)
    grid = np.asarray(grid, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    if grid.ndim != 1 or grid.shape != density.shape or grid.shape[0] < 2:
        raise ValueError(f"grid and density must be 1-D of equal length >= 2, got {grid.shape} and {density.shape}")
    above = density > level * density.max()
    if not above.any():
        return float(grid[-1])
    x = grid if scale == "linear" else np.log(grid)
    mass = density * np.gradient(x)
    # label connected runs of `above`
    starts = np.flatnonzero(above & ~np.r_[False, above[:-1]])
    ends = np.flatnonzero(above & ~np.r_[above[1:], False])
    masses = [mass[s : e + 1].sum() for s, e in zip(starts, ends)]
    return float(grid[ends[int(np.argmax(masses))]])


def count_outliers(density: Density, *, delta: float = 0.1, eigenvalues: np.ndarray | None = None) -> int:
    """Number of eigenvalues above the bulk edge·(1 + δ).

    Sagun, Bottou, LeCun 2017 find about C outliers for C classes; Papyan 2020 (JMLR) C outliers
    plus C(C−1) in a second level.

    Without ``eigenvalues``: the median over SLQ runs of the number of Ritz nodes above the
    threshold. A single start vector sees each distinct eigenvalue once, so a multiple outlier
    counts once (softmax regression with every input x₀ at W = 0 has ‖x₀‖²/C with
    multiplicity C−1); pass ``eigenvalues`` — top-k Ritz values of a block Lanczos run with block
    size ≥ the multiplicity — to count with multiplicity (if all k are above the threshold the
    count is a lower bound: raise k). The threshold is
    ``edge + δ·|edge|`` (= edge·(1+δ) for a positive edge); on a log density it applies to |λ| + ε.

    Example:
        >>> import torch
        >>> spectrum = torch.cat([torch.linspace(0.0, 1.0, 40), torch.tensor([10.0, 20.0])]).double()
        >>> d = slq_density(torch.diag(spectrum), num_probes=2, num_steps=30, sigma_squared=1e-4, grid_len=2000)
        >>> count_outliers(d), count_outliers(d, eigenvalues=[20.0, 10.0, 0.9])
        (2, 2)
    """
    if not isinstance(density, Density):
        raise ValueError(f"count_outliers needs a Density from slq_density, got {type(density).__name__}")
    delta = float(delta)
    if not (delta >= 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    thresh = density.bulk_edge + delta * abs(density.bulk_edge)
    if eigenvalues is not None:
        vals = _to_grid_units(np.asarray(eigenvalues, dtype=np.float64).ravel(), density.scale, density.log_epsilon)
        return int(np.sum(vals > thresh))
    vals = _to_grid_units(density.nodes, density.scale, density.log_epsilon)
    counts = np.sort(np.sum(vals > thresh, axis=1))
    return int(counts[(len(counts) - 1) // 2])  # lower median


def _to_grid_units(values: np.ndarray, scale: str, eps: float) -> np.ndarray:
    return values if scale == "linear" else np.abs(values) + eps


def _median_probe_outliers(nodes: np.ndarray, edge: float, scale: str, eps: float) -> np.ndarray:
    """Ritz values above ``edge`` of the run whose count is the (lower) median, descending."""
    above = _to_grid_units(nodes, scale, eps) > edge  # (n_v, m)
    counts = above.sum(axis=1)
    target = np.sort(counts)[(len(counts) - 1) // 2]
    l = int(np.flatnonzero(counts == target)[0])
    return np.sort(nodes[l][above[l]])[::-1].copy()
