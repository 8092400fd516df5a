"""Eigensolvers and stochastic estimators over any symmetric linear operator.

Lanczos and power iteration for extreme eigenvalues, stochastic Lanczos quadrature for the spectral
density and the outlier count, Hutchinson, Hutch++, XTrace and an automatic choice for the trace.

An operator is anything with ``shape`` (P, P), ``dtype``, ``device`` and ``A @ V`` for V of shape
(P,) or (P, K) — a curvature operator or a dense tensor with a known spectrum. Each function
applies the operator to blocks of vectors where the algorithm allows it.
"""

from lossatlas.estimators.density import (
    Density,
    count_outliers,
    find_bulk_edge,
    slq_density,
    tridiag_quadrature,
)
from lossatlas.estimators.lanczos import (
    EigResult,
    extreme_eigs,
    lanczos_eigs,
    lanczos_tridiagonal,
    power_iteration,
)
from lossatlas.estimators.trace import (
    TRACE_ESTIMATORS,
    TraceEstimate,
    auto_trace,
    bootstrap_ci,
    hutchinson_trace,
    hutchpp_trace,
    trace_estimate,
    xtrace,
)

__all__ = [
    # eigenvalues
    "EigResult",
    "lanczos_eigs",
    "extreme_eigs",
    "power_iteration",
    "lanczos_tridiagonal",
    # spectral density
    "Density",
    "slq_density",
    "tridiag_quadrature",
    "find_bulk_edge",
    "count_outliers",
    # trace
    "TraceEstimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "auto_trace",
    "trace_estimate",
    "TRACE_ESTIMATORS",
    "bootstrap_ci",
]
