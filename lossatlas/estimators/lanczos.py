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
from lossatlas.estimators._recurrence import BlockLanczos, gram64, norm64
from lossatlas.progress import report

WHICH: tuple[str, ...] = ("LA", "SA", "LM")
_ROUNDING_FACTOR = 16.0  # rounding floor of every error bound: this · ε(dtype) · ‖T‖
_TRUSTED_NEIGHBOUR = 0.25  # a neighbour Ritz value bounds a gap only once its residual is ≤ this · the gap
_GAP_SHARE = 0.5  # the Kato–Temple distance θ_i − a is taken as this share of the apparent gap θ_i − θ_j − r_j
_STEMR_MAX_N = 64  # up to this order all Ritz pairs in one LAPACK call are cheaper than two selective ones
REORTH: tuple[str, ...] = ("full", "none")


@dataclass(frozen=True)
class EigResult:
    """Ritz pairs of a symmetric operator with their residual norms ‖A y − θ y‖.

    ``eigenvalues`` are sorted descending for ``"LA"``, ascending for ``"SA"`` and by descending
    magnitude for ``"LM"``; ``eigenvectors`` (P, k) are unit columns in the operator's dtype (or
    None); ``error_bounds[i]`` bounds |λ − θ_i| for the eigenvalue λ that θ_i approximates
    (min of r_i and the Kato–Temple bound where a converged neighbour makes it safe, plus a
    rounding floor ≈ 16 ε‖T‖; see :func:`lanczos_eigs`); ``converged[i]`` says the bound the
    criterion stops on (r_i + floor for ``"residual"``, ``error_bounds[i]`` for ``"eigenvalue"``)
    is ≤ ``tol·max(|θ_i|, ε^{2/3}‖T‖)`` (ε of the operator dtype), so a converged pair always has
    ``error_bounds[i] ≤ tol·scale``. Converged pairs are accurate Ritz pairs, not a proof that no
    eigenvalue was missed: a single start vector can miss copies of a multiple eigenvalue (see
    :func:`lanczos_eigs`).
    """

    eigenvalues: np.ndarray
    eigenvectors: Tensor | None
    residuals: np.ndarray
    converged: np.ndarray
    matvecs: int
    iterations: int
    which: str
    error_bounds: np.ndarray | None = None  # min(r, r²/(θ − a)) + floor: a bound on |λ − θ| (``_error``)


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
    Krishnan & Xiao 2019). The small problem and every dot product of the recurrence accumulate in
    float64 (``eigh_tridiagonal`` / banded ``eigh``); the basis is kept in the operator's dtype. On breakdown (an invariant Krylov space)
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
        criterion: ``"residual"`` (default) stops when every wanted r_i + floor ≤ tol·|θ_i| (an
            eigenvalue lies within r_i of θ_i); ``"eigenvalue"`` stops when the eigenvalue error
            bound min(r_i, r_i²/δ_i) + floor ≤ tol·|θ_i|: the one-sided Kato–Temple bound
            (Kato 1949; Parlett, *The Symmetric Eigenvalue Problem*, §10-5) with θ_i ≤ λ from Cauchy
            interlacing and δ_i = ½(|θ_i − θ_j| − r_j), half the distance from θ_i to the bound
            θ_j + r_j on the next eigenvalue inward (θ_j its Ritz value) — used only when that
            neighbour is converged relative to the gap (r_j ≤ 0.25·|θ_i − θ_j|), never with an
            unconverged Ritz value standing in for an unknown eigenvalue (inside a cluster the bound
            is r_i). floor = 16·ε·‖T‖ (ε of the dtype) covers the rounding of the
            products. Eigenvalues converge quadratically faster than vectors, so "eigenvalue" needs
            fewer products for isolated eigenvalues when only λ is wanted and never reports a
            bound below the true error of a seen eigenvalue; ``converged`` follows it too.

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

    def floor() -> float:
        # rounding in the products and the basis: Ritz values are exact for a perturbed A + E, ‖E‖ ≈ ε‖A‖
        return _ROUNDING_FACTOR * float(torch.finfo(dtype).eps) * float(run.anorm[0])

    ritz = None
    report(run.matvecs, max_iter * b, "products", "Lanczos", bound=True)  # the task's start: rate and time left
    while run.steps < max_iter and not run.exhausted:
        run.step(need_next=run.steps + 1 < max_iter)
        if progress is not None:
            progress(run.steps, max_iter)
        report(run.matvecs, max_iter * b, "products", "Lanczos", bound=True)  # a cap: converged runs stop early
        if run.n < k or not _due(run.n, k, run.steps, max_iter):
            continue
        ritz = _ritz(run, k, which)
        theta, _, res, every, every_res, idx = ritz
        scale = np.maximum(np.abs(theta), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
        if np.all(_error(ritz, which, floor(), criterion) <= tol * scale):
            break
    if ritz is None or ritz[0].shape[0] < min(k, run.n) or _stale(ritz, run):
        ritz = _ritz(run, k, which)
    theta, S, res, every, every_res, idx = ritz
    scale = np.maximum(np.abs(theta), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
    bounds = _error(ritz, which, floor(), "eigenvalue")
    vecs = None
    if return_eigenvectors:
        S_t = torch.as_tensor(S, dtype=dtype, device=run.device)  # (n, k), beside the basis
        vecs = (S_t.T @ run.basis(0)).T.contiguous()  # (P, k)
    return EigResult(
        eigenvalues=theta,
        eigenvectors=vecs,
        residuals=res,
        converged=_error(ritz, which, floor(), criterion) <= tol * scale,  # the bound it stopped on ≤ tol·scale
        matvecs=run.matvecs,
        iterations=run.steps,
        which=which,
        error_bounds=bounds,
    )


def _error(ritz: tuple, which: str, floor: float, criterion: str) -> np.ndarray:
    """The bound on |λ − θ_i| a criterion stops on: r_i + floor, or the Kato–Temple bound where it is safe.

    ``"residual"``: r_i + floor, r_i = ‖A y_i − θ_i y_i‖ (some eigenvalue lies within r_i of θ_i;
    Parlett, The Symmetric Eigenvalue Problem, Thm 4-5-1). ``"eigenvalue"``: also the one-sided
    Kato–Temple bound (Kato 1949; Temple 1928; Parlett §10-5) for the eigenvalue λ that θ_i
    approximates from its side of the spectrum: for ``"LA"`` Cauchy interlacing gives λ ≥ θ_i, and
    if no eigenvalue lies in (a, λ) for some a < θ_i, then

        0 ≤ λ − θ_i ≤ r_i² / (θ_i − a)

    (mirrored for ``"SA"`` and for the negative Ritz values of ``"LM"``). The level a must bound
    the next eigenvalue inward; Ritz values are no such bound inside a cluster (an unconverged Ritz
    value is a mixture; eigenvalues of small weight lie up to r_j/|c| from it), so the neighbour
    θ_j (the next Ritz value inward, of any rank, wanted or not) is used only when it is converged
    relative to the gap, r_j ≤ 0.25·|θ_i − θ_j|, and is not the Ritz value at the far end of the
    spectrum (an isolated opposite end converges within a few products, when it may be the only
    other Ritz value, with every unseen eigenvalue between), and then with half the apparent distance,
    θ_i − a = ½(|θ_i − θ_j| − r_j): the margin covers eigenvalues the Krylov space sees only
    faintly, whose Ritz values have not yet separated (on the clustered spectra of the test suite
    the worst true error is 0.61 of this bound; with the full distance it was 1.21); otherwise the
    bound is r_i. Every
    bound includes ``floor`` ≈ 16 ε‖T‖, the rounding of the products and the basis. The bound is
    for the eigenvalues the Krylov space sees: a copy of a multiple eigenvalue (or an eigenvector
    orthogonal to the start) is never seen and no bound can account for it.
    """
    theta, _, res, every, every_res, idx = ritz
    r = res + floor
    if criterion == "residual":
        return r
    n = every.shape[0]
    inward = np.where((which == "SA") | ((which == "LM") & (theta < 0)), 1, -1)  # +1: next Ritz value above
    j = idx + inward
    has = (j >= 1) & (j < n - 1)  # the neighbour, not the far end of the spectrum (that end converges first)
    jj = np.clip(j, 0, n - 1)
    gap = np.where(has, np.abs(theta - every[jj]), 0.0)  # distance to the next Ritz value inward
    rj = np.where(has, every_res[jj] + floor, np.inf)  # its residual (inf: not computed)
    trusted = has & (rj <= _TRUSTED_NEIGHBOUR * gap)
    delta = np.where(trusted, _GAP_SHARE * (gap - rj), 0.0)  # θ_i − a ≥ 0.375·gap: half the apparent gap
    with np.errstate(divide="ignore"):
        quad = np.where(trusted, r**2 / np.where(trusted, delta, 1.0), np.inf)
    return np.minimum(r, quad + floor)  # the floor also on the quadratic bound: rounding is not squared


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
    basis_device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The Lanczos tridiagonal T_m = tridiag(β, α, β) of A for a start vector, or for n at once.

    ``v0`` of shape (P,) gives ``alpha`` (m,) and ``beta`` (m−1,); (P, n) runs n independent
    recurrences, one per normalized column, with one ``A @ (P, n)`` product per step, and gives
    (n, m) and (n, m−1). Gauss quadrature with T_m is exact for polynomials of degree ≤ 2m−1:
    Σ_k τ_k² θ_k^j = vᵀA^j v. A breakdown (β ≈ 0) is recorded as 0
    and the run continues from a random orthogonal vector (``seed``; a sequence gives each run its
    own restart seed), which leaves the quadrature unchanged. Float64 in the small problem, the
    operator's dtype in the basis. ``basis_device`` as in :func:`lanczos_eigs`: the n·m·P basis
    values on ``"cpu"`` or memory-mapped on ``"disk"`` (default: the operator's device).

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
    on_disk = basis_device == "disk"
    if basis_device is not None:  # the basis (and the restart generators) live off the operator's device
        start = start.to("cpu" if on_disk else basis_device)
        if isinstance(seed, (list, tuple, range)):
            gens = [make_generator(s, start.device) for s in seed]
        else:
            gens = make_generator(seed, start.device)
    run = BlockLanczos(A, start, m, reorth, gens, on_disk=on_disk)
    report(0, m * n, "products", "Lanczos")
    for i in range(m):
        run.step(need_next=i + 1 < m)
        if progress is not None:
            progress(i + 1, m)
        report((i + 1) * n, m * n, "products", "Lanczos")  # one product per start vector and step
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
        theta = float(gram64(v[None], w[None])[0, 0])  # accumulated in float64 whatever the dtype
        res = float(norm64(w - theta * v))
        nw = float(norm64(w))
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


def _ritz(run: BlockLanczos, k: int, which: str) -> tuple:
    """The wanted Ritz pairs and their neighbours.

    Returns θ (k,), their T-eigenvectors S (n, k), residual norms (k,), all Ritz values ascending
    (n,), the residual of each Ritz value (n,; NaN where not computed — long b = 1 runs compute
    only the wanted end and the next one inward) and the index of each wanted one in that list.
    """
    n, b = run.n, run.b
    k = min(k, n)
    every_res = np.full(n, np.nan)
    if b == 1:
        alpha, beta = run.tridiagonal(0)
        if n <= _STEMR_MAX_N or which == "LM" or k + 1 >= n:
            every, S_all = _tridiagonal_eigh(alpha, beta)
            cols = np.arange(n)
        else:  # long runs: eigenvectors of the wanted end and the next Ritz value inward only
            lo, hi = (n - k - 1, n - 1) if which == "LA" else (0, k)
            vals, S_all = scipy.linalg.eigh_tridiagonal(alpha, beta, select="i", select_range=(lo, hi))
            every = scipy.linalg.eigvalsh_tridiagonal(alpha, beta)
            every[lo : hi + 1] = vals  # the same numbers as the selected pairs
            cols = np.arange(lo, hi + 1)
    else:
        every, S_all = scipy.linalg.eigh(run.banded(0))
        cols = np.arange(n)
    every_res[cols] = np.linalg.norm(run.last_beta(0) @ S_all[n - b :, :], axis=0)  # ‖B_m s[last block]‖
    sub = every[cols]
    if which == "LA":
        order = np.argsort(-sub, kind="stable")[:k]
    elif which == "SA":
        order = np.argsort(sub, kind="stable")[:k]
    else:
        order = np.argsort(-np.abs(sub), kind="stable")[:k]
    idx = cols[order]
    return every[idx], S_all[:, order], every_res[idx], every, every_res, idx


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
