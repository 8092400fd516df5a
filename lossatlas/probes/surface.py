"""The ``surface`` probe: loss and accuracy on a 1-D line or a 2-D plane through parameter space.

θ(α) = θ* + α d (1-D), θ(α, β) = θ* + α d_x + β d_y (2-D) around the checkpoint θ*, on a grid of
α ∈ xrange, β ∈ yrange (default (−1, 1, 51) each), with the example-weighted mean loss and the accuracy in
[0, 1] (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets"). The
directions come from ``lossatlas.probes.directions`` (filter-normalised random, trajectory PCA, top Hessian
eigenvectors, checkpoint differences); the grid is evaluated by ``lossatlas.probes.grid`` (Z of shape
(ny, nx) with ``Z[i, j] = L(x_j, y_i)``, resumable chunk by chunk with the uninterrupted run's bits).

Quadratic-regime check along each axis: the second-order Taylor model q(α) = L(θ*) + α ∇L·d + ½α² dᵀHd
(∇L·d and dᵀHd by double backward) against the evaluated line; the report gives the curvature of a
least-squares quadratic fit over dᵀHd and the widest α-interval around 0 where |L − q| ≤ tol·|L|.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossatlas import losses as L
from lossatlas.distributed import chunks_for_rank
from lossatlas.outputs import model_outputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.convexity import MAX_ITER as CONVEXITY_MAX_ITER
from lossatlas.probes.convexity import STRIDE as CONVEXITY_STRIDE
from lossatlas.probes.convexity import TOL as CONVEXITY_TOL
from lossatlas.probes.convexity import convexity_map, map_axes
from lossatlas.probes.directions import (
    DEFAULT_SEED,
    DIR_TYPES,
    IGNORES,
    NORMS,
    Direction,
    checkpoint_direction,
    model_state,
    random_direction,
    top_hessian_eigenvectors,
    trajectory_pca,
    worst_case_directions,
)
from lossatlas.probes.grid import (
    BN_MODES,
    Metric,
    MetricSettings,
    PointEvaluator,
    default_chunk_size,
    evaluate_grid,
    grid_axis,
    grid_points,
    metrics_by_name,
)
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.paramdicts import cosine, dot, flatten, unflatten
from lossatlas.probes.settings import check_choice, check_nonneg_int


# ----------------------------------------------------------------------------------------- quadratic regime
def directional_derivatives(
    model: nn.Module,
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    *,
    buffers: Mapping[str, Tensor] | None = None,
) -> tuple[float, float, float]:
    """(L(θ), ∇L·d, dᵀ∇²L d) on the data set, by double backward.

    Each batch contributes (n_b/N)·(its mean loss, its gradient and its Hessian-vector product);
    eval mode; only the parameters in ``direction`` are differentiated. Runs under PyTorch's math attention
    backend: fused attention kernels (flash, memory-efficient) have no double backward.
    """
    names = [k for k in params if k in direction]
    buffers = dict(buffers) if buffers is not None else {k: b.detach() for k, b in model.named_buffers()}
    value = grad_d = curv = 0.0
    closure_total = 0
    if L.is_closure(loss):  # Σ_b n_b, from the counts the closure returns (or the batch sizes)
        with evaluation_mode(model, "eval"), torch.enable_grad():
            closure_total = sum(L.closure_value(loss, model, {**buffers, **params}, b)[1] for b in data)
    with evaluation_mode(model, "eval"), sdpa_kernel(SDPBackend.MATH):
        for (x, y), w in zip(data, L.batch_weights(loss, data)):
            leaf = {k: params[k].detach().clone().requires_grad_(True) for k in names}
            rest = {k: v.detach() for k, v in params.items() if k not in leaf}
            if L.is_closure(loss):  # the closure's own forward; its batch weight from its count
                lb, n = L.closure_value(loss, model, {**buffers, **rest, **leaf}, (x, y))
                w = n / closure_total
            else:
                out = model_outputs(model, x, params=({**rest, **leaf}, buffers))
                lb = L.batch_loss(loss, out, y)
            grads = torch.autograd.grad(lb, [leaf[k] for k in names], create_graph=True)
            gd = dot(dict(zip(names, grads)), direction, dtype=None)  # ∇L_b·d, differentiable
            hd = torch.autograd.grad(gd, [leaf[k] for k in names], allow_unused=True)
            dhd = dot(dict(zip(names, hd)), direction, dtype=None)  # dᵀ∇²L_b d
            value += w * float(lb.detach())
            grad_d += w * float(gd.detach())
            curv += w * float(dhd)
    return value, grad_d, curv


def quadratic_regime(alphas: np.ndarray, line: np.ndarray, value: float, slope: float, curvature: float, tol: float = 0.1) -> dict:
    """How far a line α ↦ L(θ + αd) leaves its quadratic (second-order Taylor) model.

    q(α) = L(θ) + α ∇L·d + ½α² dᵀHd. Returns ``fit_curvature`` (2·c₂ of a least-squares quadratic through
    the evaluated line), ``hessian_curvature`` (dᵀHd), their ``ratio`` (1 in the quadratic regime), and
    ``alpha_min``/``alpha_max``: the widest interval of grid points around α = 0 where
    |L − q| ≤ tol·|L|.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    line = np.asarray(line, dtype=np.float64)
    fit = np.polyfit(alphas, line, 2) if len(alphas) >= 3 else np.array([np.nan, np.nan, np.nan])
    q = value + alphas * slope + 0.5 * alphas**2 * curvature
    ok = np.abs(line - q) <= tol * np.abs(line) + 1e-12 * max(1.0, abs(value))
    i0 = int(np.argmin(np.abs(alphas)))
    lo = hi = i0
    if ok[i0]:
        while lo > 0 and ok[lo - 1]:
            lo -= 1
        while hi < len(alphas) - 1 and ok[hi + 1]:
            hi += 1
        a_min, a_max = float(alphas[lo]), float(alphas[hi])
    else:
        a_min = a_max = float("nan")
    ratio = float(2 * fit[0] / curvature) if curvature != 0 else float("nan")
    return {
        "fit_curvature": float(2 * fit[0]),
        "hessian_curvature": float(curvature),
        "ratio": ratio,
        "alpha_min": a_min,
        "alpha_max": a_max,
        "tolerance": tol,
        "verdict": _quadratic_verdict(alphas, a_min, a_max, ratio, tol),
    }


def _quadratic_verdict(alphas: np.ndarray, a_min: float, a_max: float, ratio: float, tol: float) -> str:
    """The quadratic check in words: is the slice quadratic at the grid's scale, and where does it stop being so."""
    span = f"α ∈ [{alphas.min():.3g}, {alphas.max():.3g}]"
    fit = f"the fitted curvature is {ratio:.3g}× dᵀHd" if np.isfinite(ratio) else "dᵀHd is 0"
    if not np.isfinite(a_min):
        return (f"not quadratic at this scale: the loss is off its quadratic model by more than {tol:.0%} already at "
                f"the grid point nearest α = 0; {fit}; use a smaller range than {span}")
    if a_min <= alphas.min() and a_max >= alphas.max():
        return f"quadratic at this scale: within {tol:.0%} of its quadratic model over all of {span}; {fit}"
    return (f"not quadratic at this scale: within {tol:.0%} of its quadratic model only for α ∈ [{a_min:.3g}, "
            f"{a_max:.3g}] of {span}; {fit}")


BN_EXPLODES = 10.0  # an edge loss above this many times the centre loss (or NaN/inf) under bn="keep" is warned about


def warn_bn_keep(model: nn.Module, bn: str, loss: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> str | None:
    """Warn (``warnings.warn``) when a BatchNorm model's surface under ``bn="keep"`` explodes at its edges.

    With the checkpoint's running statistics kept, moving the weights shifts every BN input while the
    normalisation does not follow, so the loss far from θ* can blow up for that reason alone (Li et al. 2018,
    "Visualizing the Loss Landscape of Neural Nets", recompute the statistics). Fires when the model has a
    BatchNorm layer and the largest loss on the grid's border is non-finite or > ``BN_EXPLODES``× the loss at
    the grid point nearest the centre. Returns the message, or None.
    """
    import warnings

    if bn != "keep" or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    z = np.asarray(loss, dtype=np.float64)
    if y is None:  # a 1-D line
        centre = float(z[int(np.argmin(np.abs(x)))])
    else:  # a (ny, nx) grid
        z = z.reshape(len(y), len(x))
        centre = float(z[int(np.argmin(np.abs(y))), int(np.argmin(np.abs(x)))])
    border = np.concatenate([z[0], z[-1], z[:, 0], z[:, -1]]) if z.ndim == 2 else z[[0, -1]]
    worst = float(np.max(np.where(np.isfinite(border), border, np.inf)))
    if np.isfinite(worst) and not worst > BN_EXPLODES * abs(centre):
        return None
    what = "non-finite" if not np.isfinite(worst) else f"{worst:.3g}, {worst / abs(centre):.0f}× the centre's {centre:.3g}"
    msg = (f"the loss at the surface's edges explodes ({what}) on a BatchNorm model with bn=keep (running statistics "
           "fixed at the checkpoint's); rerun with --bn recompute to recompute them at every point")
    warnings.warn(msg, stacklevel=3)
    return msg


# ----------------------------------------------------------------------------------------- basin radius
HIGHER_IS_BETTER: frozenset[str] = frozenset({"accuracy", "top5_accuracy"})  # metrics that worsen by falling


def basin_radius(line: Callable[[float], float], alphas: np.ndarray, values: np.ndarray, center: float,
                 tolerance: float, *, worse: int = 1, refine: int = 40) -> dict[str, np.ndarray]:
    """The largest step along a direction on each side before the metric worsens by more than ``tolerance``.

    Side s ∈ {−1, +1}: r_s = sup{r ≥ 0 : worse·(f(s·t) − f(0)) ≤ tolerance for every grid t ≤ r}, the first
    crossing from the centre: the grid values ``values`` at ``alphas`` bracket it, then ``refine`` bisection
    steps of ``line(α)`` (the metric at θ* + α d) narrow it (to the bracket's width / 2^refine).
    ``worse`` = +1 for a metric that worsens by rising (a loss), −1 by falling (accuracy). A side whose grid
    never crosses gives its grid edge and ``censored`` True (the radius is at least that). On a quadratic
    f(α) = f(0) + ½λα² along a unit eigenvector the radius is √(2·tolerance/λ) on both sides (Chen et al.
    2025, "Unveiling the Basin-Like Loss Landscape in Large Language Models", measure such basins).
    Returns {"radius": (2,) [negative side, positive side], "censored": (2,) bool}.
    """
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    radius, censored = np.full(2, np.nan), np.zeros(2, dtype=bool)

    def bad(value: float) -> bool:
        return not worse * (value - center) <= tolerance  # NaN counts as worse

    for j, side in enumerate((-1.0, 1.0)):
        pick = np.flatnonzero(side * a > 0)
        order = pick[np.argsort(side * a[pick])]
        if not len(order):
            radius[j], censored[j] = 0.0, True
            continue
        lo = 0.0
        for i in order:
            t = float(side * a[i])
            if bad(float(v[i])):
                hi = t
                for _ in range(int(refine)):
                    mid = 0.5 * (lo + hi)
                    if bad(line(side * mid)):
                        hi = mid
                    else:
                        lo = mid
                radius[j] = lo
                break
            lo = t
        else:
            radius[j], censored[j] = lo, True
    return {"radius": radius, "censored": censored}


# ----------------------------------------------------------------------------------------- the probe
DIRECTION_SOURCES: tuple[str, ...] = ("random", "pca", "eigenvectors", "checkpoints", "worst")


def extra_metrics(names: Sequence[str]) -> dict[str, Metric]:
    """Extra metrics by name, from ``lossatlas.probes.grid.METRICS``.

    The registered metrics: the losses of the outputs, "top5_accuracy", and any added by ``register_metric``.
    """
    return metrics_by_name(names)


@register_probe
@dataclass(frozen=True, kw_only=True)
class Surface(MetricSettings, Probe):
    """Loss and accuracy on a filter-normalised 1-D line or 2-D plane around the checkpoint (Li et al. 2018).

    Settings: ``dims`` 1 or 2; ``xrange``/``yrange`` (min, max, num), default (−1, 1, 51); ``directions``
    "random" (Gaussian, ``norm``/``ignore``/``dir_type``/``seed``), "pca" (trajectory PCA of the
    checkpoints up to this one), "eigenvectors" (top Hessian eigenvectors, unit norm) or "checkpoints"
    (towards ``x_step`` and ``y_step``); ``bn`` "keep" | "recompute" (from the first ``bn_batches``
    batches); ``metrics``: extra losses by name. Resumes from ``ctx.partial`` and hands back partial
    results every ``save_every`` points. Values: "loss", "accuracy" with dims ("y", "x") (or ("x",)),
    the directions as flat "direction_x"/"direction_y" (dims ("param",)), and the quadratic-regime
    report in meta["quadratic"].

    Attributes:
        worst_steps / worst_radius: with directions "worst", the projected-gradient-ascent steps (20) and the
            ball's radius relative to the weights' norm (0.1): the directions of steepest loss increase within
            it (Chen et al. 2025, "Unveiling the Basin-Like Loss Landscape in Large Language Models").
        basin_tolerance: when set (e.g. 0.1 for the loss, 0.01 for accuracy), the basin radius on each side of
            every direction: the largest step before basin_metric worsens by this much (values "basin_radius").
        basin_metric: the metric of the basin radius: loss (default), accuracy (worsens by falling) or a metric.
        convexity: the convexity map of Li et al. 2018 (section 6): at every convexity_stride-th grid point along
            each axis, the Hessian's λ_max and λ_min by Lanczos and |λ_min/λ_max| (values "convexity_lambda_max",
            "convexity_lambda_min", "convexity_ratio" on dims ("cy", "cx")); costs two Lanczos runs (up to
            2·convexity_max_iter Hessian-vector products) per map point (lossatlas.probes.convexity).
        convexity_stride: the map takes every this-many-th point of the loss grid along each axis, from the first
            (default 5: 11×11 points of a 51×51 grid).
        convexity_tol: Lanczos tolerance of the map: λ_max to tol·|λ_max|, λ_min to tol·(λ_max − λ_min) (default 0.01).
        convexity_max_iter: most Lanczos steps (Hessian-vector products) per eigenvalue and map point (default 100).
        metric_fns: Python only: {name: fn(outputs, targets) -> float}, batch means averaged like the loss.
    """

    name: ClassVar[str] = "surface"
    splits_work: ClassVar[bool] = True  # under torchrun: ctx.dist splits its work
    summary: ClassVar[str] = "loss/accuracy on a 1-D or 2-D slice through parameter space"
    section: ClassVar[str] = "landscape"
    figure: ClassVar[str | None] = "surface"
    usage: ClassVar[str] = "--step last"
    dims: int = 2
    xrange: tuple[float, float, int] = (-1.0, 1.0, 51)
    yrange: tuple[float, float, int] | None = None
    directions: str = "random"
    norm: str = "filter"
    ignore: str = "biasbn"
    dir_type: str = "weights"
    seed: int = DEFAULT_SEED
    x_step: int | None = None
    y_step: int | None = None
    bn: str = "keep"
    bn_batches: int | None = None
    metrics: tuple[str, ...] = ()
    chunk_size: int | None = None
    save_every: int = 256
    quadratic_check: bool = True
    worst_steps: int = 20
    worst_radius: float = 0.1
    basin_tolerance: float | None = None
    basin_metric: str = "loss"
    convexity: bool = False
    convexity_stride: int = CONVEXITY_STRIDE
    convexity_tol: float = CONVEXITY_TOL
    convexity_max_iter: int = CONVEXITY_MAX_ITER
    metric_fns: Mapping[str, Callable[[Tensor, Tensor], float]] | None = field(
        default=None, compare=False, hash=False, metadata={"python_only": True})  # callables: no CLI flag

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses ``dims`` other than 1 or 2, a bad ``xrange``/``yrange``, an unknown ``directions``/``norm``/
        ``ignore``/``dir_type``/``bn`` or extra metric, a negative ``seed``/``x_step``/``y_step``, a
        ``chunk_size``/``save_every``/``bn_batches`` < 1, and ``directions="checkpoints"`` without the steps.
        """
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {self.dims}")
        grid_axis(self.xrange, "xrange")
        if self.yrange is not None:
            grid_axis(self.yrange, "yrange")
        check_choice("directions", self.directions, DIRECTION_SOURCES)
        check_choice("norm", self.norm, NORMS)
        check_choice("ignore", self.ignore, IGNORES)
        check_choice("dir_type", self.dir_type, DIR_TYPES)
        check_choice("bn", self.bn, BN_MODES)
        extra_metrics(self.metrics)
        if self.metric_fns is not None:
            bad = [k for k, f in dict(self.metric_fns).items() if not callable(f)]
            clash = sorted(set(self.metric_fns) & {"loss", "accuracy", *self.metrics})
            if bad or clash:
                raise ValueError(f"metric_fns {bad or clash} must be callables fn(outputs, targets) -> float under names "
                                 "other than loss, accuracy and the --metrics names")
        if not (np.isfinite(self.worst_radius) and self.worst_radius > 0):
            raise ValueError(f"worst_radius must be a positive number (relative to the weights' norm), got {self.worst_radius}")
        if int(self.worst_steps) != self.worst_steps or self.worst_steps < 1:
            raise ValueError(f"worst_steps must be a positive integer, got {self.worst_steps}")
        if self.basin_tolerance is not None and not (np.isfinite(self.basin_tolerance) and self.basin_tolerance > 0):
            raise ValueError(f"basin_tolerance must be a positive number (e.g. 0.1 for loss, 0.01 for accuracy), "
                             f"got {self.basin_tolerance}")
        known = ["loss", "accuracy", *self.metrics, *(self.metric_fns or {})]
        check_choice("basin_metric", self.basin_metric, known)
        check_nonneg_int("seed", self.seed)
        self._check_convexity()
        check_nonneg_int("x_step", self.x_step, optional=True)
        check_nonneg_int("y_step", self.y_step, optional=True)
        if (self.chunk_size is not None and self.chunk_size < 1) or self.save_every < 1:
            raise ValueError("chunk_size (or None: automatic) and save_every must be >= 1")
        if self.bn_batches is not None and self.bn_batches < 1:
            raise ValueError(f"bn_batches must be >= 1 or None (all data), got {self.bn_batches}")
        if self.directions == "checkpoints" and self.x_step is None:
            raise ValueError("directions='checkpoints' needs x_step (and y_step for dims=2)")
        if self.directions == "checkpoints" and self.dims == 2 and self.y_step is None:
            raise ValueError("directions='checkpoints' with dims=2 needs y_step")

    # -- directions
    def _directions(self, ctx: ProbeContext, base: dict[str, Tensor]) -> list[Direction]:
        k = self.dims
        params = {n: v for n, v in base.items() if n in dict(ctx.model.named_parameters())}
        if self.directions == "random":
            g = torch.Generator().manual_seed(int(self.seed))
            return [
                random_direction(ctx.model, base, norm=self.norm, ignore=self.ignore, dir_type=self.dir_type, generator=g)
                for _ in range(k)
            ]
        if self.directions == "eigenvectors":
            return top_hessian_eigenvectors(ctx.model, params, ctx.data, ctx.loss, k=k, seed=self.seed)
        if self.directions == "worst":
            return worst_case_directions(ctx.model, ctx.data, ctx.loss, k, radius=self.worst_radius,
                                         steps=self.worst_steps, ignore=self.ignore, seed=self.seed, params=base)
        if ctx.state_at is None:
            raise ValueError(f"directions={self.directions!r} needs other checkpoints; run it on a run file")
        if self.directions == "checkpoints":
            steps = [self.x_step, self.y_step][:k]
            return [checkpoint_direction(base, ctx.state_at(int(s)), list(base)) for s in steps]
        # "pca": the trajectory's PCA plane over the checkpoints up to this one
        steps = [s for s in ctx.steps if ctx.step is None or s <= ctx.step]
        pca = trajectory_pca([ctx.state_at(s) for s in steps], base, ignore=self.ignore, kinds_model=ctx.model)
        return list(pca.directions[:k])

    def run(self, ctx: ProbeContext) -> Result:
        """Loss, accuracy and extra metrics at every grid point θ* + x·d_x (+ y·d_y).

        Resumes a matching ``ctx.partial`` (same settings and grid), saves partial results every ``save_every``
        points, and under torchrun splits the points over ranks and sums them. With ``quadratic_check``,
        meta["quadratic"] compares each axis line with q(α) = L + α∇L·d + ½α² dᵀHd (``quadratic_regime``).
        """
        t0 = time.perf_counter()
        base = model_state(ctx.model, self.dir_type)
        x = grid_axis(self.xrange, "xrange")
        y = grid_axis(self.yrange if self.yrange is not None else self.xrange, "yrange") if self.dims == 2 else None
        shape = (len(y), len(x)) if y is not None else (len(x),)
        coords = grid_points(x, y)
        n = coords.shape[0]
        partial = self._usable_partial(ctx, shape)
        if partial is not None and "direction_x" in partial.values:
            dirs = self._directions_from(partial, base)
        else:
            dirs = self._directions(ctx, base)
        bn_data = list(ctx.data)[: self.bn_batches] if self.bn_batches else None
        metrics = self._metrics()
        ev = PointEvaluator(ctx.model, base, dirs, ctx.data, ctx.loss, metrics=metrics, bn=self.bn, bn_data=bn_data)
        chunk = self.chunk_size or default_chunk_size(ev, ctx.device)
        out = {name: np.full(n, np.nan) for name in ev.names}
        done = np.zeros(n, dtype=bool)
        if partial is not None:
            done = np.asarray(partial.values["done"], dtype=bool).reshape(-1).copy()
            for name in ev.names:
                out[name] = np.asarray(partial.values[name], dtype=np.float64).reshape(-1).copy()
        pending = [0]

        def on_chunk(o: dict[str, np.ndarray], d: np.ndarray, new: int) -> None:
            pending[0] += new
            if ctx.progress is not None:
                ctx.progress(int(d.sum()), n)
            if ctx.save_partial is not None and pending[0] >= self.save_every and not d.all():
                pending[0] = 0
                ctx.save_partial(self._result(ctx, o, d, shape, x, y, dirs, status="partial", t0=t0))

        if ctx.dist.active:  # torchrun: each rank evaluates whole chunks, the sums combine them
            mine = chunks_for_rank(n, chunk, ctx.dist.rank, ctx.dist.world_size)
            before = done.copy()
            evaluate_grid(ev, coords, indices=mine, done=done, out=out, chunk_size=chunk)
            fresh = done & ~before
            for name in ev.names:
                own = np.where(fresh, out[name], 0.0)
                out[name] = np.where(before, out[name], 0.0) + ctx.dist.all_reduce_sum(own)
            done = before | (ctx.dist.all_reduce_sum(fresh.astype(np.float64)) > 0)
        else:
            evaluate_grid(ev, coords, done=done, out=out, chunk_size=chunk, on_chunk=on_chunk)
        quad = self._quadratic(ctx, base, dirs, ev, out, x, y, chunk) if self.quadratic_check else None
        warn_bn_keep(ctx.model, self.bn, out["loss"], x, y)  # BN statistics kept: say so when the edges explode
        res = self._result(ctx, out, done, shape, x, y, dirs, status="complete", t0=t0, quadratic=quad, vectorized=ev.vectorized_ok)
        res.meta["chunk_size"] = chunk
        if self.basin_tolerance is not None:
            self._basins(res, ev, out, x, y, chunk)
        if self.convexity:
            self._convexity(ctx, res, base, dirs, x, y)
        return res

    def _check_convexity(self) -> None:
        """ValueError for a bad convexity-map setting (stride, tolerance, Lanczos steps, or state directions)."""
        if isinstance(self.convexity_stride, bool) or not isinstance(self.convexity_stride, int) or self.convexity_stride < 1:
            raise ValueError(f"convexity_stride must be an integer >= 1 (every k-th grid point), got {self.convexity_stride!r}")
        if not (isinstance(self.convexity_tol, (int, float)) and 0 < self.convexity_tol < 1):
            raise ValueError(f"convexity_tol must be a number in (0, 1), e.g. 0.01, got {self.convexity_tol!r}")
        if isinstance(self.convexity_max_iter, bool) or not isinstance(self.convexity_max_iter, int) or self.convexity_max_iter < 2:
            raise ValueError(f"convexity_max_iter must be an integer >= 2 (Lanczos steps), got {self.convexity_max_iter!r}")
        if self.convexity and self.dir_type != "weights":
            raise ValueError("convexity needs dir_type='weights': the Hessian is over the parameters, not the buffers")

    def _convexity(self, ctx: ProbeContext, res: Result, base, dirs, x, y) -> None:
        """The convexity map (``lossatlas.probes.convexity.convexity_map``) on the stride's sub-grid, into the result."""
        cx, cy = map_axes(x, y, self.convexity_stride)
        cv = convexity_map(ctx.model, base, [d.tensors for d in dirs], ctx.data, ctx.loss, cx, cy,
                           tol=self.convexity_tol, max_iter=self.convexity_max_iter, seed=self.seed,
                           dtype=ctx.dtype, device=ctx.device)
        dims, coords = (("cx",), {"cx": cx}) if cy is None else (("cy", "cx"), {"cx": cx, "cy": cy})
        for key in ("lambda_max", "lambda_min", "ratio", "converged"):
            res.add(f"convexity_{key}", cv[key], dims, coords)
        finite = cv["ratio"][np.isfinite(cv["ratio"])]
        res.meta["convexity"] = {
            "definition": "ratio = |λ_min/λ_max| of the Hessian of the loss at θ* + cx·d_x + cy·d_y (eval mode), λ by "
                          "Lanczos (Li et al. 2018, section 6)",
            "stride": int(self.convexity_stride), "tol": float(self.convexity_tol),
            "max_iter": int(self.convexity_max_iter), "matvecs": int(cv["matvecs"].sum()),
            "all_converged": bool(cv["converged"].all()), "elapsed_s": float(cv["elapsed_s"]),
            "mean_ratio": float(finite.mean()) if finite.size else float("nan"),
            "max_ratio": float(finite.max()) if finite.size else float("nan"),
            "note": "Hessian with the checkpoint's BN statistics (eval mode)" if self.bn == "recompute" else "",
        }

    def _basins(self, res: Result, ev: PointEvaluator, out, x, y, chunk: int) -> None:
        """``basin_radius`` along each axis direction through θ*, both sides, into the result."""
        name, worse = self.basin_metric, (-1 if self.basin_metric in HIGHER_IS_BETTER else 1)
        k = len([a for a in (x, y) if a is not None])
        center = float(ev.evaluate(np.zeros((1, k)))[name][0])
        radii, censored = np.zeros((k, 2)), np.zeros((k, 2), dtype=bool)
        for axis, a in enumerate([x, y][:k]):
            values = self._axis_line(ev, out, x, y, axis, chunk, name)

            def line(alpha: float, _axis: int = axis) -> float:
                pt = np.zeros((1, k))
                pt[0, _axis] = alpha
                return float(ev.evaluate(pt)[name][0])

            b = basin_radius(line, a, values, center, float(self.basin_tolerance), worse=worse)
            radii[axis], censored[axis] = b["radius"], b["censored"]
        coords = {"direction": np.arange(k), "side": np.array([-1, 1])}
        res.add("basin_radius", radii, ("direction", "side"), coords)
        res.add("basin_censored", censored, ("direction", "side"), coords)
        res.meta["basin"] = {"metric": name, "tolerance": float(self.basin_tolerance),
                             "worsens": "falls" if worse < 0 else "rises",
                             "definition": "the largest |α| on each side of θ* along each direction before the metric "
                                           "worsens by more than the tolerance from its value at θ*; censored: the grid "
                                           "edge was reached first (the radius is at least that)"}

    def _usable_partial(self, ctx: ProbeContext, shape: tuple[int, ...]) -> Result | None:
        p = ctx.partial
        if p is None or p.probe != self.name:
            return None
        same = json.dumps(p.config, sort_keys=True) == json.dumps(self.config(), sort_keys=True)
        if not same or "done" not in p.values or np.asarray(p.values["done"]).shape != shape:
            return None  # a different request: recompute, never reuse silently
        return p

    def _directions_from(self, partial: Result, base: dict[str, Tensor]) -> list[Direction]:
        names = list(partial.meta["param_names"])
        like = {k: base[k] for k in names}
        keys = ["direction_x", "direction_y"][: self.dims]
        rules = [partial.meta.get("rules_x", {}), partial.meta.get("rules_y", {})]
        return [Direction(unflatten(torch.as_tensor(partial.values[k]), like), dict(r)) for k, r in zip(keys, rules)]

    def _quadratic(self, ctx, base, dirs, ev, out, x, y, chunk) -> dict:
        params = {k: v for k, v in base.items() if k in ev.param_names}
        buffers = {k: v for k, v in ev.state.items() if k not in ev.param_names}
        report = {}
        for axis, (d, a) in enumerate(zip(dirs, [x, y])):
            if a is None:
                continue
            line = self._axis_line(ev, out, x, y, axis, chunk)
            d_params = {k: v for k, v in d.tensors.items() if k in params}
            value, slope, curv = directional_derivatives(ctx.model, params, d_params, ctx.data, ctx.loss, buffers=buffers)
            report["xy"[axis]] = quadratic_regime(a, line, value, slope, curv)
        report["note"] = "Hessian curvature with the checkpoint's BN statistics (eval mode)" if self.bn == "recompute" else ""
        return report

    def _axis_line(self, ev: PointEvaluator, out, x, y, axis: int, chunk: int, name: str = "loss") -> np.ndarray:
        """The metric ``name`` along one axis through θ* (the grid's row/column when it contains 0, else evaluated)."""
        a = x if axis == 0 else y
        other = None if y is None else (y if axis == 0 else x)
        if other is None:
            return out[name]
        hit = np.flatnonzero(other == 0.0)
        if len(hit):
            z = out[name].reshape(len(y), len(x))
            return z[hit[0], :] if axis == 0 else z[:, hit[0]]
        pts = np.zeros((len(a), 2))
        pts[:, axis] = a
        return evaluate_grid(ev, pts, chunk_size=chunk)[0][name]

    def _result(self, ctx, out, done, shape, x, y, dirs, *, status, t0, quadratic=None, vectorized=None) -> Result:
        dims = ("y", "x") if y is not None else ("x",)
        coords = {"x": x} if y is None else {"x": x, "y": y}
        names = list(dirs[0].tensors)
        res = self.new_result(ctx.step)
        for k, v in out.items():
            res.add(k, v.reshape(shape).copy(), dims, coords)
        for key, d in zip(["direction_x", "direction_y"], dirs):
            res.add(key, flatten(d, names).detach().double().cpu().numpy(), ("param",))
        if status == "partial":
            res.add("done", done.reshape(shape).copy(), dims, coords)
        meta = res.meta
        meta.update({
            "status": status,
            "indexing": "xy",
            "seed": int(self.seed),
            "loss": ctx.loss,
            "bn": self.bn,
            "param_names": names,
            "param_shapes": [list(dirs[0].tensors[k].shape) for k in names],
            "rules_x": dict(dirs[0].rules),
            "elapsed_s": time.perf_counter() - t0,
        })
        if len(dirs) > 1:
            meta["rules_y"] = dict(dirs[1].rules)
            meta["cosine"] = cosine(dirs[0], dirs[1])
        if quadratic is not None:
            meta["quadratic"] = quadratic
        if vectorized is not None:
            meta["vectorized"] = bool(vectorized)
        return res
