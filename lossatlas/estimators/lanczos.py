"""Extreme eigenvalues of a symmetric operator: (block) Lanczos and power iteration.

Lanczos with full reorthogonalization as in Ghorbani, Krishnan & Xiao 2019 (google/spectral-density),
block Lanczos (Golub & Underwood 1977) for clustered or multiple eigenvalues, which a single start
vector cannot see (it finds each distinct eigenvalue once), and power iteration (PyHessian's
method) for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from lossatlas.estimators._checks import (
    apply,
    check_choice,
    check_operator,
    check_positive_float,
    check_positive_int,
    make_generator,
    random_vectors,
)
from lossatlas.estimators._recurrence import BlockLanczos

WHICH: tuple[str, ...] = ("LA", "SA", "LM")
_STEMR_MAX_N = 64  # up to this order all Ritz pairs in one LAPACK call are cheaper than two selective ones
REORTH: tuple[str, ...] = ("full", "none")


@dataclass(frozen=True)
class EigResult:
    """Ritz pairs of a symmetric operator with their residual norms ‖A y − θ y‖.

    ``eigenvalues`` are sorted descending for ``"LA"``, ascending for ``"SA"`` and by descending
    magnitude for ``"LM"``; ``eigenvectors`` (P, k) are unit columns in the operator's dtype (or
    None); ``converged[i]`` says ``residuals[i] ≤ tol·max(|θ_i|, ε^{2/3}‖T‖)`` (ε of the operator
    dtype). Converged pairs are accurate Ritz pairs, not a proof that no eigenvalue was missed:
    a single start vector can miss copies of a multiple eigenvalue (see :func:`lanczos_eigs`).
    """

    eigenvalues: np.ndarray
    eigenvectors: Tensor | None
    residuals: np.ndarray
    converged: np.ndarray
    matvecs: int
    iterations: int
    which: str
    error_bounds: np.ndarray | None = None  # min(r, r²/gap, ‖R‖²/δ): the eigenvalue error estimate (``_error``)


CRITERIA = ("residual", "eigenvalue")


def lanczos_eigs(
    A: Any,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    block_size: int = 1,
    return_eigenvectors: bool = True,
    reorth: str = "full",
    progress: Callable[[int, int], None] | None = None,
    basis_device: torch.device | str | None = None,
    criterion: str = "residual",
) -> EigResult:
    """The k extreme eigenpairs of a symmetric operator by (block) Lanczos with full reorthogonalization.

    Builds V_n, T_n = V_nᵀ A V_n (block tridiagonal) and Ritz pairs θ_i = eig(T_n), y_i = V_n s_i;
    the residual is ‖A y_i − θ_i y_i‖ = ‖B_m s_i[last block]‖ (= β_m |s_i[m]| for b = 1), and the
    run stops once every wanted pair has ``residual ≤ tol·max(|θ_i|, ε^{2/3}‖T‖)`` (Ghorbani,
    Krishnan & Xiao 2019). The small problem is solved in float64 (``eigh_tridiagonal`` / banded
    ``eigh``); the basis is kept in the operator's dtype. On breakdown (an invariant Krylov space)
    the found Ritz values are exact and the run continues from a random vector orthogonal to the
    basis, so there is never a NaN.

    One Krylov space holds each distinct eigenvalue once (for A = diag(5, 5, 5, 1, …) it finds one
    5 and breaks down); further copies come only from restarts after an exact breakdown or, late
    and unreliably, from rounding. ``block_size ≥`` the multiplicity finds every copy — use it
    for clustered outliers (C classes ⇒ ≈ C outliers).

    Args:
        A: symmetric operator with ``shape`` (P, P), ``dtype``, ``device`` and ``A @ V`` for V
            of shape (P,) or (P, K); a dense tensor works.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (sharpness), ``"SA"`` smallest algebraic (negative
            curvature at saddles), ``"LM"`` largest magnitude (ARPACK's default, which returns
            a large negative eigenvalue first when |λ_min| > λ_max).
        tol: relative residual tolerance.
        max_iter: most block steps (default ``max(20, ⌈max(100, 10k)/b⌉)``, at most ⌊P/b⌋); each
            costs ``block_size`` products.
        v0: warm start, (P,) or (P, c); a (P, c) start runs block Lanczos with block size
            ``max(block_size, c)`` (missing columns are random).
        seed: seed of the torch.Generator for the start and restart vectors.
        block_size: vectors per step; > 1 is block Lanczos.
        return_eigenvectors: whether to form the Ritz vectors (P, k).
        reorth: ``"full"`` (default) or ``"none"`` (plain three-term recurrence; shows ghost
            eigenvalues, for demonstrations only).
        progress: called as ``progress(step, max_iter)`` after every block step.
        basis_device: where the Krylov basis (max_iter·b vectors of length P) lives, e.g. ``"cpu"``
            when the operator is on a GPU and k·P does not fit beside the model, or ``"disk"``: a
            numpy.memmap over an anonymous temporary file in $TMPDIR (freed with the basis) when it
            fits in no memory; only the current block travels to the operator's device (default:
            the operator's device).
        criterion: ``"residual"`` stops when every wanted residual r_i ≤ tol·|θ_i| (a guaranteed
            eigenvalue error ≤ r_i); ``"eigenvalue"`` stops when the eigenvalue error estimate
            min(r_i, r_i²/gap_i, ‖R‖²/δ) ≤ tol·|θ_i|, gap_i the distance from θ_i to the nearest other
            Ritz value and δ that of the wanted Ritz values to the rest (Kato–Temple and the cluster
            quadratic residual bound with Ritz values for the unknown gaps; Parlett, *The Symmetric
            Eigenvalue Problem*, §11-7; Mathias 1998). Eigenvalues converge quadratically faster than vectors, so
            "eigenvalue" needs far fewer products when only λ is wanted; ``converged`` follows it too.

    Returns:
        An :class:`EigResult` with ``min(k, n)`` pairs.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> lanczos_eigs(A, k=2, tol=1e-10).eigenvalues.round(8).tolist()
        [100.0, 99.0]
    """
    P, dtype, device = check_operator(A)
    k = check_positive_int("k", k)
    if k > P:
        raise ValueError(f"k={k} exceeds the operator size P={P}; ask for at most {P} eigenpairs")
    check_choice("which", which, WHICH)
    check_choice("reorth", reorth, REORTH)
    check_choice("criterion", criterion, CRITERIA)
    tol = check_positive_float("tol", tol)
    b = check_positive_int("block_size", block_size)
    gen = make_generator(seed, device)
    start = _start_block(v0, P, b, dtype, device, gen)  # (P, b)
    b = start.shape[1]
    if b > P:
        raise ValueError(f"block size {b} exceeds the operator size P={P}; use a smaller block_size or v0")
    cap = P // b
    if max_iter is None:
        max_iter = min(cap, max(20, math.ceil(max(100, 10 * k) / b)))
    else:
        max_iter = min(cap, check_positive_int("max_iter", max_iter))
    if max_iter * b < k:
        raise ValueError(
            f"max_iter={max_iter} block steps of size {b} give at most {max_iter * b} Ritz values < k={k}; raise max_iter"
        )

    on_disk = basis_device == "disk"
    if basis_device is not None:
        start = start.to("cpu" if on_disk else basis_device)
        gen = make_generator(seed, start.device)
    run = BlockLanczos(A, start.T.unsqueeze(0), max_iter, reorth, gen, on_disk=on_disk)
    tiny_rel = float(torch.finfo(dtype).eps) ** (2 / 3)  # ARPACK-style floor for θ ≈ 0
    ritz = None
    while run.steps < max_iter and not run.exhausted:
        run.step(need_next=run.steps + 1 < max_iter)
        if progress is not None:
            progress(run.steps, max_iter)
        if run.n < k or not _due(run.n, k, run.steps, max_iter):
            continue
        ritz = _ritz(run, k, which)
        theta, _, res, every = ritz
        scale = np.maximum(np.abs(theta), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
        if np.all(_error(theta, res, every, criterion) <= tol * scale):
            break
    if ritz is None or ritz[0].shape[0] < min(k, run.n) or _stale(ritz, run):
        ritz = _ritz(run, k, which)
    theta, S, res, every = ritz
    scale = np.maximum(np.abs(theta), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
    bounds = _error(theta, res, every, "eigenvalue")
    vecs = None
    if return_eigenvectors:
        S_t = torch.as_tensor(S, dtype=dtype, device=run.device)  # (n, k), beside the basis
        vecs = (S_t.T @ run.basis(0)).T.contiguous()  # (P, k)
    return EigResult(
        eigenvalues=theta,
        eigenvectors=vecs,
        residuals=res,
        converged=(res if criterion == "residual" else bounds) <= tol * scale,
        matvecs=run.matvecs,
        iterations=run.steps,
        which=which,
        error_bounds=bounds,
    )


def _error(theta: np.ndarray, res: np.ndarray, every: np.ndarray, criterion: str) -> np.ndarray:
    """The residual, or the eigenvalue error estimate min(r_i, r_i²/gap_i, ‖R‖²/δ) from the Ritz values.

    r_i²/gap_i (gap to the nearest other Ritz value) is Kato–Temple's bound for an isolated Ritz
    value; ‖R‖²/δ, with ‖R‖² = Σ_wanted r_j² and δ the gap between the wanted Ritz values and every
    other one, is the quadratic residual bound for the wanted cluster as a whole (Mathias 1998;
    Parlett, The Symmetric Eigenvalue Problem, §11.7), which stays small when the wanted
    eigenvalues are close to each other but apart from the rest of the spectrum.
    """
    if criterion == "residual":
        return res
    D = np.abs(every[:, None] - theta[None, :])  # (n, k): every Ritz value against each wanted one
    itself = D <= 1e-12 * np.maximum(np.abs(theta), 1e-300)[None, :]  # the Ritz value θ_i itself
    gaps = np.where(itself, np.inf, D).min(axis=0)  # gap_i to the nearest other Ritz value
    out = np.minimum(res, np.where(np.isfinite(gaps), res**2 / gaps, np.inf))  # no other Ritz value: r
    tiny = 1e-12 * max(float(np.max(np.abs(theta))), 1e-300)
    others = D.min(axis=1) > tiny  # the unwanted Ritz values
    if others.any():
        delta = float(D[others].min())
        out = np.minimum(out, float(np.sum(res**2)) / max(delta, np.finfo(float).tiny))
    return out


def extreme_eigs(A: Any, top_k: int = 5, bottom_k: int = 5, **kwargs: Any) -> tuple[EigResult, EigResult]:
    """Both ends of the spectrum: ``(lanczos_eigs(which="LA", k=top_k), lanczos_eigs(which="SA", k=bottom_k))``.

    Two separate runs, so each end converges at its own pace; ``kwargs`` go to both.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, -4.0], dtype=torch.float64))
        >>> top, bottom = extreme_eigs(A, top_k=2, bottom_k=1, tol=1e-10)
        >>> top.eigenvalues.round(8).tolist(), bottom.eigenvalues.round(8).tolist()
        ([5.0, 3.0], [-4.0])
    """
    if "which" in kwargs or "k" in kwargs:
        raise ValueError("extreme_eigs sets `which` and `k` itself; pass top_k and bottom_k instead")
    return lanczos_eigs(A, top_k, which="LA", **kwargs), lanczos_eigs(A, bottom_k, which="SA", **kwargs)


def lanczos_tridiagonal(
    A: Any,
    v0: Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    seed: int | Sequence[int] = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The Lanczos tridiagonal T_m = tridiag(β, α, β) of A for a start vector, or for n at once.

    ``v0`` of shape (P,) gives ``alpha`` (m,) and ``beta`` (m−1,); (P, n) runs n independent
    recurrences, one per normalized column, with one ``A @ (P, n)`` product per step, and gives
    (n, m) and (n, m−1). Gauss quadrature with T_m is exact for polynomials of degree ≤ 2m−1:
    Σ_k τ_k² θ_k^j = vᵀA^j v. A breakdown (β ≈ 0) is recorded as 0
    and the run continues from a random orthogonal vector (``seed``; a sequence gives each run its
    own restart seed), which leaves the quadrature unchanged. Float64 in the small problem, the
    operator's dtype in the basis.

    Example:
        Three steps reproduce vᵀA^j v for j ≤ 5; with v = 1/√5 and A = diag(1, …, 5), the moments
        j = 0, 1, 2 are 1, 3 and 11:

        >>> import torch
        >>> from lossatlas.estimators import tridiag_quadrature
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> alpha, beta = lanczos_tridiagonal(A, torch.ones(5, dtype=torch.float64), 3)
        >>> alpha.shape, beta.shape
        ((3,), (2,))
        >>> nodes, weights = tridiag_quadrature(alpha, beta)
        >>> [round(float((weights * nodes**j).sum()), 10) for j in range(3)]
        [1.0, 3.0, 11.0]
    """
    P, dtype, device = check_operator(A)
    check_choice("reorth", reorth, REORTH)
    m = check_positive_int("num_steps", num_steps)
    if m > P:
        raise ValueError(f"num_steps={m} exceeds the operator size P={P}; use num_steps <= {P}")
    V = torch.as_tensor(v0)
    single = V.ndim == 1
    V = V.reshape(P, 1) if single else V
    if V.ndim != 2 or V.shape[0] != P:
        raise ValueError(f"v0 must have shape ({P},) or ({P}, n), got {tuple(torch.as_tensor(v0).shape)}")
    V = V.to(dtype=dtype, device=device)
    norms = torch.linalg.vector_norm(V, dim=0)
    if not bool(torch.all(norms > 0)) or not bool(torch.isfinite(V).all()):
        raise ValueError("v0 columns must be finite and non-zero; draw them with a random generator")
    n = V.shape[1]
    start = (V / norms).T.reshape(n, 1, P)  # n runs of block size 1
    if isinstance(seed, (list, tuple, range)):
        if len(seed) != n:
            raise ValueError(f"seed: got {len(seed)} restart seeds for {n} start vectors; pass one per column or an int")
        gens = [make_generator(s, device) for s in seed]
    else:
        gens = make_generator(seed, device)
    run = BlockLanczos(A, start, m, reorth, gens)
    for i in range(m):
        run.step(need_next=i + 1 < m)
        if progress is not None:
            progress(i + 1, m)
    alpha = np.stack([run.tridiagonal(r)[0] for r in range(n)])
    beta = np.stack([run.tridiagonal(r)[1] for r in range(n)])
    return (alpha[0], beta[0]) if single else (alpha, beta)


def power_iteration(A: Any, *, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0) -> EigResult:
    """The largest-magnitude eigenpair by power iteration, v ← A v / ‖A v‖ (PyHessian's method).

    Stops when ‖A v − θ v‖ ≤ tol·|θ| with θ = vᵀ A v (a residual test, stricter than PyHessian's
    relative change of θ). Converges like |λ₂/λ₁|^t and targets the largest |λ|, so it can return a
    negative eigenvalue; use :func:`lanczos_eigs` for ``"LA"``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, -4.0], dtype=torch.float64))
        >>> r = power_iteration(A, tol=1e-10, max_iter=5000)
        >>> r.eigenvalues.round(6).tolist(), bool(r.converged[0])
        ([5.0], True)
    """
    P, dtype, device = check_operator(A)
    tol = check_positive_float("tol", tol)
    max_iter = check_positive_int("max_iter", max_iter)
    gen = make_generator(seed, device)
    v = random_vectors(P, 1, "normal", gen, dtype, device)[:, 0]
    v = v / torch.linalg.vector_norm(v)
    theta, res, converged, it = 0.0, float("inf"), False, 0
    while it < max_iter:
        it += 1  # one matvec per iteration; read after the loop
        w = apply(A, v.reshape(P, 1))[:, 0]
        theta = float(v @ w)
        res = float(torch.linalg.vector_norm(w - theta * v))
        nw = float(torch.linalg.vector_norm(w))
        if res <= tol * abs(theta) or nw == 0.0:
            converged = True
            break
        v = w / nw
    return EigResult(
        eigenvalues=np.array([theta]),
        eigenvectors=v.reshape(P, 1).clone(),
        residuals=np.array([res]),
        converged=np.array([converged]),
        matvecs=it,
        iterations=it,
        which="LM",
    )


# ---- helpers ------------------------------------------------------------------------------
def _start_block(v0: Tensor | None, P: int, b: int, dtype: torch.dtype, device: torch.device, gen) -> Tensor:
    """The (P, b') start block: v0's columns, padded with Gaussian columns up to ``b``."""
    if v0 is None:
        return random_vectors(P, b, "normal", gen, dtype, device)
    V = torch.as_tensor(v0)
    V = V.reshape(-1, 1) if V.ndim == 1 else V
    if V.ndim != 2 or V.shape[0] != P or V.shape[1] < 1:
        raise ValueError(f"v0 must have shape ({P},) or ({P}, c), got {tuple(torch.as_tensor(v0).shape)}")
    V = V.detach().to(dtype=dtype, device=device)
    if not bool(torch.isfinite(V).all()) or not bool((torch.linalg.vector_norm(V, dim=0) > 0).all()):
        raise ValueError("v0 must be finite with non-zero columns; pass previous Ritz vectors or leave v0=None")
    if V.shape[1] < b:
        V = torch.cat([V, random_vectors(P, b - V.shape[1], "normal", gen, dtype, device)], dim=1)
    return V


def _due(n: int, k: int, steps: int, max_iter: int) -> bool:
    """Whether to solve the small problem now: every step while n ≤ 4k + 40, then every ~5 % of steps."""
    if steps >= max_iter or n <= 4 * k + 40:
        return True
    return steps % max(1, steps // 20) == 0


def _stale(ritz: tuple, run: BlockLanczos) -> bool:
    """Whether the stored Ritz vectors belong to an older (shorter) basis."""
    return ritz[1].shape[0] != run.n


def _ritz(run: BlockLanczos, k: int, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Wanted Ritz values θ (k,), their T-eigenvectors S (n, k), residual norms (k,) and all Ritz values (n,)."""
    n, b = run.n, run.b
    k = min(k, n)
    if b == 1:
        alpha, beta = run.tridiagonal(0)
        if n <= _STEMR_MAX_N or which == "LM":
            every, S = _tridiagonal_eigh(alpha, beta)
            theta = every
        else:  # long runs: eigenvectors of the wanted end only
            lo, hi = (n - k, n - 1) if which == "LA" else (0, k - 1)
            theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta, select="i", select_range=(lo, hi))
            every = scipy.linalg.eigvalsh_tridiagonal(alpha, beta)
    else:
        every, S = scipy.linalg.eigh(run.banded(0))
        theta = every
    if which == "LA":
        order = np.argsort(-theta, kind="stable")[:k]
    elif which == "SA":
        order = np.argsort(theta, kind="stable")[:k]
    else:
        order = np.argsort(-np.abs(theta), kind="stable")[:k]
    theta, S = theta[order], S[:, order]
    res = np.linalg.norm(run.last_beta(0) @ S[n - b :, :], axis=0)  # ‖B_m s[last block]‖
    return theta, S, res, every


def _tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of tridiag(β, α, β) by LAPACK ``stemr`` (MRRR), called directly.

    One call gives the wanted pairs and the gaps to every other Ritz value; it costs tens of µs for
    the n ≤ ~100 of a top-k run, a few times less than scipy's two wrapper calls it replaces.
    """
    n = alpha.shape[0]
    if n == 1:
        return alpha.astype(np.float64).copy(), np.ones((1, 1))
    e = np.zeros(n)
    e[: n - 1] = beta
    m, w, z, info = scipy.linalg.lapack.dstemr(np.array(alpha, dtype=np.float64), e, 0, 0.0, 0.0, 0, 0, compute_v=1)
    if info != 0 or m != n:  # MRRR refused (rare): the robust divide-and-conquer path
        return scipy.linalg.eigh_tridiagonal(alpha, beta)
    return w[:m], z[:, :m]
