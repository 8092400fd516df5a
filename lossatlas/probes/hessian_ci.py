"""The ``hessian_ci`` probe: how much λ_max and tr(H) depend on the examples drawn.

Each of ``data_resamples`` bootstrap resamples of the examples (drawn with replacement, cut into batches of
the original sizes) gives its own curvature operator; the ``ci_level`` percentile interval of its λ_max (Lanczos
top-1, seeded ``seed + r + 1``) and of its trace (Hutch++ or Hutchinson) over the resamples is the interval.
``lossatlas hessian --data-ci`` runs this probe as a part, stored under its own key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from lossatlas.batches import Batch, batch_length, map_inputs, split, take
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.settings import check_choice
from lossatlas.probes.spectrum import TOL, TRACE_MATVECS, TRACE_METHODS, top_eigenpairs, trace_estimate

SEED_OFFSET = 7919  # the resampling generator's seed is seed + this (apart from the solvers' seeds)


def bootstrap_batches(batches: Sequence[Batch], gen: torch.Generator) -> list[Batch]:
    """A bootstrap resample of the examples (with replacement), cut into batches of the original sizes.

    Examples of unequal shapes (dict batches of sequences of other lengths) are regrouped by shape
    (``lossatlas.batches.take``) into batches of at most the largest original size: in eval mode the
    token-weighted loss does not depend on how the examples are batched.
    """
    sizes = [batch_length(bx) for bx, _ in batches]
    n = sum(sizes)
    idx = torch.randint(0, n, (n,), generator=gen)
    groups = take(batches, idx)
    if len(groups) == 1:  # one shape: the original batch sizes
        x, y = groups[0]
        out, start = [], 0
        for size in sizes:
            out.append((map_inputs(lambda t, a=start, b=start + size: t[a:b], x), y[start : start + size]))
            start += size
        return out
    return [part for group in groups for part in split(group, max(sizes))]


def check_trace_settings(prefix: str, method: str, matvecs: object) -> None:
    """ValueError unless ``method`` is a trace method and ``matvecs`` a budget it accepts (Hutch++: a multiple of 3)."""
    check_choice("trace_method", method, TRACE_METHODS, prefix=prefix)
    low = {"hutchpp": 3, "auto": 4}.get(method, 2)
    if isinstance(matvecs, bool) or not isinstance(matvecs, int) or matvecs < low:
        raise ValueError(f"{prefix}trace_matvecs must be an integer >= {low}, got {matvecs!r}")
    if method == "hutchpp" and matvecs % 3:
        raise ValueError(f"{prefix}trace_matvecs must be divisible by 3 for Hutch++, got {matvecs}; "
                         f"use {3 * max(1, round(matvecs / 3))}")
    if method in ("auto", "xtrace") and matvecs % 2:
        raise ValueError(f"{prefix}trace_matvecs must be even for trace_method={method!r}, got {matvecs}; "
                         f"use {matvecs + 1}")


@register_probe
@dataclass(frozen=True, kw_only=True)
class HessianCI(CurvatureProbe):
    """Bootstrap confidence intervals of λ_max and of the trace over the examples.

    Attributes:
        lambda_max / trace: which quantities to resample (at least one).
        data_resamples: bootstrap resamples (≥ 2); ci_level: the interval's coverage, e.g. 0.95.
        trace_method / trace_matvecs: the trace estimator and its budget, as the ``hessian`` probe's.
        tol / max_iter / seed: the Lanczos settings and the seed of the resampling.
        curvature / subset / mode / path / dtype: the operator (``lossatlas.probes.operators``).
    Values: "lambda_max_ci" and "trace_ci" ("bound",: lower, upper), "lambda_max_resamples" and
    "trace_resamples" ("resample",).
    """

    name: ClassVar[str] = "hessian_ci"
    summary: ClassVar[str] = "bootstrap confidence intervals of λ_max and the trace over the examples"
    splits_work: ClassVar[bool] = True  # under torchrun: data-parallel products over ctx.dist
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = None  # shown in the hessian figure, merged (part_of)
    title: ClassVar[str] = "λ_max and trace: bootstrap intervals"
    usage: ClassVar[str] = "--steps last --trace"
    part_of: ClassVar[str | None] = "hessian"
    switch: ClassVar[str | None] = "data_ci"

    lambda_max: bool = True
    trace: bool = False
    trace_method: str = "auto"
    trace_matvecs: int = TRACE_MATVECS
    data_resamples: int = 10
    ci_level: float = 0.95
    tol: float = TOL
    max_iter: int | None = None

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        self.check_curvature_settings()
        if not (self.lambda_max or self.trace):
            raise ValueError(f"{self.name}: nothing to resample; set lambda_max=True or trace=True")
        check_trace_settings(f"{self.name}: ", self.trace_method, self.trace_matvecs)
        self.check_int("data_resamples", self.data_resamples, 2)
        if not (isinstance(self.ci_level, float) and 0 < self.ci_level < 1):
            raise ValueError(f"{self.name}: ci_level must be a float in (0, 1), got {self.ci_level!r}; e.g. 0.95")
        self.check_positive("tol", self.tol)
        if self.max_iter is not None:
            self.check_int("max_iter", self.max_iter, 1)

    def run(self, ctx: ProbeContext) -> Result:
        """The intervals over ``data_resamples`` bootstrap resamples."""
        t0 = time.perf_counter()
        batches = self.curvature_batches(ctx)
        gen = torch.Generator().manual_seed(self.seed + SEED_OFFSET)
        lams, traces, mv = [], [], 0
        for r in range(self.data_resamples):
            op = self.curvature_operator(ctx, bootstrap_batches(batches, gen), check_deterministic=False)
            if self.lambda_max:
                res = top_eigenpairs(op, 1, tol=self.tol, max_iter=self.max_iter, seed=self.seed + r + 1,
                                     return_eigenvectors=False)
                lams.append(float(res.eigenvalues[0]))
            if self.trace:
                traces.append(trace_estimate(op, self.trace_matvecs, method=self.trace_method,
                                             seed=self.seed + r + 1).value)
            mv += op.matvecs
        q = [(1 - self.ci_level) / 2, (1 + self.ci_level) / 2]
        res = self.new_result(ctx.step, self.operator_meta(ctx, op, batches))
        if lams:
            res.add("lambda_max_ci", np.quantile(lams, q), ("bound",))
            res.add("lambda_max_resamples", np.asarray(lams), ("resample",))
        if traces:
            res.add("trace_ci", np.quantile(traces, q), ("bound",))
            res.add("trace_resamples", np.asarray(traces), ("resample",))
        res.meta.update(data_resamples=int(self.data_resamples), ci_level=float(self.ci_level), path=op.path,
                        matvecs=mv, elapsed_s={"data_ci": time.perf_counter() - t0})
        return res


__all__ = ["HessianCI", "bootstrap_batches", "check_trace_settings"]
