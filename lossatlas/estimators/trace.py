"""Trace estimators: Hutchinson, Hutch++, XTrace, a spectrum-driven ``auto`` choice, and a bootstrap interval.

Probe vector k comes from its own generator seeded by (seed, k), so the probe set does not depend on
how it is split. With an active ``dist`` (torchrun) each rank applies ``A`` (over the full data, no
collective per product) to its contiguous share of the columns of every block and the pieces are
all-gathered: every rank gets the single-process estimate, identical up to floating-point reduction
order (a share's products are batched differently).
"""

from __future__ import annotations

import dataclasses
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
from lossatlas.estimators._recurrence import gram64
from lossatlas.progress import report

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
    reason: str = ""  # why ``estimator="auto"`` chose ``method`` (empty for a fixed choice)
    captured: float = float("nan")  # auto: held-out share of ‖A‖_F² the first block's sketch captures


TRACE_ESTIMATORS: tuple[str, ...] = ("auto", "hutchinson", "hutchpp", "xtrace")
AUTO_SKETCH_SHARE = 0.5  # auto takes XTrace when a half-block sketch captures more than this share of ‖A‖_F²


def hutchinson_trace(
    A: Any,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    block: int = 16,
    target_stderr: float | None = None,
    dist: Distributed | None = None,
    start: int = 0,
) -> TraceEstimate:
    """tr(A) ≈ (1/K) Σ_k v_kᵀ A v_k with E[v vᵀ] = I (Hutchinson 1989).

    Per-sample variance: Rademacher 2(‖A‖_F² − Σ_i A_ii²), Gaussian 2‖A‖_F² (so Rademacher is exact
    on a diagonal matrix). Vectors are applied ``block`` at a time, ``A @ (P, block)``. With
    ``target_stderr`` the run stops after the first block at which the standard error is ≤ the
    target and at least 8 samples exist (PyHessian stops on a relative change of the mean instead,
    which can stop after 2 samples); ``num_matvecs`` stays the budget. Under torchrun (``dist``) the
    columns of each block are split across ranks, so the stopping point is the single-process one.
    ``start`` skips probes 0 … start−1 (already applied by :func:`auto_trace`); the samples are then
    those of probes start … K−1. Every vᵀAv is accumulated in float64 whatever A's dtype.

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
    done = start  # probes 0 … start−1 were applied by the caller (auto_trace's first block)
    report(done, K, "products", "trace", bound=target_stderr is not None)
    while done < K:
        size = min(block, K - done)
        mine = dist.split(size)
        V = probe_vectors(P, range(done + mine.start, done + mine.stop), distribution, seed, dtype, device)
        s = dist.all_gather_split(_coldots(V, apply(A, V)), size)  # (size,): v_kᵀ A v_k in float64
        samples.append(s.to("cpu").numpy())
        done += size
        report(done, K, "products", "trace", bound=target_stderr is not None)
        if target_stderr is not None and done >= MIN_SAMPLES_FOR_STOP:
            if _stderr(np.concatenate(samples)) <= target_stderr:
                break
    x = np.concatenate(samples)
    return TraceEstimate(value=float(x.mean()), stderr=_stderr(x), matvecs=done - start, samples=x, method="hutchinson")


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
    report(0, m, "products", "trace")
    S = probe_vectors(P, mine, distribution, seed, dtype, device)  # (P, my share of m/3)
    Q, _ = torch.linalg.qr(dist.all_gather_split(apply(A, S), third, dim=1))  # (P, min(P, m/3))
    report(third, m, "products", "trace")
    q = dist.split(Q.shape[1])
    AQ = dist.all_gather_split(apply(A, Q[:, q.start : q.stop]), Q.shape[1], dim=1)
    report(2 * third, m, "products", "trace")
    low_rank = float(_coldots(Q, AQ).sum()) if Q.shape[1] else 0.0  # tr(Qᵀ A Q) accumulated in float64
    G = probe_vectors(P, range(third + mine.start, third + mine.stop), distribution, seed, dtype, device)
    G = G - Q @ gram64(Q.T, G.T).to(dtype)  # (I − QQᵀ) G with the coefficients Qᵀ G in float64
    s = dist.all_gather_split(_coldots(G, apply(A, G)), third)
    report(m, m, "products", "trace")
    s = s.to("cpu", torch.float64).numpy()  # (m/3,)
    return TraceEstimate(value=low_rank + float(s.mean()), stderr=_stderr(s), matvecs=m, samples=s, method="hutch++")


def xtrace(A: Any, num_matvecs: int = 100, *, seed: int = 0, distribution: str = "rademacher",
           dist: Distributed | None = None) -> TraceEstimate:
    """tr(A) by XTrace: every probe serves both the low-rank sketch and the Hutchinson residual.

    With m = num_matvecs/2 probes Ω = [ω_1 … ω_m], Y = AΩ = QR, and Q_(i) an orthonormal basis of
    the columns of Y but the i-th (Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, s_i the normalized i-th column of
    R⁻ᵀ), each

        t_i = tr(Q_(i)ᵀ A Q_(i)) + ω_iᵀ (I − Q_(i)Q_(i)ᵀ) A (I − Q_(i)Q_(i)ᵀ) ω_i

    is unbiased (Q_(i) does not depend on ω_i), and the estimate is their mean (Epperly, Tropp &
    Webber 2024, "XTrace: Making the most of every sample in stochastic trace estimation", SIMAX;
    the exchangeable form of Hutch++, lower variance at equal products). 2m products: AΩ and AQ;
    everything else is m×m algebra in float64 (QᵀAΩ = R). ``stderr`` is std(t_i)/√m, the paper's
    error estimate (the t_i are exchangeable, not independent). Probes are those of
    :func:`hutchinson_trace` with the same seed. Under torchrun (``dist``) the columns of AΩ and AQ
    are split across ranks and gathered, so every rank does the same m×m algebra.

    Example:
        A spectrum 2⁻ⁱ: the sketch holds the top of it, the residual terms the small tail:

        >>> import torch
        >>> A = torch.diag(torch.tensor([2.0 ** -i for i in range(60)], dtype=torch.float64))
        >>> est = xtrace(A, 20)
        >>> round(est.value, 2), est.matvecs
        (2.0, 20)
    """
    P, dtype, device = check_operator(A)
    K = check_positive_int("num_matvecs", num_matvecs, minimum=4)
    if K % 2:
        raise ValueError(f"num_matvecs must be even for XTrace, got {K}; use {K + 1}")
    check_choice("distribution", distribution, DISTRIBUTIONS)
    m = K // 2
    dist = dist if dist is not None else Distributed()
    Om = probe_vectors(P, range(m), distribution, seed, dtype, device)  # (P, m)
    report(0, K, "products", "trace")
    return _xtrace_from(A, Om, _split_apply(A, Om, dist), "xtrace", dist)


def _split_apply(A: Any, V: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """A V with V's columns split across the ranks and gathered (A V itself in one process)."""
    if not dist.active:
        return apply(A, V)
    mine = dist.split(V.shape[1])
    return dist.all_gather_split(apply(A, V[:, mine.start:mine.stop]), V.shape[1], dim=1)


def _xtrace_from(A: Any, Om: torch.Tensor, Y: torch.Tensor, method: str,
                 dist: Distributed | None = None) -> TraceEstimate:
    """XTrace from the probes Ω (P, m) and Y = AΩ: m more products (AQ) and m×m float64 algebra."""
    m = Om.shape[1]
    Q64, R = torch.linalg.qr(Y.detach().double())  # (P, m), (m, m): the QR in float64
    Q = Q64.to(Om.dtype)
    report(m, 2 * m, "products", "trace")  # AΩ done, AQ next
    Z = _split_apply(A, Q, dist if dist is not None else Distributed())  # (P, m): AQ
    report(2 * m, 2 * m, "products", "trace")
    H = gram64(Q.T, Z.T)  # Qᵀ A Q (m, m)
    H = 0.5 * (H + H.T)
    C = gram64(Q.T, Om.T)  # Qᵀ Ω (m, m)
    Rn = gram64(Q.T, Y.T)  # Qᵀ A Ω (= R up to rounding), from the stored Q
    diagWY = _coldots(Om, Y)  # ω_iᵀ A ω_i (m,)
    Sm = torch.linalg.pinv(R).T  # R⁻ᵀ (pinv: a rank-deficient AΩ leaves exact zero directions)
    norms = torch.linalg.vector_norm(Sm, dim=0)
    Sm = Sm / torch.where(norms > 0, norms, torch.ones_like(norms))  # columns s_i
    trH = torch.trace(H)
    sHs = (Sm * (H @ Sm)).sum(0)  # s_iᵀ H s_i
    c = C - Sm * (Sm * C).sum(0)  # c'_i = (I − s_i s_iᵀ) Qᵀ ω_i, as columns
    d = Rn - H @ c  # Qᵀ A (ω_i − Q c'_i)
    d = d - Sm * (Sm * d).sum(0)  # (I − s_i s_iᵀ) of it
    # ω_iᵀ (I − Π_i) A (I − Π_i) ω_i = ω_iᵀAω_i − (QᵀAω_i)ᵀ c'_i − (Qᵀω_i)ᵀ d'_i
    resid = diagWY - (Rn * c).sum(0) - (C * d).sum(0)
    t = (trH - sHs + resid).to("cpu").numpy()  # (m,)
    return TraceEstimate(value=float(t.mean()), stderr=_stderr(t), matvecs=2 * m, samples=t, method=method)


def auto_trace(
    A: Any, num_matvecs: int = 100, *, seed: int = 0, distribution: str = "rademacher", dist: Distributed | None = None
) -> TraceEstimate:
    """tr(A) by Hutchinson or XTrace, chosen from the spectrum seen by a first block of products.

    The first block is probes 0 … m−1 (m = num_matvecs/2) with Y = AΩ. Half of them sketch
    Q₁ = orth(AΩ₁); the other half estimate, held out, the share of ‖A‖_F² the sketch captures,
    1 − ‖(I − Q₁Q₁ᵀ)AΩ₂‖_F² / ‖AΩ₂‖_F² (E‖Mω‖² = ‖M‖_F²). Hutchinson's variance is ≈ 2‖A‖_F²/K and
    a sketch method's ≈ 2‖(I − Π)A(I − Π)‖_F²/(K/2) (Meyer, Musco, Musco & Woodruff 2021, "Hutch++";
    the adaptive split of Persson, Cortinovis & Kressner 2022 uses the same comparison), so a
    share above 0.5 takes XTrace (:func:`xtrace`, reusing Y: no product is wasted) and otherwise
    Hutchinson continues with probes m … K−1 (the first block's vᵀAv are its first samples: the
    result equals :func:`hutchinson_trace` with the same seed). ``method`` says which ran,
    ``reason`` why, ``captured`` the held-out share.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([2.0 ** -i for i in range(60)], dtype=torch.float64))
        >>> est = auto_trace(A, 20)
        >>> est.method, round(est.value, 2)
        ('xtrace', 2.0)
    """
    P, dtype, device = check_operator(A)
    K = check_positive_int("num_matvecs", num_matvecs, minimum=4)
    if K % 2:
        raise ValueError(f"num_matvecs must be even for estimator='auto', got {K}; use {K + 1}")
    check_choice("distribution", distribution, DISTRIBUTIONS)
    dist = dist if dist is not None else Distributed()
    m = K // 2
    mine = dist.split(m)
    Om_mine = probe_vectors(P, mine, distribution, seed, dtype, device)
    report(0, K, "products", "trace")
    Y = dist.all_gather_split(apply(A, Om_mine), m, dim=1)  # (P, m): the first block, on every rank
    report(m, K, "products", "trace")
    Om = probe_vectors(P, range(m), distribution, seed, dtype, device)
    h = m // 2
    Q1 = torch.linalg.qr(Y[:, :h].detach().double())[0].to(dtype)  # sketch of the first half
    Y2 = Y[:, h:].detach()
    total = float(_coldots(Y2, Y2).sum())  # ‖AΩ₂‖_F²
    proj = gram64(Q1.T, Y2.T)  # Q₁ᵀ AΩ₂ in float64
    rest = max(total - float((proj**2).sum()), 0.0)  # ‖(I − Q₁Q₁ᵀ)AΩ₂‖_F²
    captured = 1.0 - rest / total if total > 0 else 1.0
    if captured > AUTO_SKETCH_SHARE:
        est = _xtrace_from(A, Om, Y, "xtrace", dist)
        why = (f"auto: a {h}-vector sketch captures {captured:.1%} of ‖A‖_F² (held out) > "
               f"{AUTO_SKETCH_SHARE:.0%}: XTrace")
        return dataclasses.replace(est, reason=why, captured=captured)
    first = _coldots(Om, Y).to("cpu").numpy()
    more = hutchinson_trace(A, K, distribution=distribution, seed=seed, dist=dist, start=m) if K > m else None
    x = np.concatenate([first, more.samples]) if more is not None else first
    why = f"auto: a {h}-vector sketch captures {captured:.1%} of ‖A‖_F² (held out) ≤ {AUTO_SKETCH_SHARE:.0%}: Hutchinson"
    return TraceEstimate(value=float(x.mean()), stderr=_stderr(x), matvecs=K, samples=x, method="hutchinson",
                         reason=why, captured=captured)


def trace_estimate(A: Any, num_matvecs: int = 100, *, estimator: str = "auto", seed: int = 0,
                   distribution: str = "rademacher", dist: Distributed | None = None) -> TraceEstimate:
    """tr(A) by the named estimator (default ``"auto"``).

    ``"auto"`` (:func:`auto_trace`: Hutchinson or XTrace by the spectrum), ``"hutchinson"``,
    ``"hutchpp"`` (budget divisible by 3) or ``"xtrace"`` (even budget).

    Example:
        >>> import torch
        >>> trace_estimate(torch.diag(torch.arange(1.0, 11.0)), 8, estimator="hutchinson").value
        55.0
    """
    check_choice("estimator", estimator, TRACE_ESTIMATORS)
    if estimator == "auto":
        return auto_trace(A, num_matvecs, seed=seed, distribution=distribution, dist=dist)
    if estimator == "hutchinson":
        return hutchinson_trace(A, num_matvecs, seed=seed, distribution=distribution, dist=dist)
    if estimator == "hutchpp":
        return hutchpp_trace(A, num_matvecs, seed=seed, distribution=distribution, dist=dist)
    return xtrace(A, num_matvecs, seed=seed, distribution=distribution, dist=dist)


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


def _coldots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """x_kᵀ y_k for every column pair of (P, K) blocks, accumulated in float64 → (K,) float64."""
    if X.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64, device=X.device)
    return gram64(X.T.detach().unsqueeze(1), Y.T.detach().unsqueeze(1))[:, 0, 0]  # (K, 1, 1) batched dots
