"""The (block) Lanczos recurrence shared by the eigensolver and SLQ.

Full reorthogonalization against every earlier basis vector, as in Ghorbani, Krishnan & Xiao 2019
(google/spectral-density).

``R`` independent runs of block size ``b`` advance together: every step applies the operator
once to all ``R·b`` current vectors, ``A @ (P, R·b)``, which is much cheaper per vector than
separate products for the real curvature operators. With ``R = 1`` this is (block) Lanczos for
eigenvalues; with ``b = 1`` and ``R = n_v`` it is the batch of SLQ runs.

Per run, column form (Golub & Underwood 1977; b = 1 is the classical recurrence):

    A Q_j = Q_{j-1} B_{j-1}ᵀ + Q_j A_j + Q_{j+1} B_j,     Q_{j+1} B_j = QR of the residual,

so V_n = [Q_1 … Q_j] spans the block Krylov space and T_n = V_nᵀ A V_n is block tridiagonal with
A_j on the diagonal and B_j (upper triangular) below it. Full reorthogonalization subtracts the
projection on all of V_n, classical Gram–Schmidt run twice when needed (DGKS criterion against
‖A q_j‖, which fires whenever the recurrence cancelled more than 1/√2 of the product — in every
dtype). Breakdown (a residual column ≈ 0: the Krylov space is invariant) sets that
column of B_j to zero and continues from a random vector orthogonal to V_n (PyHessian's restart),
so no NaN appears and T_n stays a valid projection.

Storage: the basis is kept as rows, ``V[r]`` of shape (n, P), so ``V[r, :n]`` is contiguous and
the reorthogonalization is two batched GEMMs. The small matrices are kept in float64 NumPy, and
every dot product (α_j, B_j, the reorthogonalization coefficients, norms) accumulates in float64
whatever the basis dtype (``gram64``: slices upcast, no float64 copy of the basis).
``on_disk=True`` keeps the basis in a ``numpy.memmap`` over an anonymous temporary file (under
``tempfile.gettempdir()``, i.e. $TMPDIR), for when max_iter·b·P floats fit neither the device nor RAM;
the file has no name in the directory and its space is freed when the basis is.
"""

from __future__ import annotations

import tempfile
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lossatlas.estimators._checks import apply

_DGKS_ETA = 0.7071  # reorthogonalize again when the norm dropped below η of its value (Daniel et al. 1976)
_BREAKDOWN_FACTOR = 50.0  # a residual norm ≤ this · eps · ‖T‖ counts as breakdown
_INITIAL_ROWS = 32  # basis rows allocated up front
_CHUNK_ELEMS = 1 << 22  # float64 elements upcast at a time by ``gram64`` (32 MiB)


def gram64(X: Tensor, Y: Tensor) -> Tensor:
    """X Yᵀ over the last axis, accumulated in float64: (..., m, P) × (..., n, P) → (..., m, n) float64.

    Vectors stay in their dtype; slices of at most 2²² elements are upcast, so a float32 or bf16
    basis gets float64 dot products without a float64 copy of the basis.
    """
    if X.dtype == torch.float64 and Y.dtype == torch.float64:
        return X @ Y.transpose(-1, -2)
    P = X.shape[-1]
    rows = max(1, X.shape[:-1].numel() + Y.shape[:-1].numel())
    step = max(1024, _CHUNK_ELEMS // rows)
    out = None
    for s0 in range(0, P, step):
        part = X[..., s0 : s0 + step].double() @ Y[..., s0 : s0 + step].double().transpose(-1, -2)
        out = part if out is None else out + part
    return out


def norm64(W: Tensor) -> Tensor:
    """‖w‖ of each row of W (..., P), accumulated in float64 (float64 result)."""
    if W.dtype == torch.float64:
        return torch.linalg.vector_norm(W, dim=-1)
    return torch.sqrt(torch.diagonal(gram64(W.unsqueeze(-2), W.unsqueeze(-2)), dim1=-2, dim2=-1)[..., 0])


class BlockLanczos:
    """R block-Lanczos runs of block size b on one operator, advanced one block step at a time.

    Args:
        A: the symmetric operator (``shape``, ``dtype``, ``device``, ``A @ V``).
        start: (R, b, P) start blocks as rows; each run's rows are orthonormalized here (rank
            deficiency is filled with random orthogonal vectors).
        max_iter: most block steps any run will take (the basis holds ``max_iter·b`` rows, ≤ P).
        reorth: ``"full"`` (reorthogonalize against the whole basis) or ``"none"``.
        generator: the seeded generator for restart vectors, or one per run (then each run's
            restarts do not depend on which other runs share the batch).
        on_disk: keep the basis in a memory-mapped temporary file (CPU; float32/float64 only).
    """

    def __init__(self, A: Any, start: Tensor, max_iter: int, reorth: str,
                 generator: torch.Generator | Sequence[torch.Generator], on_disk: bool = False):
        R, b, P = start.shape
        self.A, self.R, self.b, self.P = A, R, b, P
        self.reorth = reorth
        self.generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * R
        if len(self.generators) != R:
            raise ValueError(f"got {len(self.generators)} generators for {R} Lanczos runs; pass one per run")
        self.dtype, self.device = start.dtype, start.device
        self.eps = float(torch.finfo(self.dtype).eps)
        self.cap = min(max_iter * b, P)
        if on_disk:  # all rows at once: the file is sparse, untouched rows cost no disk
            self.V = _disk_tensor((R, self.cap, P), self.dtype)
        else:  # the basis grows by doubling, so a run that converges early never touches max_iter rows
            self.V = torch.empty(R, min(self.cap, max(2 * b, _INITIAL_ROWS)), P, dtype=self.dtype, device=self.device)
        self.alphas: list[np.ndarray] = []  # A_j, each (R, b, b)
        self.betas: list[np.ndarray] = []  # B_j, each (R, b, b), upper triangular
        self.anorm = np.zeros(R)  # running estimate of ‖T‖ per run (for breakdown thresholds)
        self.steps = 0
        self.matvecs = 0
        self.exhausted = False  # no orthogonal direction left for a restart
        self._B_prev: Tensor | None = None  # B_{j-1} in the basis dtype, (R, b, b)
        first = self._orthonormalize(start)
        self.V[:, :b] = first

    @property
    def n(self) -> int:
        """Size of the current Krylov basis (= order of T)."""
        return self.steps * self.b

    def step(self, need_next: bool = True) -> None:
        """One block step: one ``A @ (P, R·b)`` product, extending T by A_j and B_j."""
        if self.R == 1 and self.b == 1:
            return self._step_single(need_next)
        return self._step_block(need_next)

    def _step_block(self, need_next: bool) -> None:
        """``step`` for R runs of block size b (batched tensor code)."""
        R, b, P = self.R, self.b, self.P
        j0 = self.n
        Qj = self.V[:, j0 : j0 + b]  # (R, b, P)
        X = Qj.reshape(R * b, P).T.contiguous()  # (P, R·b)
        # the basis may live elsewhere (CPU RAM) than the operator (GPU): only this block travels
        W = apply(self.A, X.to(getattr(self.A, "device", X.device))).to(self.device).T.reshape(R, b, P).contiguous()
        self.matvecs += R * b
        ref = norm64(W)  # ‖A q‖: the DGKS reference
        if self._B_prev is not None:
            W -= self._B_prev @ self.V[:, j0 - b : j0]
        Aj = gram64(Qj, W)  # (R, b, b) in float64 whatever the basis dtype
        Aj = 0.5 * (Aj + Aj.transpose(1, 2))
        W -= Aj.to(W.dtype) @ Qj
        if self.reorth == "full":
            W = self._reorthogonalize(W, self.V[:, : j0 + b], ref)
        Aj_np = Aj.detach().to("cpu").numpy()
        self.anorm = np.maximum(self.anorm, np.abs(Aj_np).sum(axis=2).max(axis=1))
        room = need_next and j0 + 2 * b <= self.cap
        if room and j0 + 2 * b > self.V.shape[1]:
            self._grow()
        Qn, Bn = self._qr_with_restart(W, basis_len=j0 + b, make_next=room)
        self.alphas.append(Aj_np)
        self.betas.append(Bn)
        self.anorm = np.maximum(self.anorm, np.abs(Bn).sum(axis=1).max(axis=1))
        self.steps += 1
        if room:
            self.V[:, j0 + b : j0 + 2 * b] = Qn
            self._B_prev = torch.as_tensor(Bn, dtype=self.dtype, device=self.device)

    def _step_single(self, need_next: bool) -> None:
        """``step`` for one run of block size 1, by the classical three-term recurrence.

        The recurrence:

            w = A q_j − β_{j−1} q_{j−1},  α_j = q_jᵀ w,  w ← w − α_j q_j,  w ← w − V (Vᵀ w) (DGKS, twice
            if needed),  β_j = ‖w‖,  q_{j+1} = w / β_j,

        with the scalars on the host and every vector operation one kernel writing in place — the
        same numbers as the block code, in about a third of its kernel launches (which dominate
        the bookkeeping on a CPU).
        """
        P, j = self.P, self.n
        q = self.V[0, j]
        w = apply(self.A, q.reshape(P, 1).to(getattr(self.A, "device", q.device))).to(self.device).reshape(P)
        w = w.clone() if w.data_ptr() == q.data_ptr() else w  # never update the basis through an alias
        self.matvecs += 1
        ref = float(norm64(w))  # ‖A q‖: the DGKS reference
        beta_prev = float(self.betas[-1][0, 0, 0]) if self.betas else 0.0
        if beta_prev != 0.0:
            w.sub_(self.V[0, j - 1], alpha=beta_prev)
        alpha = float(gram64(q[None], w[None])[0, 0])  # α_j = q_jᵀ w accumulated in float64
        w.sub_(q, alpha=alpha)
        if self.reorth == "full":
            V = self.V[0, : j + 1]
            w = torch.addmv(w, V.T, self._coeffs(V, w), alpha=-1)
            nrm = float(norm64(w))
            if nrm < _DGKS_ETA * ref:
                w = torch.addmv(w, V.T, self._coeffs(V, w), alpha=-1)
                nrm = float(norm64(w))
        else:
            nrm = float(norm64(w))
        self.anorm = np.maximum(self.anorm, abs(alpha))
        broken = nrm <= _BREAKDOWN_FACTOR * self.eps * max(float(self.anorm[0]), np.finfo(float).tiny)
        beta = 0.0 if broken else nrm
        room = need_next and j + 2 <= self.cap
        if room and j + 2 > self.V.shape[1]:
            self._grow()
        self.alphas.append(np.full((1, 1, 1), alpha))
        self.betas.append(np.full((1, 1, 1), beta))
        self.anorm = np.maximum(self.anorm, beta)
        self.steps += 1
        if room:
            if broken:
                self.V[0, j + 1] = self._random_orthogonal(0, j + 1, q[:0])
            else:
                torch.div(w, nrm, out=self.V[0, j + 1])

    def _coeffs(self, V: Tensor, w: Tensor) -> Tensor:
        """V w (the reorthogonalization coefficients) accumulated in float64, in w's dtype for the update."""
        if V.dtype == torch.float64:
            return V @ w
        return gram64(V, w[None])[:, 0].to(w.dtype)

    def basis(self, r: int = 0) -> Tensor:
        """The orthonormal basis rows V_n of run ``r``, (n, P)."""
        return self.V[r, : self.n]

    def _grow(self) -> None:
        rows = min(self.cap, 2 * self.V.shape[1])
        V = torch.empty(self.R, rows, self.P, dtype=self.dtype, device=self.device)
        V[:, : self.V.shape[1]] = self.V
        self.V = V

    # ---- small problem --------------------------------------------------------------------
    def tridiagonal(self, r: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(alpha (n,), beta (n−1,)) of run ``r`` for block size 1, in float64."""
        alpha = np.array([a[r, 0, 0] for a in self.alphas])
        beta = np.array([bb[r, 0, 0] for bb in self.betas[:-1]])
        return alpha, beta

    def banded(self, r: int = 0) -> np.ndarray:
        """The dense symmetric block-tridiagonal T_n (n, n) of run ``r`` in float64."""
        b, n = self.b, self.n
        T = np.zeros((n, n))
        for j, a in enumerate(self.alphas):
            T[j * b : (j + 1) * b, j * b : (j + 1) * b] = a[r]
        for j, bb in enumerate(self.betas[:-1]):
            T[(j + 1) * b : (j + 2) * b, j * b : (j + 1) * b] = bb[r]
            T[j * b : (j + 1) * b, (j + 1) * b : (j + 2) * b] = bb[r].T
        return T

    def last_beta(self, r: int = 0) -> np.ndarray:
        """B_m (b, b) of run ``r``: the residual of a Ritz pair (θ, V s) is ‖B_m s[-b:]‖."""
        return self.betas[-1][r]

    # ---- orthogonalization ----------------------------------------------------------------
    def _reorthogonalize(self, W: Tensor, V: Tensor, ref: Tensor) -> Tensor:
        """W − V (Vᵀ W) per run; a second pass where ‖W‖ fell below η‖A q‖ (DGKS, Daniel et al. 1976).

        The cancellation that spoils orthogonality happens in the recurrence itself (β ≪ ‖A q‖
        once Ritz values converge), so ‖A q‖ is the reference, not the norm before this pass.
        """
        W = torch.baddbmm(W, gram64(W, V).to(W.dtype), V, alpha=-1)  # (R, b, P); coefficients in float64
        after = norm64(W)
        if bool((after < _DGKS_ETA * ref).any()):
            W = torch.baddbmm(W, gram64(W, V).to(W.dtype), V, alpha=-1)
        return W

    def _qr_with_restart(self, W: Tensor, basis_len: int, make_next: bool) -> tuple[Tensor, np.ndarray]:
        """Q_{j+1} (R, b, P) and B_j (R, b, b) with W = B_jᵀ Q_{j+1} (rows); breakdown columns restart."""
        R, b = self.R, self.b
        thresh = _BREAKDOWN_FACTOR * self.eps * np.maximum(self.anorm, np.finfo(float).tiny)
        if b == 1:
            norms64 = norm64(W[:, 0])  # (R,), accumulated in float64
            norms = norms64.to(W.dtype)
            norms_np = norms64.detach().to("cpu").numpy()
            broken = norms_np <= thresh
            Bn = np.where(broken, 0.0, norms_np).reshape(R, 1, 1)
            Q = W / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None, None]
            if make_next:
                for r in np.flatnonzero(broken):
                    Q[r] = self._random_orthogonal(r, basis_len, Q[r, :0])
            return Q, Bn
        Qc, Rc = torch.linalg.qr(W.transpose(1, 2))  # (R, P, b), (R, b, b)
        Rn = Rc.detach().to("cpu", torch.float64).numpy()
        Q = Qc.transpose(1, 2).contiguous()  # (R, b, P)
        diag = np.abs(np.diagonal(Rn, axis1=1, axis2=2))  # (R, b)
        bad = (diag <= thresh[:, None]).any(axis=1)
        for r in np.flatnonzero(bad):
            Q[r], Rn[r] = self._gram_schmidt(W[r], r, basis_len, make_next, thresh[r])
        return Q, Rn

    def _orthonormalize(self, start: Tensor) -> Tensor:
        """Orthonormal rows spanning ``start`` per run, random-filled where it is rank deficient."""
        out = torch.empty_like(start)
        scale = start.abs().amax(dim=(1, 2)).detach().to("cpu", torch.float64).numpy()
        for r in range(self.R):
            thr = _BREAKDOWN_FACTOR * self.eps * max(scale[r], np.finfo(float).tiny)
            out[r], _ = self._gram_schmidt(start[r], r, 0, True, thr)
        return out

    def _gram_schmidt(self, W: Tensor, r: int, basis_len: int, make_next: bool, thr: float) -> tuple[Tensor, np.ndarray]:
        """Column-wise (twice) Gram–Schmidt of the b rows of W against V[r, :basis_len] and each other."""
        b = W.shape[0]
        Q = torch.zeros_like(W)
        Rm = np.zeros((b, b))
        for i in range(b):
            w = W[i].clone()
            for _ in range(2):
                c = gram64(Q[:i], w[None])[:, 0]  # float64 coefficients
                w -= Q[:i].T @ c.to(w.dtype)
                Rm[:i, i] += c.detach().to("cpu").numpy()
            nrm = float(norm64(w))
            if nrm > thr:
                Rm[i, i] = nrm
                Q[i] = w / nrm
            elif make_next:
                Q[i] = self._random_orthogonal(r, basis_len, Q[:i])
        return Q, Rm

    def _random_orthogonal(self, r: int, basis_len: int, others: Tensor) -> Tensor:
        """A random unit vector orthogonal to V[r, :basis_len] and the rows of ``others`` (restart)."""
        z = torch.randn(self.P, generator=self.generators[r], dtype=self.dtype, device=self.device)
        V = torch.cat([self.V[r, :basis_len], others.reshape(-1, self.P)], dim=0)
        for _ in range(2):
            z = z - V.T @ gram64(V, z[None])[:, 0].to(z.dtype)
        nrm = float(norm64(z))
        if nrm <= 1e3 * self.eps * np.sqrt(self.P):
            self.exhausted = True  # no room left: P directions already used
            return torch.zeros_like(z)
        return z / nrm


def _disk_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero-filled CPU tensor of ``shape`` backed by a numpy.memmap over an anonymous temporary file."""
    try:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise ValueError(f"an on-disk Lanczos basis needs a float32 or float64 operator, got {dtype}") from None
    with tempfile.TemporaryFile(prefix="lossatlas-lanczos-") as f:  # the mapping outlives the descriptor
        return torch.from_numpy(np.memmap(f, dtype=np_dtype, mode="w+", shape=shape))
