"""The ``hessian`` probe: extreme eigenvalues, trace, spectral density and derived curvature numbers.

One probe composes the curvature operators of ``lossatlas.curvature`` (Hessian, GGN, Fisher of the mean
loss), ``lossatlas.probes.spectrum`` and the density estimator of ``lossatlas.estimators`` into what a user
asks of a checkpoint:

- top-k / bottom-k eigenpairs by Lanczos with full reorthogonalization (Ghorbani, Krishnan & Xiao 2019),
  to a relative Ritz residual ‖A y − θ y‖ ≤ tol·|θ| (1e-4 by default), with the residuals;
- the trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021; 99 products) or Hutchinson, and the spectral
  density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) with its bulk edge and the outliers
  above it (Sagun et al. 2017; Papyan 2020: about C top outliers for C classes);
- per-layer spectra (the top eigenvalues of each layer's diagonal Hessian block);
- class-wise spectra (the loss restricted to examples of some classes);
- a confidence interval of λ_max and the trace over bootstrap resamples of the data;
- Adam's preconditioned sharpness λ_max(P⁻¹H) (Cohen et al. 2022);
- λ_max of mini-batch Hessians as a function of the batch size, with the largest stable SGD
  step 2/λ each implies.

The functions behind the settings (``class_subset``, ``head_hessian_distance``,
``preconditioned_sharpness``, ``batch_size_scan``) work on any model and list of batches.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.finite import describe_nonfinite, nonfinite_counts
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.batches import Batch, as_batches
from lossatlas.curvature import CURVATURES, PATHS, make_operator, parameter_blocks
from lossatlas.distributed import Distributed
from lossatlas.estimators import EigResult, count_outliers, slq_density
from lossatlas.probes.settings import COMPUTE_DTYPES, DTYPES, MODES, check_choice
from lossatlas.probes.spectrum import TOL, TRACE_MATVECS, TRACE_METHODS, top_eigenpairs, trace_estimate

_SUBSET = re.compile(r"^class=(\d+(?:,\d+)*)$")


# --------------------------------------------------------------------------------------------------------------------
# Parts of the data


def parse_subset(subset: str) -> tuple[int, ...]:
    """The class labels named by ``"class=3"`` or ``"class=0,1"`` (ValueError for anything else)."""
    m = _SUBSET.match(str(subset).replace(" ", ""))
    if not m:
        raise ValueError(f"subset must look like 'class=3' or 'class=0,1', got {subset!r}")
    return tuple(sorted({int(c) for c in m.group(1).split(",")}))


def class_subset(batches: Sequence[Batch], classes: Sequence[int]) -> list[Batch]:
    """The batches restricted to the examples whose integer label is in ``classes`` (empty batches dropped).

    The loss over the result is the mean loss over those examples only, so the curvature of the
    result is the Hessian of the class-restricted loss (class-wise spectra).
    """
    wanted = torch.as_tensor(sorted(set(int(c) for c in classes)), dtype=torch.long)
    out: list[Batch] = []
    for x, y in batches:
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(
                f"a class subset needs integer labels of shape (N,), got {tuple(y.shape)} {y.dtype}; "
                "use subset=None for sequence or regression targets"
            )
        keep = torch.isin(y, wanted.to(y.device))
        if bool(keep.any()):
            out.append((x[keep], y[keep]))
    if not out:
        raise ValueError(f"no example has a label in {list(wanted.tolist())}; check the subset's class numbers")
    return out


def _bootstrap_batches(batches: Sequence[Batch], gen: torch.Generator) -> list[Batch]:
    """A bootstrap resample of the examples (with replacement), cut into batches of the original sizes."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    idx = torch.randint(0, x.shape[0], (x.shape[0],), generator=gen).to(x.device)
    x, y = x[idx], y[idx]
    out, start = [], 0
    for bx, _ in batches:
        n = bx.shape[0]
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


def _minibatches(batches: Sequence[Batch], size: int, count: int, gen: torch.Generator) -> list[Batch]:
    """``count`` disjoint mini-batches of ``size`` examples drawn without replacement (seeded)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = x.shape[0]
    if size > n:
        raise ValueError(f"batch_size_scan size {size} exceeds the {n} examples of the data; use sizes <= {n}")
    count = max(1, min(count, n // size))
    perm = torch.randperm(n, generator=gen).to(x.device)
    return [(x[perm[i * size : (i + 1) * size]], y[perm[i * size : (i + 1) * size]]) for i in range(count)]


# --------------------------------------------------------------------------------------------------------------------
# Operators built from others


class _Sandwich:
    """v ↦ D (A (D v)) for a diagonal D given as a flat vector: a symmetric rescaling of A."""

    def __init__(self, A: Any, d: Tensor) -> None:
        self.A, self.d = A, d
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        d = self.d if V.ndim == 1 else self.d[:, None]
        return d * (self.A @ (d * V))


class _Difference:
    """v ↦ A v − B v for two operators on the same parameters."""

    def __init__(self, A: Any, B: Any) -> None:
        if tuple(A.shape) != tuple(B.shape):
            raise ValueError(f"operators differ in shape: {tuple(A.shape)} vs {tuple(B.shape)}")
        self.A, self.B = A, B
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.A @ V - self.B @ V


def last_linear_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the model's last ``nn.Linear`` (the classifier head)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    found: list[str] = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            names = [f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)]
            names = [n for n in names if n in trainable]
            if names:
                found = names
    if not found:
        raise ValueError("the model has no trainable nn.Linear layer; pass params=[names] for the head")
    return found


def head_hessian_distance(
    model: nn.Module,
    batches_a: Any,
    batches_b: Any,
    loss: str = "cross_entropy",
    *,
    params: None | str | Sequence[str] = None,
    curvature: str = "hessian",
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    tol: float = TOL,
    max_iter: int | None = None,
    seed: int = 0,
) -> float:
    """‖H_A − H_B‖₂: the spectral norm of the difference of two groups' classifier-head Hessians.

    H_A, H_B are the Hessians of the mean loss over ``batches_a`` and ``batches_b`` restricted to
    the last linear layer's parameters (or ``params``); the norm is the largest-magnitude eigenvalue
    of the symmetric difference operator v ↦ H_A v − H_B v, by Lanczos ``which="LM"`` (largest magnitude:
    the difference is indefinite). Hessian alignment across domains (Hemati et al. 2023) bounds transfer by it.
    """
    names = last_linear_parameters(model) if params is None else params
    kw = dict(params=names, mode=mode, dtype=dtype)
    op_a = make_operator(curvature, model, as_batches(batches_a), loss, **kw)
    op_b = make_operator(curvature, model, as_batches(batches_b), loss, **kw)
    res = top_eigenpairs(_Difference(op_a, op_b), 1, which="LM", tol=tol, max_iter=max_iter, seed=seed,
                         return_eigenvectors=False)
    return float(abs(res.eigenvalues[0]))


def adam_preconditioner(
    optimizer_state: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    step: int | None = None,
) -> dict[str, Tensor]:
    """Adam's diagonal preconditioner P = (1 − β₁ᵗ)(√v̂ + ε), v̂ = v/(1 − β₂ᵗ), per parameter name.

    Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability"): the frozen-Adam update is
    θ ← θ − η P⁻¹ m with the EMA m, so its stability is governed by λ_max(P⁻¹H) against
    (2 + 2β₁)/((1 − β₁)η) (= 38/η for β₁ = 0.9).
    The bias-correction factor follows torch.optim.Adam (m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ)); ``t``
    is the state's ``step`` unless given.
    """
    b1, b2 = float(betas[0]), float(betas[1])
    out = {}
    for n in names:
        st = optimizer_state.get(n)
        if not st or "exp_avg_sq" not in st:
            raise ValueError(
                f"the optimizer state has no 'exp_avg_sq' for parameter {n!r}; preconditioned sharpness needs "
                "an Adam/AdamW run recorded with its optimizer state (Recorder(save_optimizer_state=True))"
            )
        t = step if step is not None else st.get("step")
        if t is None:
            raise ValueError(f"the optimizer state of {n!r} has no 'step'; pass step= explicitly")
        t = float(torch.as_tensor(t).reshape(-1)[0])
        if t < 1:
            raise ValueError(f"Adam step count must be >= 1 for the bias correction, got {t:g}")
        v_hat = st["exp_avg_sq"].detach().to(torch.float64) / (1.0 - b2**t)
        out[n] = (1.0 - b1**t) * (v_hat.sqrt() + eps)
    return out


def preconditioned_sharpness(
    op: Any,
    preconditioner: Mapping[str, Tensor],
    *,
    tol: float = TOL,
    max_iter: int | None = None,
    seed: int = 0,
) -> EigResult:
    """λ_max(P⁻¹H) as λ_max(P^{−1/2} H P^{−1/2}) (same eigenvalues, symmetric; Cohen et al. 2022).

    ``op`` is a curvature operator (it supplies ``flatten`` and the parameter order), ``preconditioner``
    maps each of its parameter names to the positive diagonal P.
    """
    p = op.flatten({n: preconditioner[n] for n in op.param_names}).to(device=op.device, dtype=torch.float64)
    if not bool(torch.all(p > 0)):
        raise ValueError("the preconditioner must be positive everywhere (Adam's √v̂ + ε with ε > 0)")
    d = p.rsqrt().to(op.dtype)
    return top_eigenpairs(_Sandwich(op, d), 1, tol=tol, max_iter=max_iter, seed=seed)


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
    """λ_max of mini-batch Hessians at each batch size: mean and std over ``num_batches`` disjoint batches.

    Mini-batch λ_max is biased upward at small batches (Granziol et al. 2022, "Learning rates as a function
    of batch size"); 2/λ is the largest step at which gradient descent on that batch's quadratic model
    ½λx² is stable (it diverges iff ηλ > 2).
    Returns ``batch_sizes``, ``batch_lambda_max_mean``, ``batch_lambda_max_std``, ``batch_max_stable_lr``
    and ``matvecs``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    means, stds, mv = [], [], 0
    for size in sizes:
        lams = []
        for j, mb in enumerate(_minibatches(batches, int(size), num_batches, gen)):
            op = make_operator(curvature, model, [mb], loss, mode=mode, dtype=dtype, check_deterministic=False)
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


# --------------------------------------------------------------------------------------------------------------------
# The probe


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"hessian: {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"hessian: {name} must be a positive finite number, got {value!r}")


@register_probe
@dataclass(frozen=True, kw_only=True)
class HessianProbe(Probe):
    """Hessian (or GGN / Fisher) spectrum of the mean loss at a checkpoint.

    Top-k/bottom-k eigenpairs by Lanczos with full reorthogonalization (Ghorbani, Krishnan & Xiao 2019),
    trace by Hutch++ (Meyer et al. 2021) or Hutchinson, SLQ density with bulk edge and outlier count
    (Sagun et al. 2017; Papyan 2020: ≈ C top outliers), per-layer and class-wise spectra, a bootstrap
    confidence interval over the data, Adam's preconditioned sharpness (Cohen et al. 2022) and a
    batch-size scan of mini-batch λ_max.

    Attributes:
        curvature: "hessian", "ggn", "fisher" or "empirical_fisher".
        top_k / bottom_k: number of largest / smallest eigenpairs (0 skips).
        tol: relative Ritz residual ‖A y − θ y‖ ≤ tol·|θ| (default ``lossatlas.probes.spectrum.TOL`` = 1e-4).
        criterion: "residual" (the above, default) or "eigenvalue" (the error estimate min(r, r²/gap)
            ≤ tol·|θ|: fewer products when only the eigenvalues are wanted).
        max_iter: most Lanczos steps (None: the estimator's default).
        block_size: Lanczos block size (> 1 sees multiple eigenvalues, e.g. clustered outliers).
        trace / trace_method / trace_matvecs: tr(A) by "hutchpp" (budget divisible by 3) or "hutchinson".
        density / num_probes / num_steps / sigma_squared / outlier_delta: SLQ density (``num_probes`` runs of
            ``num_steps`` Lanczos steps, Gaussian kernel of variance sigma_squared·max(1, λ_max − λ_min), as
            Ghorbani et al.) and the count of Ritz values above bulk_edge·(1 + δ), δ = 0.1 by default.
        blocks: None, "layers" (one block per module owning parameters) or a regex selecting layers by
            name; each block's top ``block_k`` eigenvalues of its diagonal Hessian block.
        subset: None or "class=3" / "class=0,1": the loss restricted to those classes.
        mode / path / dtype: operator settings ("eval"|"train", HVP path, "float32"|"float64"|None).
        seed: seed of every random start vector and resample.
        store_eigenvectors: keep the top eigenvectors as the value "eigenvectors" (k, param).
        data_ci / data_resamples / ci_level: percentile interval of λ_max (and the trace when
            ``trace``) over bootstrap resamples of the examples.
        preconditioned: λ_max(P⁻¹H) with Adam's P from the checkpoint's optimizer state.
        batch_size_scan / scan_batches: mini-batch λ_max mean and std at these batch sizes.
    """

    name: ClassVar[str] = "hessian"
    splits_work: ClassVar[bool] = True  # under torchrun: ctx.dist splits its work
    summary: ClassVar[str] = "Hessian spectrum: top/bottom eigenvalues, trace, density, per-layer and class-wise spectra"
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = "hessian"

    curvature: str = "hessian"
    top_k: int = 5
    bottom_k: int = 0
    tol: float = TOL
    criterion: str = "residual"  # or "eigenvalue": stop on min(r, r²/gap) ≤ tol·|θ| (lanczos_eigs)
    max_iter: int | None = None
    block_size: int = 1
    trace: bool = False
    trace_method: str = "hutchpp"
    trace_matvecs: int = TRACE_MATVECS
    density: bool = False
    num_probes: int = 4
    num_steps: int = 90
    sigma_squared: float = 1e-5
    outlier_delta: float = 0.1
    blocks: str | None = None
    block_k: int = 3
    subset: str | None = None
    mode: str = "eval"
    path: str = "auto"
    dtype: str | None = None
    seed: int = 0
    store_eigenvectors: bool = False
    data_ci: bool = False
    data_resamples: int = 10
    ci_level: float = 0.95
    preconditioned: bool = False
    batch_size_scan: tuple[int, ...] = ()
    scan_batches: int = 4

    @property
    def needs_optimizer_state(self) -> bool:
        """The runner loads the optimizer state only for the preconditioned sharpness."""
        return bool(self.preconditioned)

    def validate(self) -> None:
        check_choice("curvature", self.curvature, CURVATURES, prefix="hessian: ")
        _check_int("top_k", self.top_k, 0)
        _check_int("bottom_k", self.bottom_k, 0)
        _check_positive("tol", self.tol)
        if self.max_iter is not None:
            _check_int("max_iter", self.max_iter, 1)
        _check_int("block_size", self.block_size, 1)
        check_choice("trace_method", self.trace_method, TRACE_METHODS, prefix="hessian: ")
        _check_int("trace_matvecs", self.trace_matvecs, 3 if self.trace_method == "hutchpp" else 2)
        if self.trace_method == "hutchpp" and self.trace_matvecs % 3:
            raise ValueError(f"hessian: trace_matvecs must be divisible by 3 for Hutch++, got {self.trace_matvecs}; "
                             f"use {3 * max(1, round(self.trace_matvecs / 3))}")
        _check_int("num_probes", self.num_probes, 1)
        _check_int("num_steps", self.num_steps, 2)
        _check_positive("sigma_squared", self.sigma_squared)
        if isinstance(self.outlier_delta, bool) or not isinstance(self.outlier_delta, (int, float)) or not (
            0 <= self.outlier_delta < math.inf
        ):
            raise ValueError(f"hessian: outlier_delta must be a finite number >= 0, got {self.outlier_delta!r}")
        if self.blocks is not None:
            if not isinstance(self.blocks, str) or not self.blocks:
                raise ValueError(f"hessian: blocks must be None, 'layers' or a regex over layer names, got {self.blocks!r}")
            if self.blocks != "layers":
                try:
                    re.compile(self.blocks)
                except re.error as exc:
                    raise ValueError(f"hessian: blocks={self.blocks!r} is not a valid regex ({exc}); use 'layers'") from None
        _check_int("block_k", self.block_k, 1)
        if self.subset is not None:
            try:
                parse_subset(self.subset)
            except ValueError as exc:
                raise ValueError(f"hessian: {exc}") from None
        check_choice("mode", self.mode, MODES, prefix="hessian: ")
        check_choice("path", self.path, PATHS, prefix="hessian: ")
        check_choice("criterion", self.criterion, ("residual", "eigenvalue"), prefix="hessian: ")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, COMPUTE_DTYPES, prefix="hessian: ")
        _check_int("seed", self.seed, 0)
        _check_int("data_resamples", self.data_resamples, 2)
        if not (isinstance(self.ci_level, float) and 0 < self.ci_level < 1):
            raise ValueError(f"hessian: ci_level must be a float in (0, 1), got {self.ci_level!r}; e.g. 0.95")
        if not isinstance(self.batch_size_scan, (tuple, list)):
            raise ValueError(f"hessian: batch_size_scan must be a tuple of batch sizes, got {self.batch_size_scan!r}")
        for s in self.batch_size_scan:
            _check_int("each batch_size_scan entry", s, 1)
        _check_int("scan_batches", self.scan_batches, 1)
        if self.data_ci and self.top_k == 0 and not self.trace:
            raise ValueError("hessian: data_ci needs top_k >= 1 or trace=True (it resamples λ_max and the trace)")
        if not (self.top_k or self.bottom_k or self.trace or self.density or self.blocks is not None
                or self.preconditioned or self.batch_size_scan):
            raise ValueError("hessian: nothing to compute (top_k=0, bottom_k=0 and no trace, density, blocks, "
                             "preconditioned or batch_size_scan); set top_k ≥ 1 or ask for one of those")

    def _check_k(self, num_params: int) -> None:
        """Refuse more eigenpairs than the operator has (before any product is spent on them)."""
        for name, k in (("top_k", self.top_k), ("bottom_k", self.bottom_k)):
            if k > num_params:
                raise ValueError(f"hessian: {name}={k} asks for more eigenpairs than the model's {num_params} "
                                 f"parameters; use {name} ≤ {num_params}")

    # ---------------------------------------------------------------------------------------------------------------
    def _operator(self, ctx: ProbeContext, batches: Sequence[Batch], **kw: Any):
        dtype = DTYPES[self.dtype] if self.dtype is not None else ctx.dtype
        kw.setdefault("dist", ctx.dist)  # under torchrun: data-parallel HVPs, all-reduced
        return make_operator(self.curvature, ctx.model, list(batches), ctx.loss, mode=self.mode, dtype=dtype,
                             device=ctx.device, path=self.path, **kw)

    def _top(self, op: Any, k: int, which: str, **kw: Any) -> EigResult:
        return top_eigenpairs(op, k, which=which, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
                              block_size=self.block_size, criterion=self.criterion, **kw)

    def _trace(self, op: Any, seed: int, dist: Distributed | None = None):
        return trace_estimate(op, self.trace_matvecs, method=self.trace_method, seed=seed, dist=dist)

    def run(self, ctx: ProbeContext) -> Result:
        batches = list(ctx.data) if isinstance(ctx.data, (list, tuple)) else as_batches(ctx.data)
        if self.subset is not None:
            batches = class_subset(batches, parse_subset(self.subset))
        bad = nonfinite_counts(dict(ctx.model.named_parameters()))
        if bad:  # the curvature at a NaN/inf point is undefined: say so rather than fail inside the solver
            raise ValueError(f"hessian: the model's parameters hold {describe_nonfinite(bad)}; the curvature is "
                             "undefined there; pick a checkpoint before the run diverged")
        op = self._operator(ctx, batches)
        self._check_k(op.shape[0])
        # Under torchrun the trace and density split their probe vectors across ranks, each rank
        # applying the operator over the full data (no all-reduce per product); eigenvalues shard the data.
        split_probes = ctx.dist.active and (self.trace or self.density)
        probe_op = self._operator(ctx, batches, dist=Distributed()) if split_probes else op
        split_matvecs = 0  # the probe-split products of all ranks (probe_op counts this rank's only)
        values: dict[str, np.ndarray] = {}
        dims: dict[str, tuple[str, ...]] = {}
        coords: dict[str, np.ndarray] = {}
        elapsed: dict[str, float] = {}
        meta: dict[str, Any] = {
            "curvature": self.curvature, "loss": ctx.loss, "mode": self.mode, "seed": self.seed,
            "subset": self.subset, "num_params": int(op.shape[0]), "dtype": str(op.dtype).replace("torch.", ""),
            "num_examples": int(sum(int(x.shape[0]) for x, _ in batches)),
        }
        if ctx.lr is not None and ctx.lr > 0:
            meta["lr"] = float(ctx.lr)
            meta["two_over_lr"] = 2.0 / float(ctx.lr)

        lam_max = None
        if self.top_k:
            t0 = time.perf_counter()
            top = self._top(op, self.top_k, "LA", return_eigenvectors=True)
            elapsed["top"] = time.perf_counter() - t0
            values["top_eigenvalues"], dims["top_eigenvalues"] = top.eigenvalues, ("k",)
            values["top_residuals"], dims["top_residuals"] = top.residuals, ("k",)
            meta["top_converged"] = [bool(c) for c in top.converged]
            meta["top_matvecs"] = int(top.matvecs)
            lam_max = float(top.eigenvalues[0])
            meta["lambda_max"] = lam_max
            if lam_max > 0:
                meta["max_stable_lr"] = 2.0 / lam_max
            if self.store_eigenvectors:
                values["eigenvectors"] = top.eigenvectors.T.detach().cpu().numpy()
                dims["eigenvectors"] = ("k", "param")
        if self.bottom_k:
            t0 = time.perf_counter()
            bot = self._top(op, self.bottom_k, "SA", return_eigenvectors=False)
            elapsed["bottom"] = time.perf_counter() - t0
            values["bottom_eigenvalues"], dims["bottom_eigenvalues"] = bot.eigenvalues, ("k",)
            values["bottom_residuals"], dims["bottom_residuals"] = bot.residuals, ("k",)
            meta["bottom_converged"] = [bool(c) for c in bot.converged]
            meta["bottom_matvecs"] = int(bot.matvecs)
        if self.trace:
            t0 = time.perf_counter()
            tr = self._trace(probe_op, self.seed, dist=ctx.dist)
            split_matvecs += tr.matvecs if split_probes else 0
            elapsed["trace"] = time.perf_counter() - t0
            values["trace"], dims["trace"] = np.asarray(tr.value), ()
            values["trace_stderr"], dims["trace_stderr"] = np.asarray(tr.stderr), ()
            meta["trace_method"] = tr.method
            meta["trace_matvecs"] = int(tr.matvecs)
        if self.density:
            t0 = time.perf_counter()
            dens = slq_density(probe_op, num_probes=self.num_probes, num_steps=min(self.num_steps, op.shape[0]),
                               sigma_squared=self.sigma_squared, seed=self.seed, dist=ctx.dist)
            split_matvecs += dens.matvecs if split_probes else 0
            elapsed["density"] = time.perf_counter() - t0
            values["density"], dims["density"] = dens.density, ("grid",)
            coords["grid"] = dens.grid
            values["density_nodes"], dims["density_nodes"] = dens.nodes, ("probe", "node")
            values["density_weights"], dims["density_weights"] = dens.weights, ("probe", "node")
            values["outliers"], dims["outliers"] = np.asarray(dens.outliers, dtype=np.float64), ("outlier",)
            meta["bulk_edge"] = float(dens.bulk_edge)
            meta["num_outliers"] = int(count_outliers(dens, delta=self.outlier_delta))
            if "top_eigenvalues" in values:
                meta["num_outliers_top_k"] = int(count_outliers(dens, delta=self.outlier_delta,
                                                                eigenvalues=values["top_eigenvalues"]))
            meta["density_sigma_squared_abs"] = float(dens.sigma_squared_abs)
        if self.blocks is not None:
            t0 = time.perf_counter()
            names, tops, mv = self._block_spectra(ctx, batches)
            elapsed["blocks"] = time.perf_counter() - t0
            values["block_top_eigenvalues"], dims["block_top_eigenvalues"] = tops, ("block", "k")
            coords["block"] = np.asarray(names, dtype=str)
            meta["block_matvecs"] = mv
        if self.data_ci:
            t0 = time.perf_counter()
            self._data_ci(ctx, batches, values, dims, meta)
            elapsed["data_ci"] = time.perf_counter() - t0
        if self.preconditioned:
            t0 = time.perf_counter()
            self._preconditioned(ctx, op, values, dims, meta)
            elapsed["preconditioned"] = time.perf_counter() - t0
        if self.batch_size_scan:
            t0 = time.perf_counter()
            scan = batch_size_scan(ctx.model, batches, ctx.loss, self.batch_size_scan, num_batches=self.scan_batches,
                                   curvature=self.curvature, mode=self.mode, dtype=op.dtype, tol=self.tol,
                                   seed=self.seed)
            elapsed["batch_size_scan"] = time.perf_counter() - t0
            meta["batch_scan_matvecs"] = int(scan.pop("matvecs"))
            for name, arr in scan.items():
                values[name], dims[name] = arr, ("batch_size",)
        meta["path"] = op.path or probe_op.path
        meta["matvecs"] = int(op.matvecs) + int(split_matvecs)
        meta["elapsed_s"] = elapsed
        return Result(probe=self.name, config=self.config(), step=ctx.step, values=values, dims=dims,
                      coords=coords, meta=meta)

    # ---------------------------------------------------------------------------------------------------------------
    def _block_spectra(self, ctx: ProbeContext, batches: Sequence[Batch]) -> tuple[list[str], np.ndarray, int]:
        """Top ``block_k`` eigenvalues of each layer's diagonal block (NaN-padded to block_k)."""
        layer_blocks = parameter_blocks(ctx.model, "layer")
        if self.blocks != "layers":
            rx = re.compile(self.blocks)
            layer_blocks = {b: ns for b, ns in layer_blocks.items() if rx.search(b) or any(rx.search(n) for n in ns)}
            if not layer_blocks:
                raise ValueError(f"hessian: blocks={self.blocks!r} matches no layer; layers are "
                                 f"{', '.join(parameter_blocks(ctx.model, 'layer'))}")
        names, rows, mv = [], [], 0
        for bname, pnames in layer_blocks.items():
            op_b = self._operator(ctx, batches, params=pnames, check_deterministic=False)
            res = self._top(op_b, self.block_k, "LA", return_eigenvectors=False)
            row = np.full(self.block_k, np.nan)
            row[: res.eigenvalues.shape[0]] = res.eigenvalues
            names.append(bname or "(root)")
            rows.append(row)
            mv += op_b.matvecs
        return names, np.stack(rows), mv

    def _data_ci(self, ctx, batches, values, dims, meta) -> None:
        """Percentile interval of λ_max (and tr) over bootstrap resamples of the examples."""
        gen = torch.Generator().manual_seed(self.seed + 7919)
        lams, traces = [], []
        for r in range(self.data_resamples):
            op_r = self._operator(ctx, _bootstrap_batches(batches, gen), check_deterministic=False)
            if self.top_k:
                res = top_eigenpairs(op_r, 1, tol=self.tol, max_iter=self.max_iter, seed=self.seed + r + 1,
                                     return_eigenvectors=False)
                lams.append(float(res.eigenvalues[0]))
            if self.trace:
                traces.append(self._trace(op_r, self.seed + r + 1).value)
        q = [(1 - self.ci_level) / 2, (1 + self.ci_level) / 2]
        meta["data_resamples"] = int(self.data_resamples)
        meta["ci_level"] = float(self.ci_level)
        if lams:
            values["lambda_max_ci"], dims["lambda_max_ci"] = np.quantile(lams, q), ("bound",)
            values["lambda_max_resamples"], dims["lambda_max_resamples"] = np.asarray(lams), ("resample",)
        if traces:
            values["trace_ci"], dims["trace_ci"] = np.quantile(traces, q), ("bound",)
            values["trace_resamples"], dims["trace_resamples"] = np.asarray(traces), ("resample",)

    def _preconditioned(self, ctx, op, values, dims, meta) -> None:
        if not ctx.optimizer_state:
            raise ValueError("hessian: preconditioned=True needs the checkpoint's Adam optimizer state; record the "
                             "run with the optimizer (Recorder(..., optimizer=opt)) or set preconditioned=False")
        defaults = dict((ctx.optimizer or {}).get("defaults", {}) or {})
        name = str((ctx.optimizer or {}).get("name", "Adam"))
        if name not in ("Adam", "AdamW"):
            raise ValueError(f"hessian: preconditioned sharpness is defined for Adam/AdamW, the run used {name}")
        betas = tuple(defaults.get("betas", (0.9, 0.999)))
        eps = float(defaults.get("eps", 1e-8))
        P = adam_preconditioner(ctx.optimizer_state, op.param_names, betas=betas, eps=eps)
        res = preconditioned_sharpness(op, P, tol=self.tol, max_iter=self.max_iter, seed=self.seed)
        values["preconditioned_lambda_max"], dims["preconditioned_lambda_max"] = np.asarray(res.eigenvalues[0]), ()
        meta["preconditioned_converged"] = bool(res.converged[0])
        meta["adam_betas"] = [float(b) for b in betas]
        meta["adam_eps"] = eps
        if ctx.lr is not None and ctx.lr > 0:
            # frozen-Adam stability threshold (2 + 2β₁)/((1 − β₁)η) = 38/η at β₁ = 0.9 (Cohen et al. 2022)
            meta["adam_threshold"] = (2 + 2 * betas[0]) / ((1 - betas[0]) * float(ctx.lr))


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
