"""The ``batch_scan`` probe: λ_max of mini-batch curvature as a function of the batch size.

At each size, ``scan_batches`` disjoint mini-batches are drawn without replacement (seeded) and the λ_max of
each one's curvature (Lanczos top-1) is averaged. Mini-batch λ_max is biased upward at small batches
(Granziol et al. 2022, "Learning rates as a function of batch size"); 2/λ is the largest step at which
gradient descent on that batch's quadratic model ½λx² is stable (it diverges iff ηλ > 2).
``lossatlas hessian --batch-size-scan 16 64`` runs this probe as a part, stored under its own key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from lossatlas.batches import Batch, batch_length, take
from lossatlas.curvature import make_operator
from lossatlas.distributed import Distributed
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.spectrum import TOL, top_eigenpairs


def minibatches(batches: Sequence[Batch], size: int, count: int, gen: torch.Generator) -> list[list[Batch]]:
    """``count`` disjoint mini-batches of ``size`` examples drawn without replacement (seeded).

    Each mini-batch is a list of batches: one, or one per shape when the examples differ in shape
    (sequences of other lengths, ``lossatlas.batches.take``), weighted by their counted terms.
    """
    n = sum(batch_length(bx) for bx, _ in batches)
    if size > n:
        raise ValueError(f"batch_size_scan size {size} exceeds the {n} examples of the data; use sizes <= {n}")
    count = max(1, min(count, n // size))
    perm = torch.randperm(n, generator=gen)
    return [take(batches, perm[i * size : (i + 1) * size]) for i in range(count)]


def scan(operator_of: Callable[[list[Batch]], Any], batches: Sequence[Batch], sizes: Sequence[int], *,
         num_batches: int = 4, tol: float = TOL, seed: int = 0) -> dict[str, np.ndarray]:
    """The scan over ``sizes`` with ``operator_of(minibatch)`` giving each mini-batch's curvature operator.

    A mini-batch is a list of batches (``minibatches``).

    Returns ``batch_sizes``, ``batch_lambda_max_mean``, ``batch_lambda_max_std`` (ddof 1; NaN for one batch),
    ``batch_max_stable_lr`` (2/mean; inf where the mean is ≤ 0) and ``matvecs``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    means, stds, mv = [], [], 0
    for size in sizes:
        lams = []
        for j, mb in enumerate(minibatches(batches, int(size), num_batches, gen)):
            op = operator_of(mb)
            res = top_eigenpairs(op, 1, tol=tol, seed=seed + j, return_eigenvectors=False)
            lams.append(float(res.eigenvalues[0]))
            mv += op.matvecs
        means.append(float(np.mean(lams)))
        stds.append(float(np.std(lams, ddof=1)) if len(lams) > 1 else float("nan"))
    means_a = np.asarray(means)
    return {
        "batch_sizes": np.asarray([int(s) for s in sizes], dtype=np.int64),
        "batch_lambda_max_mean": means_a,
        "batch_lambda_max_std": np.asarray(stds),
        "batch_max_stable_lr": np.where(means_a > 0, 2.0 / np.where(means_a > 0, means_a, 1.0), np.inf),
        "matvecs": np.asarray(mv),
    }


def batch_size_scan(
    model: nn.Module,
    batches: Sequence[Batch],
    loss: str,
    sizes: Sequence[int],
    *,
    num_batches: int = 4,
    curvature: str = "hessian",
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    tol: float = TOL,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """λ_max of mini-batch curvature at each batch size on any model and list of batches (see ``scan``)."""
    def operator_of(mb: list[Batch]) -> Any:
        return make_operator(curvature, model, mb, loss, mode=mode, dtype=dtype, check_deterministic=False)

    return scan(operator_of, batches, sizes, num_batches=num_batches, tol=tol, seed=seed)


@register_probe
@dataclass(frozen=True, kw_only=True)
class BatchScan(CurvatureProbe):
    """Mini-batch λ_max mean and std at several batch sizes, with the largest stable SGD step 2/λ each implies.

    Attributes:
        batch_size_scan: the batch sizes (each ≤ the number of examples).
        scan_batches: disjoint mini-batches per size (fewer when the data holds fewer).
        tol / seed: the Lanczos tolerance and the seed of the draws (and of the solvers).
        curvature / subset / mode / path / dtype: the operator (``lossatlas.probes.operators``).
    Values: "batch_sizes", "batch_lambda_max_mean", "batch_lambda_max_std", "batch_max_stable_lr" ("batch_size",).
    """

    name: ClassVar[str] = "batch_scan"
    summary: ClassVar[str] = "mini-batch λ_max vs batch size, with the largest stable step 2/λ"
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = None  # shown in the hessian figure, merged (part_of)
    title: ClassVar[str] = "mini-batch λ_max vs batch size"
    usage: ClassVar[str] = "--steps last --batch-size-scan 16 64 256"
    part_of: ClassVar[str | None] = "hessian"

    batch_size_scan: tuple[int, ...] = (16, 64, 256)
    scan_batches: int = 4
    tol: float = TOL

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        self.check_curvature_settings()
        if not isinstance(self.batch_size_scan, (tuple, list)) or not self.batch_size_scan:
            raise ValueError(f"{self.name}: batch_size_scan must be a non-empty tuple of batch sizes, "
                             f"got {self.batch_size_scan!r}")
        for s in self.batch_size_scan:
            self.check_int("each batch_size_scan entry", s, 1)
        self.check_int("scan_batches", self.scan_batches, 1)
        self.check_positive("tol", self.tol)

    def run(self, ctx: ProbeContext) -> Result:
        """The scan over ``batch_size_scan``."""
        t0 = time.perf_counter()
        batches = self.curvature_batches(ctx)
        op = self.curvature_operator(ctx, batches)

        def operator_of(mb: list[Batch]) -> Any:  # each rank solves the whole mini-batch: no products to split
            return self.curvature_operator(ctx, mb, check_deterministic=False, dist=Distributed())

        out = scan(operator_of, batches, self.batch_size_scan, num_batches=self.scan_batches, tol=self.tol,
                   seed=self.seed)
        matvecs = int(out.pop("matvecs"))
        res = self.new_result(ctx.step, self.operator_meta(ctx, op, batches))
        for name, arr in out.items():
            res.add(name, arr, ("batch_size",))
        res.meta.update(batch_scan_matvecs=matvecs, matvecs=matvecs,
                        elapsed_s={"batch_size_scan": time.perf_counter() - t0})
        return res


__all__ = ["BatchScan", "batch_size_scan", "minibatches", "scan"]
