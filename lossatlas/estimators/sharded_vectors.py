"""Vectors sharded like a model's parameters, and the Lanczos, SLQ and Hutchinson estimators over them.

Under FSDP (``torch.distributed.fsdp.fully_shard``) no rank holds a whole parameter vector: rank r
holds its shard of every parameter, a set of contiguous segments of the global flat vector (the
concatenation of the trainable parameters in ``named_parameters`` order). A :class:`ShardedSpace`
describes those segments; a vector of the space is the local tensor (p_r,) or block (p_r, K), and
every dot product, norm and Gram matrix is the local one all-reduced (summed over the ranks), so each
rank gets the same float64 scalars and runs the same control flow. The operator applied to a local
block returns the local block of the product (:class:`lossatlas.curvature.sharded.ShardedHessianOperator`).

The estimators are those of :mod:`lossatlas.estimators` with sharded vectors: Lanczos with full
reorthogonalization (Ghorbani, Krishnan & Xiao 2019, "An investigation into neural net optimization
via Hessian eigenvalue density"), stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017, "Fast
estimation of tr(f(A)) via stochastic Lanczos quadrature") and Hutchinson's trace estimator
(Hutchinson 1989). The small problems (Ritz values, error bounds, Gauss quadrature, the smoothed
density) reuse the single-process code. Random vectors are drawn by global position: element i of
vector j comes from chunk ⌊i/2¹⁶⌋ drawn by its own generator seeded by (seed, j, chunk), so the global
vector does not depend on the number of ranks or on how the parameters are sharded; a one-process
space (:meth:`ShardedSpace.whole`) gives the same vectors, which is how the single-process reference
is computed.

When the operator is approximate (finite differences, ``A.product_error`` = δ: ‖Ãu − Hu‖ ≤ δ for
unit u), the reported bounds carry it: a Ritz value θ_i = sᵢᵀ T sᵢ of the computed recurrence
Ã V = V T + β q eᵀ satisfies ‖H y_i − θ_i y_i‖ ≤ r_i + δ‖s_i‖₁ (y_i = V s_i; the product error of
the column combination is at most Σ_j |s_ij| δ), so an eigenvalue of H lies within
r_i + δ‖s_i‖₁ + rounding of θ_i (Parlett, *The Symmetric Eigenvalue Problem*, Thm 4-5-1); a
Hutchinson sample vᵀÃv is within ‖v‖²δ of vᵀHv; an SLQ run's first two quadrature moments
Σ τ_k² θ_k = qᵀÃq and Σ τ_k² θ_k² = ‖Ãq‖² are within δ and δ(2‖Ãq‖ + 3δ) of qᵀHq and ‖Hq‖².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from lossatlas.estimators._checks import (
    DISTRIBUTIONS,
    check_choice,
    check_positive_float,
    check_positive_int,
    probe_seed,
)
from lossatlas.estimators._recurrence import gram64
from lossatlas.estimators.density import (
    Density,
    _kernel_sum,
    _median_probe_outliers,
    find_bulk_edge,
    tridiag_quadrature,
)
from lossatlas.estimators.lanczos import CRITERIA, WHICH, EigResult, _due, _error, _ritz
from lossatlas.estimators.trace import MIN_SAMPLES_FOR_STOP, TraceEstimate, _stderr

CHUNK = 1 << 16  # elements of a random vector drawn by one generator (the unit of the counter-based draw)
STREAM_PROBES, STREAM_START, STREAM_RESTART = 0, 1, 2  # trace/SLQ probes, Lanczos start, restart vectors
_DGKS_ETA = 0.7071  # reorthogonalize again when the norm fell below η of ‖A q‖ (Daniel et al. 1976)
_BREAKDOWN_FACTOR = 50.0  # a residual norm ≤ this · eps · ‖T‖ counts as breakdown (as in _recurrence)
_ROUNDING_FACTOR = 16.0  # rounding floor of every eigenvalue bound: this · ε(dtype) · ‖T‖ (as in lanczos)
_INITIAL_ROWS = 32  # basis rows allocated up front (the basis grows by doubling)


@dataclass
class ShardedSpace:
    """The layout of this rank's share of a length-``size`` global vector, and its collectives.

    Args:
        size: P, the global length.
        segments: ``(global_start, length)`` of the local entries, in local order; the local vector is
            their concatenation. Over all ranks the segments partition [0, P).
        group: the process group of the all-reduces (None: the default group when ``active``).
        active: whether the all-reduces run (False: one process holds every segment).

    Example:
        One process holding all of a length-5 vector:

        >>> import torch
        >>> S = ShardedSpace.whole(5)
        >>> S.local_size, round(float(S.norms(torch.ones(1, 5, dtype=torch.float64))[0]) ** 2, 12)
        (5, 5.0)
    """

    size: int
    segments: list[tuple[int, int]]
    group: Any = None
    active: bool = False
    _layout: list | None = field(default=None, repr=False)  # every rank's segments (gather), once asked for

    @classmethod
    def whole(cls, size: int) -> "ShardedSpace":
        """The space of one process holding the whole vector (the single-process reference)."""
        return cls(int(size), [(0, int(size))])

    @property
    def local_size(self) -> int:
        """p_r: how many entries this rank holds."""
        return sum(n for _, n in self.segments)

    # ---- collectives ----------------------------------------------------------------------
    def allreduce(self, t: Tensor) -> Tensor:
        """Σ over ranks of ``t`` (a new tensor on t's device; t itself when not active)."""
        if not self.active:
            return t
        from lossatlas.distributed import _comm_device

        buf = t.detach().to(_comm_device()).clone()
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return buf.to(t.device)

    def gram(self, X: Tensor, Y: Tensor) -> Tensor:
        """X Yᵀ over the (sharded) last axis in float64: (..., m, p) × (..., n, p) → (..., m, n), all-reduced."""
        return self.allreduce(gram64(X, Y))

    def norms(self, W: Tensor) -> Tensor:
        """‖w‖ of each row of W (..., p) over the global vector, in float64."""
        sq = self.gram(W.unsqueeze(-2), W.unsqueeze(-2))[..., 0, 0]
        return torch.sqrt(sq)

    def rowdots(self, X: Tensor, Y: Tensor) -> Tensor:
        """x_iᵀ y_i of each row pair (..., p) over the global vector, in float64."""
        return self.gram(X.unsqueeze(-2), Y.unsqueeze(-2))[..., 0, 0]

    # ---- random vectors -------------------------------------------------------------------
    def probes(self, indices: Iterable[int], distribution: str, seed: int, dtype: torch.dtype,
               device: torch.device | str, stream: int = STREAM_PROBES) -> Tensor:
        """This rank's entries of random vectors number ``indices`` as columns of a (p_r, n) tensor.

        Entries [c·2¹⁶, (c+1)·2¹⁶) of global vector j are drawn by a generator seeded with
        ``probe_seed(seed, j, stream·2³² + c + 1)``; a rank draws only the chunks its segments touch,
        so the draw costs O(p_r + 2¹⁶·#segments) and gives every rank the entries of one global vector
        with E[v vᵀ] = I (Rademacher ±1 or standard normal), whatever the world size.
        """
        check_choice("distribution", distribution, DISTRIBUTIONS)
        indices = list(indices)
        out = torch.empty(self.local_size, len(indices), dtype=dtype, device=device)
        gen = torch.Generator(device="cpu")
        chunks = sorted({c for g0, n in self.segments if n for c in range(g0 // CHUNK, (g0 + n - 1) // CHUNK + 1)})
        for col, j in enumerate(indices):
            drawn: dict[int, Tensor] = {}
            for c in chunks:
                gen.manual_seed(probe_seed(seed, j, (stream << 32) + c + 1))
                length = min(CHUNK, self.size - c * CHUNK)
                buf = torch.empty(length, dtype=torch.float64)
                if distribution == "rademacher":
                    buf.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
                else:
                    buf.normal_(generator=gen)
                drawn[c] = buf
            pos = 0
            for g0, n in self.segments:
                piece = _read(drawn, g0, n)
                out[pos : pos + n, col] = piece.to(dtype=dtype, device=device)
                pos += n
        return out

    # ---- whole vectors (small P: tests and stored eigenvectors) ----------------------------
    def gather(self, x: Tensor) -> Tensor:
        """The global vector(s) (P,) or (P, n) from every rank's local entries, on every rank (CPU)."""
        single = x.ndim == 1
        X = x.reshape(-1, 1) if single else x
        n = X.shape[1]
        if not self.active:
            full = torch.empty(self.size, n, dtype=X.dtype)
            _place(full, self.segments, X.detach().cpu())
            return full[:, 0] if single else full
        layout = self.layout()
        width = max(sum(m for _, m in segs) for segs in layout)
        buf = torch.zeros(width, n, dtype=X.dtype)
        buf[: X.shape[0]] = X.detach().cpu()
        from lossatlas.distributed import _comm_device

        parts = [torch.empty_like(buf, device=_comm_device()) for _ in layout]
        torch.distributed.all_gather(parts, buf.to(_comm_device()), group=self.group)
        full = torch.empty(self.size, n, dtype=X.dtype)
        for segs, part in zip(layout, parts):
            _place(full, segs, part.cpu())
        return full[:, 0] if single else full

    def scatter(self, full: Tensor) -> Tensor:
        """This rank's entries of a global vector (P,) or block (P, n) that every rank holds."""
        if not self.segments:
            return full[:0]
        return torch.cat([full[g0 : g0 + n] for g0, n in self.segments])

    def layout(self) -> list[list[tuple[int, int]]]:
        """Every rank's segments, in rank order (one all_gather_object, then cached)."""
        if self._layout is None:
            if not self.active:
                self._layout = [list(self.segments)]
            else:
                world = torch.distributed.get_world_size(self.group)
                got: list = [None] * world
                torch.distributed.all_gather_object(got, list(self.segments), group=self.group)
                self._layout = got
        return self._layout


def _read(drawn: dict[int, Tensor], g0: int, n: int) -> Tensor:
    """Entries [g0, g0 + n) of the global vector from its drawn chunks."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    pieces, i = [], g0
    while i < g0 + n:
        c = i // CHUNK
        lo, hi = i - c * CHUNK, min(CHUNK, g0 + n - c * CHUNK)
        pieces.append(drawn[c][lo:hi])
        i = c * CHUNK + hi
    return torch.cat(pieces)


def _place(full: Tensor, segments: Sequence[tuple[int, int]], local: Tensor) -> None:
    """Write a rank's local rows into their global positions of ``full``."""
    pos = 0
    for g0, n in segments:
        full[g0 : g0 + n] = local[pos : pos + n]
        pos += n


def space_of(A: Any) -> ShardedSpace:
    """The operator's :class:`ShardedSpace` (``A.space``), or a one-process space for a plain operator."""
    space = getattr(A, "space", None)
    return space if space is not None else ShardedSpace.whole(int(A.shape[0]))


def _apply(A: Any, X: Tensor) -> Tensor:
    """``A @ X`` for a local block (p_r, K), checked to keep the shape."""
    out = A @ X
    if tuple(out.shape) != tuple(X.shape):
        raise ValueError(f"operator returned {tuple(out.shape)} for a local block of shape {tuple(X.shape)}; "
                         "a sharded operator must map local blocks to local blocks")
    return out


class ShardedLanczos:
    """R Lanczos runs (block size 1) with full reorthogonalization on sharded vectors.

    The classical recurrence w = A q_j − β_{j−1} q_{j−1}, α_j = q_jᵀ w, w ← w − α_j q_j,
    w ← w − V(Vᵀw) (twice when ‖w‖ < 0.7071‖A q_j‖, DGKS), β_j = ‖w‖, q_{j+1} = w/β_j, with every
    dot product all-reduced in float64; breakdown (β_j ≤ 50 ε‖T‖) continues from a random vector
    orthogonal to the basis. It offers what :func:`lossatlas.estimators.lanczos._ritz` reads
    (``n``, ``b``, ``tridiagonal``, ``last_beta``), so the Ritz values and bounds are the
    single-process ones.
    """

    b = 1

    def __init__(self, A: Any, space: ShardedSpace, start: Tensor, max_iter: int, restart_seeds: Sequence[int]):
        self.A, self.space = A, space
        self.R, p = start.shape
        self.dtype, self.device = start.dtype, start.device
        self.eps = float(torch.finfo(self.dtype).eps)
        self.cap = min(int(max_iter), space.size)
        self.restart_seeds = list(restart_seeds)
        self.restarts = [0] * self.R
        self.V = torch.empty(self.R, min(self.cap, _INITIAL_ROWS), p, dtype=self.dtype, device=self.device)
        norms = space.norms(start)
        if not bool(torch.all(norms > 0)) or not bool(torch.isfinite(norms).all()):
            raise ValueError("start vectors must be finite and non-zero")
        self.V[:, 0] = start / norms.to(self.dtype)[:, None]
        self.alphas: list[np.ndarray] = []  # α_j per run, (R,)
        self.betas: list[np.ndarray] = []  # β_j per run, (R,)
        self.anorm = np.zeros(self.R)
        self.steps = 0
        self.matvecs = 0
        self.first_product_norm = np.zeros(self.R)  # ‖A q_1‖ per run (SLQ's second-moment bound)
        self.exhausted = False

    @property
    def n(self) -> int:
        """Order of T (= steps)."""
        return self.steps

    def tridiagonal(self, r: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(alpha (n,), beta (n−1,)) of run ``r``, float64."""
        return np.array([a[r] for a in self.alphas]), np.array([bb[r] for bb in self.betas[:-1]])

    def last_beta(self, r: int = 0) -> np.ndarray:
        """β_m as a (1, 1) array: the residual of a Ritz pair (θ, V s) is β_m |s_m|."""
        return np.array([[self.betas[-1][r]]])

    def basis(self, r: int = 0) -> Tensor:
        """This rank's entries of the basis rows of run ``r``, (n, p_r)."""
        return self.V[r, : self.n]

    def step(self, need_next: bool = True) -> None:
        """One step of every run: one ``A @ (p_r, R)`` product."""
        j, sp = self.steps, self.space
        Q = self.V[:, j]  # (R, p)
        W = _apply(self.A, Q.T.contiguous()).T.contiguous()  # (R, p)
        self.matvecs += self.R
        ref = sp.norms(W)  # ‖A q‖: the DGKS reference, identical on every rank
        if j == 0:
            self.first_product_norm = ref.cpu().numpy().copy()
        if j > 0:
            W -= torch.as_tensor(self.betas[-1], dtype=self.dtype, device=self.device)[:, None] * self.V[:, j - 1]
        alpha = sp.rowdots(Q, W)  # (R,) float64, all-reduced
        W -= alpha.to(self.dtype)[:, None] * Q
        V = self.V[:, : j + 1]
        for _ in range(2):  # classical Gram–Schmidt against the whole basis, twice if needed
            C = sp.gram(W.unsqueeze(1), V)  # (R, 1, j+1) float64
            W = W - (C.to(self.dtype) @ V)[:, 0]
            nrm = sp.norms(W)
            if not bool((nrm < _DGKS_ETA * ref).any()):
                break
        a_np, n_np = alpha.cpu().numpy(), nrm.cpu().numpy()
        self.anorm = np.maximum(self.anorm, np.abs(a_np))
        broken = n_np <= _BREAKDOWN_FACTOR * self.eps * np.maximum(self.anorm, np.finfo(float).tiny)
        beta = np.where(broken, 0.0, n_np)
        self.alphas.append(a_np)
        self.betas.append(beta)
        self.anorm = np.maximum(self.anorm, beta)
        self.steps += 1
        room = need_next and j + 2 <= self.cap
        if not room:
            return
        if j + 2 > self.V.shape[1]:
            grown = torch.empty(self.R, min(self.cap, 2 * self.V.shape[1]), self.V.shape[2], dtype=self.dtype,
                                device=self.device)
            grown[:, : self.V.shape[1]] = self.V
            self.V = grown
        safe = torch.where(nrm > 0, nrm, torch.ones_like(nrm)).to(self.dtype)
        self.V[:, j + 1] = W / safe[:, None]
        for r in np.flatnonzero(broken):
            self.V[r, j + 1] = self._random_orthogonal(int(r), j + 1)

    def _random_orthogonal(self, r: int, basis_len: int) -> Tensor:
        """A random unit vector orthogonal to run r's basis (the restart after a breakdown)."""
        z = self.space.probes([self.restarts[r]], "normal", self.restart_seeds[r], self.dtype, self.device,
                              stream=STREAM_RESTART)[:, 0]
        self.restarts[r] += 1
        V = self.V[r, :basis_len]
        for _ in range(2):
            z = z - V.T @ self.space.gram(V, z[None])[:, 0].to(self.dtype)
        nrm = float(self.space.norms(z[None])[0])
        if nrm <= 1e3 * self.eps * math.sqrt(self.space.size):
            self.exhausted = True
            return torch.zeros_like(z)
        return z / nrm


def sharded_lanczos_eigs(
    A: Any,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    criterion: str = "residual",
    progress: Callable[[int, int], None] | None = None,
) -> EigResult:
    """The k extreme eigenpairs of a sharded operator by Lanczos with full reorthogonalization.

    The algorithm, stopping rule and bounds of :func:`lossatlas.estimators.lanczos_eigs` (block size 1):
    stop once every wanted pair has its ``criterion`` bound ≤ ``tol·max(|θ_i|, ε^{2/3}‖T‖)``; the
    start vector is normal, drawn by global position (:meth:`ShardedSpace.probes`, stream 1).
    With ``A.product_error`` = δ > 0 (finite-difference products) every reported
    ``error_bounds[i]`` is the residual bound r_i + δ‖s_i‖₁ + 16ε‖T‖ on the distance from θ_i to an
    eigenvalue of the exact operator (the Kato–Temple refinement assumes exact products and is not
    used), and ``converged[i]`` says that bound is ≤ tol·scale. Eigenvectors are this rank's entries
    (p_r, k).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> sharded_lanczos_eigs(A, k=2, tol=1e-10).eigenvalues.round(8).tolist()
        [50.0, 49.0]
    """
    space = space_of(A)
    P, dtype, device = space.size, A.dtype, torch.device(A.device)
    k = check_positive_int("k", k)
    if k > P:
        raise ValueError(f"k={k} exceeds the operator size P={P}; ask for at most {P} eigenpairs")
    check_choice("which", which, WHICH)
    check_choice("criterion", criterion, CRITERIA)
    tol = check_positive_float("tol", tol)
    max_iter = min(P, max(20, max(100, 10 * k)) if max_iter is None else check_positive_int("max_iter", max_iter))
    start = space.probes([0], "normal", seed, dtype, device, stream=STREAM_START)[:, 0]
    run = ShardedLanczos(A, space, start[None], max_iter, [probe_seed(seed, 0, STREAM_RESTART)])
    tiny_rel = float(torch.finfo(dtype).eps) ** (2 / 3)

    def floor() -> float:
        return _ROUNDING_FACTOR * float(torch.finfo(dtype).eps) * float(run.anorm[0])

    ritz = None
    while run.steps < max_iter and not run.exhausted:
        run.step(need_next=run.steps + 1 < max_iter)
        if progress is not None:
            progress(run.steps, max_iter)
        if run.n < k or not _due(run.n, k, run.steps, max_iter):
            continue
        ritz = _ritz(run, k, which)
        scale = np.maximum(np.abs(ritz[0]), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
        if np.all(_error(ritz, which, floor(), criterion) <= tol * scale):
            break
    if ritz is None or ritz[1].shape[0] != run.n:
        ritz = _ritz(run, k, which)
    theta, S, res = ritz[0], ritz[1], ritz[2]
    scale = np.maximum(np.abs(theta), tiny_rel * max(run.anorm[0], np.finfo(float).tiny))
    delta = float(getattr(A, "product_error", 0.0) or 0.0)
    if delta > 0:  # products carry an error ≤ δ per unit vector: the residual bound with it (module docstring)
        bounds = res + floor() + delta * np.abs(S).sum(axis=0)
        converged = bounds <= tol * scale
    else:
        bounds = _error(ritz, which, floor(), "eigenvalue")
        converged = _error(ritz, which, floor(), criterion) <= tol * scale
    vecs = None
    if return_eigenvectors:
        S_t = torch.as_tensor(S, dtype=dtype, device=device)
        vecs = (S_t.T @ run.basis(0)).T.contiguous()  # (p_r, k)
    return EigResult(eigenvalues=theta, eigenvectors=vecs, residuals=res, converged=converged,
                     matvecs=run.matvecs, iterations=run.steps, which=which, error_bounds=bounds)


@dataclass(frozen=True)
class ShardedTraceEstimate(TraceEstimate):
    """A Hutchinson estimate with ``product_bound``: |estimate − the same probes' exact mean| ≤ it."""

    product_bound: float = 0.0  # mean_k ‖v_k‖² · δ (0 for exact products)


def sharded_hutchinson_trace(
    A: Any,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    block: int = 16,
    target_stderr: float | None = None,
) -> ShardedTraceEstimate:
    """tr(A) ≈ (1/K) Σ_k v_kᵀ A v_k with E[v vᵀ] = I (Hutchinson 1989), on sharded vectors.

    Probes come from :meth:`ShardedSpace.probes` (stream 0), ``block`` at a time; v_kᵀ A v_k is
    the all-reduced local dot product in float64. ``target_stderr`` stops after the first block at
    which the standard error is ≤ the target (at least 8 samples). ``product_bound`` = mean ‖v_k‖²·δ
    bounds the change of the estimate from the products' error δ (``A.product_error``).

    Example:
        >>> import torch
        >>> est = sharded_hutchinson_trace(torch.diag(torch.arange(1.0, 11.0)), 8)
        >>> round(est.value, 6), est.stderr
        (55.0, 0.0)
    """
    space = space_of(A)
    dtype, device = A.dtype, torch.device(A.device)
    K = check_positive_int("num_matvecs", num_matvecs)
    block = check_positive_int("block", block)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if target_stderr is not None:
        target_stderr = check_positive_float("target_stderr", target_stderr)
    samples, sq = [], []
    done = 0
    while done < K:
        size = min(block, K - done)
        V = space.probes(range(done, done + size), distribution, seed, dtype, device)  # (p_r, size)
        AV = _apply(A, V)
        samples.append(space.rowdots(V.T, AV.T).cpu().numpy())
        sq.append((space.norms(V.T) ** 2).cpu().numpy())
        done += size
        if target_stderr is not None and done >= MIN_SAMPLES_FOR_STOP and _stderr(np.concatenate(samples)) <= target_stderr:
            break
    x = np.concatenate(samples)
    delta = float(getattr(A, "product_error", 0.0) or 0.0)
    return ShardedTraceEstimate(value=float(x.mean()), stderr=_stderr(x), matvecs=done, samples=x,
                                method="hutchinson", product_bound=float(np.concatenate(sq).mean()) * delta)


@dataclass(frozen=True)
class ShardedDensity(Density):
    """An SLQ density with the bounds the products' error δ puts on each run's first two moments.

    ``moment_bounds`` (n_v, 2): |Σ_k τ_k² θ_k − qᵀHq| ≤ [l, 0] and |Σ_k τ_k² θ_k² − ‖Hq‖²| ≤ [l, 1]
    for run l's unit start q (δ and δ(2‖Ãq‖ + 3δ); zeros for exact products).
    """

    moment_bounds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def sharded_slq_density(
    A: Any,
    *,
    num_probes: int = 4,
    num_steps: int = 90,
    sigma_squared: float = 1e-5,
    grid_len: int = 10000,
    grid_expand: float = 1e-2,
    seed: int = 0,
    distribution: str = "rademacher",
    progress: Callable[[int, int], None] | None = None,
) -> ShardedDensity:
    """Spectral density by stochastic Lanczos quadrature on sharded vectors (linear scale).

    φ̂(t) = (1/n_v) Σ_l Σ_k τ_k^(l)² g_σ(t − θ_k^(l)) from n_v runs of m Lanczos steps with normalized
    random starts (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019); grid and kernel as
    :func:`lossatlas.estimators.slq_density` (grid = linspace(mean min θ − expand, mean max θ + expand),
    σ² = sigma_squared·max(1, grid width), Σ density·Δgrid = 1). The n_v runs advance together, one
    ``A @ (p_r, n_v)`` per step; start vector l is probe l of :meth:`ShardedSpace.probes`.

    Example:
        >>> import torch
        >>> spectrum = torch.cat([torch.linspace(0.0, 1.0, 40), torch.tensor([10.0, 20.0])]).double()
        >>> d = sharded_slq_density(torch.diag(spectrum), num_probes=2, num_steps=30, sigma_squared=1e-4, grid_len=2000)
        >>> d.outliers.round(6).tolist(), d.matvecs
        ([20.0, 10.0], 60)
    """
    space = space_of(A)
    P, dtype, device = space.size, A.dtype, torch.device(A.device)
    n_v = check_positive_int("num_probes", num_probes)
    m = check_positive_int("num_steps", num_steps)
    if m > P:
        raise ValueError(f"num_steps={m} exceeds the operator size P={P}; use num_steps <= {P}")
    grid_len = check_positive_int("grid_len", grid_len, minimum=2)
    sigma_squared = check_positive_float("sigma_squared", sigma_squared)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    V0 = space.probes(range(n_v), distribution, seed, dtype, device)  # (p_r, n_v)
    run = ShardedLanczos(A, space, V0.T.contiguous(), m, [probe_seed(seed, j, STREAM_RESTART) for j in range(n_v)])
    for i in range(m):
        run.step(need_next=i + 1 < m)
        if progress is not None:
            progress(i + 1, m)
    alpha = np.stack([run.tridiagonal(r)[0] for r in range(n_v)])
    beta = np.stack([run.tridiagonal(r)[1] for r in range(n_v)])
    nodes, weights = tridiag_quadrature(alpha, beta)
    lo = float(np.mean(nodes.min(axis=1))) - grid_expand
    hi = float(np.mean(nodes.max(axis=1))) + grid_expand
    if hi - lo <= 0:
        hi, lo = hi + 0.5, lo - 0.5
    u = np.linspace(lo, hi, grid_len)
    var = sigma_squared * max(1.0, hi - lo)
    dens = _kernel_sum(u, nodes.ravel(), weights.ravel(), var) / n_v
    total = dens.sum() * (u[1] - u[0])
    if total > 0:
        dens /= total
    edge = find_bulk_edge(u, dens)
    delta = float(getattr(A, "product_error", 0.0) or 0.0)
    aq = run.first_product_norm
    bounds = np.stack([np.full(n_v, delta), delta * (2 * aq + 3 * delta)], axis=1)
    return ShardedDensity(grid=u, density=dens, nodes=nodes, weights=weights, sigma_squared_abs=float(var),
                          num_probes=n_v, num_steps=m, matvecs=run.matvecs,
                          outliers=_median_probe_outliers(nodes, edge, "linear", 1e-5), bulk_edge=float(edge),
                          moment_bounds=bounds)


__all__ = [
    "ShardedSpace",
    "ShardedLanczos",
    "space_of",
    "sharded_lanczos_eigs",
    "sharded_hutchinson_trace",
    "sharded_slq_density",
    "ShardedTraceEstimate",
    "ShardedDensity",
    "CHUNK",
]
