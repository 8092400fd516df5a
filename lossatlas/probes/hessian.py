"""The ``hessian`` probe: extreme eigenvalues, trace and spectral density of the curvature at a checkpoint.

Its own computation, cached under its own key:

- top-k / bottom-k eigenpairs by Lanczos with full reorthogonalization (Ghorbani, Krishnan & Xiao 2019),
  to a relative Ritz residual ‖A y − θ y‖ ≤ tol·|θ| (1e-4 by default), with the residuals;
- the trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021; 99 products) or Hutchinson, and the spectral
  density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) with its bulk edge and the outliers
  above it (Sagun et al. 2017; Papyan 2020: about C top outliers for C classes).

Its other settings run other probes as parts (``Probe.parts``), each stored and cached under its own name
and key, so changing one recomputes that part only; ``run`` returns them merged into one Result, and
``plot``/``report`` show them with it:

- ``blocks``: per-layer spectra (``hessian_blocks``);
- ``data_ci``: bootstrap intervals of λ_max and the trace over the data (``hessian_ci``);
- ``preconditioned``: Adam's preconditioned sharpness λ_max(P⁻¹H) (``adam_sharpness``, Cohen et al. 2022);
- ``batch_size_scan``: λ_max of mini-batch Hessians vs the batch size (``batch_scan``).

Class-wise spectra are the ``subset`` setting of the operator, shared by every part
(``lossatlas.probes.operators``). The functions behind the parts (``class_subset``,
``head_hessian_distance``, ``preconditioned_sharpness``, ``batch_size_scan``) work on any model and list of
batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from lossatlas.batches import as_batches
from lossatlas.curvature import CurvatureOperator
from lossatlas.curvature.activations import activation_operator, parse_wrt
from lossatlas.distributed import Distributed
from lossatlas.errors import UserError
from lossatlas.estimators import EigResult, count_outliers, slq_density
from lossatlas.memory import (
    BASIS_DEVICES,
    LanczosWork,
    MemoryPlan,
    Planner,
    TraceWork,
    check_plan,
    compute_dtype,
    default_max_iter,
)
from lossatlas.probes.adam_sharpness import AdamSharpness, adam_preconditioner, preconditioned_sharpness
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.batch_scan import BatchScan, batch_size_scan
from lossatlas.probes.head_distance import head_hessian_distance, last_linear_parameters
from lossatlas.probes.hessian_blocks import HessianBlocks, check_blocks
from lossatlas.probes.hessian_ci import HessianCI, check_trace_settings
from lossatlas.probes.operators import CurvatureProbe, class_subset, parse_subset
from lossatlas.probes.settings import DTYPES, check_choice
from lossatlas.probes.spectrum import TOL, TRACE_MATVECS, TRACE_METHODS, top_eigenpairs, trace_estimate
from lossatlas.probes.stability import stability_meta


@register_probe
@dataclass(frozen=True, kw_only=True)
class HessianProbe(CurvatureProbe):
    """Hessian (or GGN / Fisher) spectrum of the mean loss at a checkpoint.

    Top-k/bottom-k eigenpairs by Lanczos with full reorthogonalization (Ghorbani, Krishnan & Xiao 2019),
    trace by Hutch++ (Meyer et al. 2021) or Hutchinson, SLQ density with bulk edge and outlier count
    (Sagun et al. 2017; Papyan 2020: ≈ C top outliers), and, as parts cached under their own keys,
    per-layer spectra, a bootstrap confidence interval over the data, Adam's preconditioned sharpness
    (Cohen et al. 2022) and a batch-size scan of mini-batch λ_max; class-wise spectra by ``subset``.

    Attributes:
        curvature: "hessian", "ggn", "fisher", "empirical_fisher", or the Kronecker-factored GGN "kfac" / "ekfac"
            ("kfac_reduce" / "ekfac_reduce": KFAC-reduce on shared weights; ``lossatlas.curvature.kfac``).
        top_k / bottom_k: number of largest / smallest eigenpairs (0 skips).
        tol: relative Ritz residual ‖A y − θ y‖ ≤ tol·|θ| (default ``lossatlas.probes.spectrum.TOL`` = 1e-4).
        criterion: "residual" (the above, default) or "eigenvalue" (the error bound min(r, r²/δ) ≤ tol·|θ|,
            δ half the gap to a converged neighbour: fewer products when only the eigenvalues are wanted).
        max_iter: most Lanczos steps (None: the estimator's default).
        block_size: Lanczos block size (> 1 sees multiple eigenvalues, e.g. clustered outliers).
        trace / trace_method / trace_matvecs: tr(A) by "auto" (XTrace when a first block's sketch captures
            most of ‖A‖_F², else Hutchinson; meta "trace_reason" says why), "xtrace", "hutchpp" (budget
            divisible by 3) or "hutchinson"; 96 products by default.
        density / num_probes / num_steps / sigma_squared / outlier_delta: SLQ density (``num_probes`` runs of
            ``num_steps`` Lanczos steps, Gaussian kernel of variance sigma_squared·max(1, λ_max − λ_min), as
            Ghorbani et al.) and the count of Ritz values above bulk_edge·(1 + δ), δ = 0.1 by default.
        blocks / block_k: None, "layers" (one block per module owning parameters) or a regex selecting layers
            by name; each block's top ``block_k`` eigenvalues of its diagonal Hessian block (``hessian_blocks``).
        subset: None or "class=3" / "class=0,1": the loss restricted to those classes.
        mode / path / dtype: operator settings ("eval"|"train", HVP path, "float32"|"float64"|None).
        seed: seed of every random start vector and resample.
        store_eigenvectors: keep the top eigenvectors as the value "eigenvectors" (k, param).
        data_ci / data_resamples / ci_level: percentile interval of λ_max (and the trace when
            ``trace``) over bootstrap resamples of the examples (``hessian_ci``).
        preconditioned: λ_max(P⁻¹H) with Adam's P from the checkpoint's optimizer state (``adam_sharpness``).
        batch_size_scan / scan_batches: mini-batch λ_max mean and std at these batch sizes (``batch_scan``).
        basis_device: where the Lanczos bases (top/bottom: max_iter·block_size·P values, density:
            num_probes·num_steps·P) live: None (the operator's device), "cpu" (host memory, beside a GPU
            operator) or "disk" (memory-mapped under $TMPDIR). The same numbers on each; not part of the key.
        wrt: what the curvature is taken with respect to: "params" (default, θ), "inputs" (the float inputs of
            every example) or "activations:MODULE_NAME" (that module's output on every example, the rest of
            θ and the network fixed); the latter two are ``lossatlas.curvature.activations`` operators
            (curvature "hessian" or "ggn" of the data-set mean loss, block-diagonal across examples), with the
            same eigenvalue, trace and density estimators, and without the part settings.

    Before the first product the run prints its memory plan on stderr (``lossatlas.memory``: products,
    basis, peak against the available memory) and refuses with a UserError naming the options that fit
    (``basis_device``, ``path="finite_difference"``, fewer examples) when the peak would not fit; the
    plan is in the result's meta as "memory_plan". A float16/bfloat16 checkpoint is analysed in float32.
    """

    name: ClassVar[str] = "hessian"
    splits_work: ClassVar[bool] = True  # under torchrun: ctx.dist splits its work
    summary: ClassVar[str] = "Hessian spectrum: top/bottom eigenvalues, trace, density, per-layer and class-wise spectra"
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = "hessian"
    part_fields: ClassVar[tuple[str, ...]] = ("blocks", "block_k", "data_ci", "data_resamples", "ci_level",
                                              "preconditioned", "batch_size_scan", "scan_batches")

    top_k: int = 5
    bottom_k: int = 0
    tol: float = TOL
    criterion: str = "residual"  # or "eigenvalue": stop on min(r, r²/δ) ≤ tol·|θ| (lanczos_eigs)
    max_iter: int | None = None
    block_size: int = 1
    trace: bool = False
    trace_method: str = "auto"
    trace_matvecs: int = TRACE_MATVECS
    density: bool = False
    num_probes: int = 4
    num_steps: int = 90
    sigma_squared: float = 1e-5
    outlier_delta: float = 0.1
    blocks: str | None = None
    block_k: int = 3
    store_eigenvectors: bool = False
    data_ci: bool = False
    data_resamples: int = 10
    ci_level: float = 0.95
    preconditioned: bool = False
    batch_size_scan: tuple[int, ...] = ()
    scan_batches: int = 4
    basis_device: str | None = None
    wrt: str = "params"  # or "inputs" / "activations:MODULE_NAME" (lossatlas.curvature.activations)

    # settings that change where the work runs, never its numbers: left out of config() and the key
    execution_fields: ClassVar[tuple[str, ...]] = ("basis_device",)

    def validate(self) -> None:
        """ValueError for a setting out of range, or when nothing is asked for."""
        prefix = f"{self.name}: "
        self.check_curvature_settings()
        self.check_int("top_k", self.top_k, 0)
        self.check_int("bottom_k", self.bottom_k, 0)
        self.check_positive("tol", self.tol)
        check_choice("criterion", self.criterion, ("residual", "eigenvalue"), prefix=prefix)
        if self.max_iter is not None:
            self.check_int("max_iter", self.max_iter, 1)
        self.check_int("block_size", self.block_size, 1)
        check_trace_settings(prefix, self.trace_method, self.trace_matvecs)
        self.check_int("num_probes", self.num_probes, 1)
        self.check_int("num_steps", self.num_steps, 2)
        self.check_positive("sigma_squared", self.sigma_squared)
        if isinstance(self.outlier_delta, bool) or not isinstance(self.outlier_delta, (int, float)) or not (
            0 <= self.outlier_delta < math.inf
        ):
            raise ValueError(f"{prefix}outlier_delta must be a finite number >= 0, got {self.outlier_delta!r}")
        if self.blocks is not None:
            check_blocks(prefix, self.blocks)
        self.check_int("block_k", self.block_k, 1)
        self.check_int("data_resamples", self.data_resamples, 2)
        if not (isinstance(self.ci_level, float) and 0 < self.ci_level < 1):
            raise ValueError(f"{prefix}ci_level must be a float in (0, 1), got {self.ci_level!r}; e.g. 0.95")
        if not isinstance(self.batch_size_scan, (tuple, list)):
            raise ValueError(f"{prefix}batch_size_scan must be a tuple of batch sizes, got {self.batch_size_scan!r}")
        for s in self.batch_size_scan:
            self.check_int("each batch_size_scan entry", s, 1)
        self.check_int("scan_batches", self.scan_batches, 1)
        if self.basis_device is not None:
            check_choice("basis_device", self.basis_device, BASIS_DEVICES, prefix=prefix)
        if self.wrt != "params":
            parse_wrt(self.wrt)  # UserError for an unknown form
            if self.curvature not in ("hessian", "ggn"):
                raise UserError(f"{prefix}wrt={self.wrt!r} takes curvature 'hessian' or 'ggn', got "
                                f"{self.curvature!r}; use one of those or wrt='params'")
            if self.blocks is not None or self.data_ci or self.preconditioned or self.batch_size_scan:
                raise UserError(f"{prefix}blocks, data_ci, preconditioned and batch_size_scan are parameter-space "
                                f"parts; drop them with wrt={self.wrt!r} or use wrt='params'")
        if self.data_ci and self.top_k == 0 and not self.trace:
            raise ValueError(f"{prefix}data_ci needs top_k >= 1 or trace=True (it resamples λ_max and the trace)")
        if not (self.top_k or self.bottom_k or self.trace or self.density or self.blocks is not None
                or self.preconditioned or self.batch_size_scan):
            raise ValueError(f"{prefix}nothing to compute (top_k=0, bottom_k=0 and no trace, density, blocks, "
                             "preconditioned or batch_size_scan); set top_k ≥ 1 or ask for one of those")

    def config(self) -> dict:
        """The settings as a JSON-able dict, without ``execution_fields`` (the same result wherever the basis lives)."""
        out = super().config()
        for name in self.execution_fields:
            out.pop(name, None)
        if out.get("wrt") == "params":
            out.pop("wrt")  # the default leaves the keys of results computed before the setting existed unchanged
        return out

    def memory_plan(self, ctx: ProbeContext, op: Any, batches: Any) -> MemoryPlan | None:
        """The plan of this run's own work on ``op`` (top, bottom, trace, density), printed and checked.

        UserError when the estimated peak does not fit the available memory (``lossatlas.memory``);
        None for an operator the planner cannot measure (not a ``CurvatureOperator``).
        """
        if not isinstance(op, CurvatureOperator):
            return None
        P = op.shape[0]
        work = []
        for k, vectors in ((self.top_k, self.top_k), (self.bottom_k, 0)):
            if k:
                k, b = min(k, P), min(self.block_size, P)
                steps = default_max_iter(k, b, P) if self.max_iter is None else min(P // b, self.max_iter)
                work.append(LanczosWork(runs=1, block=b, steps=steps, ritz_vectors=vectors))
        if self.density:
            work.append(LanczosWork(runs=self.num_probes, block=1, steps=min(self.num_steps, P)))
        trace = TraceWork(self.trace_method, self.trace_matvecs) if self.trace else None
        plan = Planner(op, ctx.model, batches).plan(work, trace, basis_device=self.basis_device)
        return check_plan(plan, self.name, quiet=ctx.dist.rank != 0, dist=ctx.dist)

    # ---------------------------------------------------------------------------------------------------------------
    def parts(self) -> tuple[Probe, ...]:
        """The probes the part settings ask for, on the same operator.

        ``hessian_blocks`` (``blocks``), ``hessian_ci`` (``data_ci``), ``adam_sharpness``
        (``preconditioned``), ``batch_scan`` (``batch_size_scan``).
        """
        op = self.operator_settings()
        lanczos = dict(tol=self.tol, max_iter=self.max_iter, seed=self.seed)
        out: list[Probe] = []
        if self.blocks is not None:
            out.append(HessianBlocks(**op, **lanczos, blocks=self.blocks, block_k=self.block_k,
                                     criterion=self.criterion, block_size=self.block_size))
        if self.data_ci:
            out.append(HessianCI(**op, **lanczos, lambda_max=self.top_k > 0, trace=self.trace,
                                 trace_method=self.trace_method, trace_matvecs=self.trace_matvecs,
                                 data_resamples=self.data_resamples, ci_level=self.ci_level))
        if self.preconditioned:
            out.append(AdamSharpness(**op, **lanczos))
        if self.batch_size_scan:
            out.append(BatchScan(**op, tol=self.tol, seed=self.seed, batch_size_scan=tuple(self.batch_size_scan),
                                 scan_batches=self.scan_batches))
        return tuple(out)

    def run(self, ctx: ProbeContext) -> Result:
        """The spectrum with every part's Result merged in (``merge``)."""
        return self.merge(self.run_own(ctx), [part.run(ctx) for part in self.parts()])

    def curvature_operator(self, ctx: ProbeContext, batches: Any, **kw: Any) -> Any:
        """The parameter operator (``wrt="params"``), or the activation/input operator of ``wrt``."""
        if self.wrt == "params":
            return super().curvature_operator(ctx, batches, **kw)
        if ctx.dist.active:
            raise UserError(f"{self.name}: wrt={self.wrt!r} runs on one process; run it without torchrun")
        dtype = compute_dtype(DTYPES[self.dtype] if self.dtype is not None else ctx.dtype, ctx.model)
        return activation_operator(ctx.model, list(batches), ctx.loss, wrt=self.wrt, curvature=self.curvature,
                                   mode=self.mode, dtype=dtype, device=ctx.device)

    def _check_k(self, num_params: int) -> None:
        """Refuse more eigenpairs than the operator has (before any product is spent on them)."""
        for name, k in (("top_k", self.top_k), ("bottom_k", self.bottom_k)):
            if k > num_params:
                raise ValueError(f"{self.name}: {name}={k} asks for more eigenpairs than the model's {num_params} "
                                 f"parameters; use {name} ≤ {num_params}")

    def _top(self, op: Any, k: int, which: str, **kw: Any) -> EigResult:
        return top_eigenpairs(op, k, which=which, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
                              block_size=self.block_size, criterion=self.criterion,
                              basis_device=self.basis_device, **kw)

    def run_own(self, ctx: ProbeContext) -> Result:
        """Top/bottom eigenpairs, trace and density (what is stored under this probe's key)."""
        batches = self.curvature_batches(ctx)
        op = self.curvature_operator(ctx, batches)
        self._check_k(op.shape[0])
        plan = self.memory_plan(ctx, op, batches)  # printed; refuses before any product when it cannot fit
        # Under torchrun the trace and density split their probe vectors across ranks, each rank
        # applying the operator over the full data (no all-reduce per product); eigenvalues shard the data.
        split_probes = ctx.dist.active and (self.trace or self.density)
        probe_op = self.curvature_operator(ctx, batches, dist=Distributed()) if split_probes else op
        split_matvecs = 0  # the probe-split products of all ranks (probe_op counts this rank's only)
        elapsed: dict[str, float] = {}
        res = self.new_result(ctx.step, self.operator_meta(ctx, op, batches))
        meta = res.meta
        if plan is not None:
            meta["memory_plan"] = plan.as_meta()

        if self.top_k:
            t0 = time.perf_counter()
            top = self._top(op, self.top_k, "LA", return_eigenvectors=True)
            elapsed["top"] = time.perf_counter() - t0
            res.add("top_eigenvalues", top.eigenvalues, ("k",))
            res.add("top_residuals", top.residuals, ("k",))
            meta["top_converged"] = [bool(c) for c in top.converged]
            meta["top_matvecs"] = int(top.matvecs)
            meta["lambda_max"] = float(top.eigenvalues[0])
            # the largest stable step under the run's optimizer (GD, heavy ball, Nesterov), and the rule used;
            # for Adam the rule bounds λ_max(P⁻¹H): the preconditioned part reports it when asked for
            if self.wrt == "params" and not (self.preconditioned and (ctx.optimizer or {}).get("name") in ("Adam", "AdamW")):
                meta.update(stability_meta(ctx.optimizer, meta["lambda_max"], ctx.lr))
            if self.store_eigenvectors:
                res.add("eigenvectors", top.eigenvectors.T.detach().cpu().numpy(), ("k", "param"))
        if self.bottom_k:
            t0 = time.perf_counter()
            bot = self._top(op, self.bottom_k, "SA", return_eigenvectors=False)
            elapsed["bottom"] = time.perf_counter() - t0
            res.add("bottom_eigenvalues", bot.eigenvalues, ("k",))
            res.add("bottom_residuals", bot.residuals, ("k",))
            meta["bottom_converged"] = [bool(c) for c in bot.converged]
            meta["bottom_matvecs"] = int(bot.matvecs)
        if self.trace:
            t0 = time.perf_counter()
            tr = trace_estimate(probe_op, self.trace_matvecs, method=self.trace_method, seed=self.seed, dist=ctx.dist)
            split_matvecs += tr.matvecs if split_probes else 0
            elapsed["trace"] = time.perf_counter() - t0
            res.add("trace", tr.value)
            res.add("trace_stderr", tr.stderr)
            meta["trace_method"] = tr.method
            if tr.reason:
                meta["trace_reason"] = tr.reason
            meta["trace_matvecs"] = int(tr.matvecs)
        if self.density:
            t0 = time.perf_counter()
            dens = slq_density(probe_op, num_probes=self.num_probes, num_steps=min(self.num_steps, op.shape[0]),
                               sigma_squared=self.sigma_squared, seed=self.seed, dist=ctx.dist,
                               basis_device=self.basis_device)
            split_matvecs += dens.matvecs if split_probes else 0
            elapsed["density"] = time.perf_counter() - t0
            res.add("density", dens.density, ("grid",), {"grid": dens.grid})
            res.add("density_nodes", dens.nodes, ("probe", "node"))
            res.add("density_weights", dens.weights, ("probe", "node"))
            res.add("outliers", np.asarray(dens.outliers, dtype=np.float64), ("outlier",))
            meta["bulk_edge"] = float(dens.bulk_edge)
            meta["num_outliers"] = int(count_outliers(dens, delta=self.outlier_delta))
            if "top_eigenvalues" in res.values:
                meta["num_outliers_top_k"] = int(count_outliers(dens, delta=self.outlier_delta,
                                                                eigenvalues=res.values["top_eigenvalues"]))
            meta["density_sigma_squared_abs"] = float(dens.sigma_squared_abs)
        meta["wrt"] = self.wrt  # num_params is the activation count D when wrt is not "params"
        meta["path"] = op.path or probe_op.path
        meta["path_choice"] = op.path_report()  # what path="auto" timed, sized and chose per block size
        meta["matvecs"] = int(op.matvecs) + int(split_matvecs)
        meta["elapsed_s"] = elapsed
        return res


def hessian_spectrum(model: nn.Module, data: Any, loss: str = "cross_entropy", **settings: Any) -> Result:
    """Run the ``hessian`` probe on a model and data in a notebook: ``hessian_spectrum(model, (X, y), top_k=5)``."""
    return HessianProbe(**settings).run(ProbeContext(model=model, data=as_batches(data), loss=loss))


__all__ = [
    "HessianProbe",
    "hessian_spectrum",
    "parse_subset",
    "class_subset",
    "head_hessian_distance",
    "last_linear_parameters",
    "adam_preconditioner",
    "preconditioned_sharpness",
    "batch_size_scan",
    "TRACE_METHODS",
]
