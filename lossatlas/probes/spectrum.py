"""Top eigenpairs and trace of a curvature operator, the one way every probe and analysis gets them.

The hessian and sharpness probes, the surface's eigenvector directions, eigenspace tracking and
``diagnose`` (through the hessian probe) all call these two functions, with the same defaults:

- eigenpairs by Lanczos with full reorthogonalization (Ghorbani, Krishnan & Xiao 2019), stopped when
  every wanted Ritz pair (θ, y) has a relative residual ‖A y − θ y‖ ≤ tol·|θ|, ``TOL`` = 1e-4 by default
  (the eigenvalue error is at most the residual, and of order residual²/gap for an isolated one);
- the trace tr(A) by Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with 99 matrix-vector products by
  default, or by Hutchinson's estimator.

``A`` is anything with ``shape``, ``dtype``, ``device`` and ``A @ V``: a curvature operator of
``lossatlas.curvature``, an operator built from one, or a dense symmetric tensor.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lossatlas.checks import check_choice
from lossatlas.distributed import Distributed
from lossatlas.estimators import EigResult, TraceEstimate, lanczos_eigs
from lossatlas.estimators.trace import TRACE_ESTIMATORS
from lossatlas.estimators.trace import trace_estimate as _estimate

TOL: float = 1e-4  # relative Ritz residual ‖A y − θ y‖ ≤ TOL·|θ|
TRACE_METHODS: tuple[str, ...] = TRACE_ESTIMATORS  # "auto", "hutchinson", "hutchpp", "xtrace"
TRACE_MATVECS: int = 96  # even (auto, XTrace) and divisible by 3 (Hutch++): a budget every method takes


def top_eigenpairs(
    A: Any,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = TOL,
    max_iter: int | None = None,
    seed: int = 0,
    block_size: int = 1,
    criterion: str = "residual",
    v0: Tensor | None = None,
    return_eigenvectors: bool = True,
    basis_device: str | None = None,
) -> EigResult:
    """The k extreme eigenpairs of a symmetric curvature operator (k and the block size capped at its size P).

    ``which``: "LA" largest algebraic (λ_max, the sharpness of Cohen et al. 2021), "SA" smallest
    algebraic, "LM" largest magnitude. ``criterion="eigenvalue"`` stops on the eigenvalue error
    bound min(r, r²/δ) ≤ tol·|θ| (δ: half the gap to a converged neighbour) instead of the residual r (fewer products when only the
    eigenvalues are wanted). ``v0`` warm-starts from a (P,) vector or a (P, c) block. ``basis_device``
    ("cpu" or "disk") keeps the Lanczos basis off the operator's device. Everything
    else as ``lossatlas.estimators.lanczos_eigs``, whose ``EigResult`` this returns.
    """
    P = A.shape[0]
    return lanczos_eigs(A, min(int(k), P), which=which, tol=tol, max_iter=max_iter, v0=v0, seed=seed,
                        block_size=min(int(block_size), P), return_eigenvectors=return_eigenvectors,
                        criterion=criterion, basis_device=basis_device)


def trace_estimate(
    A: Any,
    num_matvecs: int = TRACE_MATVECS,
    *,
    method: str = "auto",
    seed: int = 0,
    dist: Distributed | None = None,
) -> TraceEstimate:
    """tr(A) and its standard error with ``num_matvecs`` products of A (Rademacher probes).

    ``method``: "auto" (default: XTrace when a sketch of a first block of products captures more than
    half of ‖A‖_F², else Hutchinson; the estimate says which and why), "hutchpp" (Hutch++; budget
    divisible by 3; error O(1/m) for a fast-decaying spectrum; Meyer et al. 2021), "xtrace"
    (Epperly, Tropp & Webber 2024; even budget) or "hutchinson" ((1/m) Σ vᵀAv; error O(1/√m);
    Hutchinson 1989). Under torchrun (``dist``) the probe vectors are split across ranks.
    """
    check_choice("trace method", method, TRACE_METHODS)
    return _estimate(A, num_matvecs, estimator=method, seed=seed, dist=dist)


__all__ = ["top_eigenpairs", "trace_estimate", "TOL", "TRACE_METHODS", "TRACE_MATVECS"]
