"""Trace estimators: Hutchinson and Hutch++, and a bootstrap interval.

Probe vector k comes from its own generator seeded by (seed, k), so the probe set does not depend on
how it is split. With an active ``dist`` (torchrun) each rank applies ``A`` (over the full data, no
collective per product) to its contiguous share of the columns of every block and the pieces are
all-gathered: every rank gets the single-process estimate, identical up to floating-point reduction
order (a share's products are batched differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lossatlas.distributed import Distributed
from lossatlas.estimators._checks import (
    DISTRIBUTIONS,
    apply,
    check_choice,
    check_operator,
    check_positive_float,
    check_positive_int,
    make_generator,
    probe_vectors,
)

MIN_SAMPLES_FOR_STOP = 8  # never trust a standard error from fewer samples


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of tr(A) with its standard error and the per-sample values behind it.

    ``samples`` are the Hutchinson terms vᵀAv (for Hutch++, those of the residual part, the
    low-rank part being exact); ``stderr = std(samples, ddof=1)/√n`` scaled as the estimate
    (NaN with fewer than two samples).
    """

    value: float
    stderr: float
    matvecs: int
    samples: np.ndarray
    method: str


def hutchinson_trace(
    A: Any,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    block: int = 16,
    target_stderr: float | None = None,
    dist: Distributed | None = None,
) -> TraceEstimate:
    """tr(A) ≈ (1/K) Σ_k v_kᵀ A v_k with E[v vᵀ] = I (Hutchinson 1989).

    Per-sample variance: Rademacher 2(‖A‖_F² − Σ_i A_ii²), Gaussian 2‖A‖_F² (so Rademacher is exact
    on a diagonal matrix). Vectors are applied ``block`` at a time, ``A @ (P, block)``. With
    ``target_stderr`` the run stops after the first block at which the standard error is ≤ the
    target and at least 8 samples exist (PyHessian stops on a relative change of the mean instead,
    which can stop after 2 samples); ``num_matvecs`` stays the budget. Under torchrun (``dist``) the
    columns of each block are split across ranks, so the stopping point is the single-process one.

    Example:
        >>> import torch
        >>> est = hutchinson_trace(torch.diag(torch.arange(1.0, 11.0)), 8)
        >>> round(est.value, 6), est.stderr
        (55.0, 0.0)
    """
    P, dtype, device = check_operator(A)
    K = check_positive_int("num_matvecs", num_matvecs)
    block = check_positive_int("block", block)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if target_stderr is not None:
        target_stderr = check_positive_float("target_stderr", target_stderr)
    dist = dist if dist is not None else Distributed()
    samples: list[np.ndarray] = []
    done = 0
    while done < K:
        size = min(block, K - done)
        mine = dist.split(size)
        V = probe_vectors(P, range(done + mine.start, done + mine.stop), distribution, seed, dtype, device)
        s = dist.all_gather_split((V * apply(A, V)).sum(dim=0).detach(), size)  # (size,): v_kᵀ A v_k
        samples.append(s.to("cpu", torch.float64).numpy())
        done += size
        if target_stderr is not None and done >= MIN_SAMPLES_FOR_STOP:
            if _stderr(np.concatenate(samples)) <= target_stderr:
                break
    x = np.concatenate(samples)
    return TraceEstimate(value=float(x.mean()), stderr=_stderr(x), matvecs=done, samples=x, method="hutchinson")


def hutchpp_trace(
    A: Any, num_matvecs: int = 99, *, seed: int = 0, distribution: str = "rademacher", dist: Distributed | None = None
) -> TraceEstimate:
    """tr(A) by Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With m matvecs (m divisible by 3) and S, G ∈ {±1}^{P×m/3}: Q = orth(A S),
    tr(A) ≈ tr(Qᵀ A Q) + (3/m)·tr(Gᵀ(I − QQᵀ) A (I − QQᵀ) G) (Meyer, Musco, Musco & Woodruff 2021,
    SOSA). Unbiased; error O(1/m) for PSD A instead of Hutchinson's O(1/√m). The
    standard error comes from the sample variance of the m/3 residual Hutchinson terms. S holds
    probes 0 … m/3−1 and G probes m/3 … 2m/3−1; under torchrun (``dist``) the columns of each of
    the three products A S, A Q, A G are split across ranks and all-gathered (Q = orth(A S) is
    then computed alike on every rank).

    Example:
        A rank-2 matrix is exact from 9 products: its range lies in span(A S), m/3 = 3 columns,
        so the residual part vanishes:

        >>> import torch
        >>> X = torch.arange(60.0, dtype=torch.float64).reshape(30, 2)
        >>> est = hutchpp_trace(X @ X.T, 9)
        >>> round(est.value, 6), float((X**2).sum()), est.matvecs
        (70210.0, 70210.0, 9)
    """
    P, dtype, device = check_operator(A)
    m = check_positive_int("num_matvecs", num_matvecs, minimum=3)
    if m % 3:
        raise ValueError(f"num_matvecs must be divisible by 3 for Hutch++, got {m}; use {3 * round(m / 3) or 3}")
    check_choice("distribution", distribution, DISTRIBUTIONS)
    dist = dist if dist is not None else Distributed()
    third = m // 3
    mine = dist.split(third)
    S = probe_vectors(P, mine, distribution, seed, dtype, device)  # (P, my share of m/3)
    Q, _ = torch.linalg.qr(dist.all_gather_split(apply(A, S), third, dim=1))  # (P, min(P, m/3))
    q = dist.split(Q.shape[1])
    AQ = dist.all_gather_split(apply(A, Q[:, q.start : q.stop]), Q.shape[1], dim=1)
    low_rank = float((Q * AQ).sum()) if Q.shape[1] else 0.0
    G = probe_vectors(P, range(third + mine.start, third + mine.stop), distribution, seed, dtype, device)
    G = G - Q @ (Q.T @ G)
    s = dist.all_gather_split((G * apply(A, G)).sum(dim=0).detach(), third)
    s = s.to("cpu", torch.float64).numpy()  # (m/3,)
    return TraceEstimate(value=low_rank + float(s.mean()), stderr=_stderr(s), matvecs=m, samples=s, method="hutch++")


def bootstrap_ci(
    samples: Any,
    stat: Callable[[np.ndarray], Any] = np.mean,
    *,
    level: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(samples)`` (Efron & Tibshirani 1993).

    Resamples the n values with replacement ``num_resamples`` times (indices from a seeded
    torch.Generator), applies ``stat`` and returns the (1−level)/2 and (1+level)/2 quantiles —
    e.g. over estimates from different data subsets or seeds.

    Example:
        >>> lo, hi = bootstrap_ci(np.arange(100.0))
        >>> bool(lo < 49.5 < hi), bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
        (True, (1.8, 4.2))
    """
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 samples, got {x.size}; collect more estimates")
    level = float(level)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}; e.g. 0.95")
    B = check_positive_int("num_resamples", num_resamples)
    gen = make_generator(seed, torch.device("cpu"))
    idx = torch.randint(0, x.size, (B, x.size), generator=gen).numpy()
    resampled = x[idx]  # (B, n)
    try:
        vals = np.asarray(stat(resampled, axis=1), dtype=np.float64)
        if vals.shape != (B,):
            raise TypeError
    except TypeError:
        vals = np.array([float(stat(row)) for row in resampled])
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size >= 2 else float("nan")
