"""Loss surfaces: loss and accuracy on a 1-D line or a 2-D plane through parameter space (SCIENCE.md §4.1, §4.4).

θ(α) = θ* + α d (1-D), θ(α, β) = θ* + α d_x + β d_y (2-D), evaluated on a fixed data set with the
example-weighted mean loss and the accuracy in [0, 1] (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets"). Points are evaluated with ``torch.func.functional_call`` on fresh parameter dicts, several
points per forward pass through ``torch.func.vmap`` over stacked parameter dicts.

Grid indexing (SCIENCE.md §4.4): Z has shape (ny, nx) and ``Z[i, j] = L(x_j, y_i)`` (``indexing='xy'``,
as ``np.meshgrid(x, y)``); flat point k ↔ (x[k mod nx], y[k div nx]).

Bitwise reproducibility: a vmapped forward over a chunk of C points differs in the last bits from the same
points in another chunk (batched matmuls). So the grid is cut into a fixed partition of chunks
(consecutive positions in the list of points to evaluate, ``chunk_size`` each) that does not depend on which
points are already done: a resumed run recomputes whole chunks and gets the uninterrupted run's bits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lossatlas.probes import losses as L
from lossatlas.probes.distributed import chunks_for_rank
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.directions import (
    DEFAULT_SEED,
    DIR_TYPES,
    IGNORES,
    NORMS,
    Direction,
    check_option,
    checkpoint_direction,
    cosine,
    eigenvector_directions,
    flatten,
    model_state,
    random_direction,
    unflatten,
)

BN_MODES: tuple[str, ...] = ("keep", "recompute")
Metric = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> the batch mean of a per-example metric


def _bn_stat_names(model: nn.Module) -> list[str]:
    """Names of the running statistics of every BatchNorm layer that tracks them."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            p = f"{mod_name}." if mod_name else ""
            names += [p + "running_mean", p + "running_var", p + "num_batches_tracked"]
    return names


def recompute_bn_stats(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """BatchNorm running statistics recomputed at ``params``: fresh buffers after a train-mode pass.

    Reset (mean 0, var 1, count 0), then forward ``batches`` in train mode with momentum=None, i.e. the
    running statistics become the plain average of the per-batch statistics (PyTorch's cumulative
    moving average). Works on copies of ``buffers``; the model's own buffers and flags are untouched.
    """
    fresh = {k: v.clone() for k, v in buffers.items()}
    for name in _bn_stat_names(model):
        if name in fresh:
            t = fresh[name]
            t.fill_(1 if name.endswith("running_var") else 0)
    with torch.no_grad(), evaluation_mode(model, "train", cumulative_bn=True):
        for x, _ in batches:
            functional_call(model, (dict(params), fresh), (x,))  # updates `fresh` in place
    return fresh


# ----------------------------------------------------------------------------------------- the engine
class PointEvaluator:
    """Loss, accuracy and extra metrics at points θ* + Σ_k c_k d_k, on a fixed data set.

    Args:
        model: the module (its structure; its parameters are never read for the point values
            except where ``base`` lacks a tensor).
        base: θ*, tensors by name (parameters, and buffers when the directions perturb buffers).
        directions: the directions d_k (Direction or dict of tensors).
        data: (inputs, targets) batches; loss = Σ_b n_b·mean_b / N, accuracy = correct / N.
        loss: a name from ``lossatlas.probes.losses``.
        metrics: extra per-batch-mean metrics ``f(outputs, targets) -> Tensor``, averaged like the loss.
        bn: "keep" (evaluate with θ*'s running statistics, eval mode) or "recompute" (recompute BN
            statistics at every point from ``bn_data``, then eval mode).
        bn_data: the batches for "recompute" (default: ``data``).
        vectorize: evaluate a chunk of points in one vmapped forward (else one forward per point).
    """

    def __init__(
        self,
        model: nn.Module,
        base: Mapping[str, Tensor],
        directions: Sequence[Direction | Mapping[str, Tensor]],
        data: Sequence[tuple[Tensor, Tensor]],
        loss: str,
        *,
        metrics: Mapping[str, Metric] | None = None,
        bn: str = "keep",
        bn_data: Sequence[tuple[Tensor, Tensor]] | None = None,
        vectorize: bool = True,
    ) -> None:
        L.check_loss_name(loss)
        check_option("bn", bn, BN_MODES)
        if not data:
            raise ValueError("the data holds no batches; give at least one (inputs, targets) batch")
        self.model, self.data, self.loss, self.bn = model, list(data), loss, bn
        self.bn_data = list(bn_data) if bn_data is not None else self.data
        self.metrics = dict(metrics or {})
        clash = set(self.metrics) & {"loss", "accuracy"}
        if clash:
            raise ValueError(f"extra metric names {sorted(clash)} clash with the built-in ones; rename them")
        self.vectorize = vectorize
        state = model_state(model, "states")
        unknown = [k for k in base if k not in state]
        if unknown:
            raise ValueError(f"base tensors {unknown[:3]} are not parameters or buffers of the model")
        state.update({k: v.detach() for k, v in base.items()})
        self.dirs = [d.tensors if isinstance(d, Direction) else dict(d) for d in directions]
        for d in self.dirs:
            bad = [k for k in d if k not in state]
            if bad:
                raise ValueError(f"direction tensors {bad[:3]} are not parameters or buffers of the model")
        self.param_names = {k for k, _ in model.named_parameters()}
        # tensors that move with the point: floating tensors that some direction touches
        self.moving = [k for k in state if state[k].is_floating_point() and any(k in d for d in self.dirs)]
        if bn == "recompute":
            self.moving += [k for k in _bn_stat_names(model) if k in state and k not in self.moving]
        self.fixed = {k: v for k, v in state.items() if k not in self.moving}
        self.state = state
        self.num_examples = sum(L.batch_count(loss, y) for _, y in self.data)
        self.vectorized_ok = vectorize

    @property
    def names(self) -> list[str]:
        return ["loss", "accuracy", *self.metrics]

    def point_state(self, coord: Sequence[float]) -> dict[str, Tensor]:
        """The moving tensors at one point: θ* + Σ_k c_k d_k, computed the same way for every point."""
        out = {}
        for k in self.moving:
            t = self.state[k]
            for c, d in zip(coord, self.dirs):
                if k in d:
                    t = t + float(c) * d[k]
            out[k] = t
        if self.bn == "recompute":
            params = {k: v for k, v in {**self.fixed, **out}.items() if k in self.param_names}
            buffers = {k: v for k, v in {**self.fixed, **out}.items() if k not in self.param_names}
            fresh = recompute_bn_stats(self.model, params, buffers, self.bn_data)
            out.update({k: fresh[k] for k in self.moving if k in fresh})
        return out

    def evaluate(self, coords: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric at each row of ``coords`` (shape (C, K)); arrays of shape (C,)."""
        coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        if coords.shape[1] != len(self.dirs):
            raise ValueError(f"points need {len(self.dirs)} coordinates (one per direction), got {coords.shape[1]}")
        with torch.no_grad():
            states = [self.point_state(c) for c in coords]
            sums = {n: np.zeros(len(states)) for n in self.names}
            with evaluation_mode(self.model, "eval"):
                for x, y in self.data:
                    outs = self._forward(states, x)  # (C, B, ...)
                    n_b = L.batch_count(self.loss, y)
                    for i, out in enumerate(outs):
                        sums["loss"][i] += float(L.batch_loss(self.loss, out, y)) * n_b
                        sums["accuracy"][i] += L.correct_count(out, y)
                        for name, fn in self.metrics.items():
                            sums[name][i] += float(fn(out, y)) * n_b
        return {n: v / self.num_examples for n, v in sums.items()}

    def _forward(self, states: list[dict[str, Tensor]], x: Tensor) -> list[Tensor]:
        def f(moving: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(self.model, ({**self.fixed, **moving},), (inputs,))

        if self.vectorized_ok and len(states) > 1:
            stacked = {k: torch.stack([s[k] for s in states]) for k in self.moving}
            try:
                return list(vmap(f, in_dims=(0, None))(stacked, x))
            except (RuntimeError, NotImplementedError):  # an op without a batching rule: loop instead
                self.vectorized_ok = False
        return [f(s, x) for s in states]


def default_chunk_size(evaluator: PointEvaluator, device: torch.device | str, budget_bytes: int = 2**30) -> int:
    """Points per vmapped forward: 1 on CPU (vmap measured no faster there, slower for convs:
    benchmarks/bench_surface.py), else as many as fit ``budget_bytes`` of stacked parameters, at most 16."""
    if torch.device(device).type == "cpu":
        return 1
    per_point = sum(evaluator.state[k].numel() * evaluator.state[k].element_size() for k in evaluator.moving)
    return int(max(1, min(16, budget_bytes // max(per_point, 1))))


def auto_chunk_size(chunk_size: int | None, device: torch.device | str) -> int:
    """``chunk_size`` if given, else 1 on CPU and 16 on an accelerator (see ``default_chunk_size``)."""
    return int(chunk_size) if chunk_size else (1 if torch.device(device).type == "cpu" else 16)


def points_for_rank(n_points: int, rank: int, world_size: int) -> np.ndarray:
    """The flat point indices rank ``rank`` of ``world_size`` evaluates: rank, rank + W, rank + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return np.arange(rank, n_points, world_size)


def evaluate_grid(
    evaluator: PointEvaluator,
    coords: np.ndarray,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    done: np.ndarray | None = None,
    out: dict[str, np.ndarray] | None = None,
    chunk_size: int = 8,
    on_chunk: Callable[[dict[str, np.ndarray], np.ndarray, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Evaluate the points ``indices`` of ``coords`` (shape (n, K)) that ``done`` lacks.

    ``indices`` (default all n) are cut into fixed chunks of ``chunk_size`` consecutive entries; a
    chunk with any missing point is evaluated whole, so values never depend on the resume state.
    ``out`` (arrays of shape (n,), NaN where missing) and ``done`` (bool (n,)) are updated in place
    and returned; ``on_chunk(out, done, n_new)`` runs after every chunk.
    """
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    n = coords.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    done = np.zeros(n, dtype=bool) if done is None else done
    if done.shape != (n,):
        raise ValueError(f"the done mask needs shape ({n},), got {done.shape}")
    if out is None:
        out = {}
    for name in evaluator.names:
        out.setdefault(name, np.full(n, np.nan))
    for start in range(0, len(idx), chunk_size):
        chunk = idx[start : start + chunk_size]
        if done[chunk].all():
            continue
        vals = evaluator.evaluate(coords[chunk])
        new = int((~done[chunk]).sum())
        for name, v in vals.items():
            out[name][chunk] = v
        done[chunk] = True
        if on_chunk is not None:
            on_chunk(out, done, new)
    return out, done


def grid_axis(spec: Sequence[float], name: str = "xrange") -> np.ndarray:
    """np.linspace(min, max, num) from a (min, max, num) triple, validated."""
    if len(spec) != 3:
        raise ValueError(f"{name} must be (min, max, num), e.g. (-1, 1, 51); got {tuple(spec)}")
    lo, hi, num = float(spec[0]), float(spec[1]), spec[2]
    if int(num) != num or int(num) < 1:
        raise ValueError(f"{name}: the number of points must be a positive integer, got {num}")
    if int(num) > 1 and not lo < hi:
        raise ValueError(f"{name}: min must be below max, got ({lo}, {hi})")
    return np.linspace(lo, hi, int(num))


def grid_points(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Flat grid coordinates in ravel order of Z (ny, nx): point k = (x[k mod nx], y[k div nx])."""
    if y is None:
        return x[:, None]
    X, Y = np.meshgrid(x, y)  # indexing='xy': shape (ny, nx)
    return np.stack([X.ravel(), Y.ravel()], axis=1)


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
    """(L(θ), ∇L·d, dᵀ∇²L d) on the data set, by double backward (SCIENCE.md §1.1, §0 batch weights).

    Each batch contributes (n_b/N)·(its mean loss, its gradient and its Hessian-vector product);
    eval mode; only the parameters in ``direction`` are differentiated.
    """
    names = [k for k in params if k in direction]
    buffers = dict(buffers) if buffers is not None else {k: b.detach() for k, b in model.named_buffers()}
    n_total = sum(L.batch_count(loss, y) for _, y in data)
    value = grad_d = curv = 0.0
    with evaluation_mode(model, "eval"):
        for x, y in data:
            leaf = {k: params[k].detach().clone().requires_grad_(True) for k in names}
            rest = {k: v.detach() for k, v in params.items() if k not in leaf}
            out = functional_call(model, ({**rest, **leaf}, buffers), (x,))
            lb = L.batch_loss(loss, out, y)
            grads = torch.autograd.grad(lb, [leaf[k] for k in names], create_graph=True)
            gd = sum((g * direction[k]).sum() for g, k in zip(grads, names))
            hd = torch.autograd.grad(gd, [leaf[k] for k in names], allow_unused=True)
            dhd = sum((h * direction[k]).sum() for h, k in zip(hd, names) if h is not None)
            w = L.batch_count(loss, y) / n_total
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
    }


# ----------------------------------------------------------------------------------------- eigenvectors
def top_hessian_eigenvectors(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    k: int = 2,
    *,
    seed: int = 0,
) -> list[Direction]:
    """The top-k Hessian eigenvectors (unit norm) at ``params`` from the curvature engine.

    Lanczos with full reorthogonalization (residual tol 1e-8) on float64 Hessian-vector products
    (``lossatlas.probes.curvature`` and ``lossatlas.probes.estimators``, SCIENCE.md §1.2).
    """
    from lossatlas.probes.curvature import HessianOperator
    from lossatlas.probes.estimators import lanczos_eigs

    op = HessianOperator(model, list(data), loss, params=dict(params), dtype=torch.float64)
    res = lanczos_eigs(op, k=k, which="LA", tol=1e-8, seed=seed)
    ordered = {n: params[n] for n in op.param_names}
    return eigenvector_directions(res.eigenvectors, ordered, label="eigenvector(unit)")


# ----------------------------------------------------------------------------------------- the probe
DIRECTION_SOURCES: tuple[str, ...] = ("random", "pca", "eigenvectors", "checkpoints")


def extra_metrics(names: Sequence[str]) -> dict[str, Metric]:
    """Extra metrics by name: any other loss of ``lossatlas.probes.losses`` (its batch mean)."""
    out: dict[str, Metric] = {}
    for n in names:
        L.check_loss_name(n)
        out[n] = lambda o, y, _n=n: L.batch_loss(_n, o, y)
    return out


@register_probe
@dataclass(frozen=True, kw_only=True)
class Surface(Probe):
    """Loss and accuracy on a filter-normalised 1-D line or 2-D plane around the checkpoint (Li et al. 2018).

    Settings: ``dims`` 1 or 2; ``xrange``/``yrange`` (min, max, num), default (−1, 1, 51); ``directions``
    "random" (Gaussian, ``norm``/``ignore``/``dir_type``/``seed``), "pca" (trajectory PCA of the
    checkpoints up to this one), "eigenvectors" (top Hessian eigenvectors, unit norm) or "checkpoints"
    (towards ``x_step`` and ``y_step``); ``bn`` "keep" | "recompute" (from the first ``bn_batches``
    batches); ``metrics``: extra losses by name. Resumes from ``ctx.partial`` and hands back partial
    results every ``save_every`` points. Values: "loss", "accuracy" with dims ("y", "x") (or ("x",)),
    the directions as flat "direction_x"/"direction_y" (dims ("param",)), and the quadratic-regime
    report in meta["quadratic"].
    """

    name: ClassVar[str] = "surface"
    splits_work: ClassVar[bool] = True  # under torchrun: ctx.dist splits its work
    summary: ClassVar[str] = "loss/accuracy on a 1-D or 2-D slice through parameter space"
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

    def validate(self) -> None:
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {self.dims}")
        grid_axis(self.xrange, "xrange")
        if self.yrange is not None:
            grid_axis(self.yrange, "yrange")
        check_option("directions", self.directions, DIRECTION_SOURCES)
        check_option("norm", self.norm, NORMS)
        check_option("ignore", self.ignore, IGNORES)
        check_option("dir_type", self.dir_type, DIR_TYPES)
        check_option("bn", self.bn, BN_MODES)
        extra_metrics(self.metrics)
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
        if ctx.state_at is None:
            raise ValueError(f"directions={self.directions!r} needs other checkpoints; run it on a run file")
        if self.directions == "checkpoints":
            steps = [self.x_step, self.y_step][:k]
            return [checkpoint_direction(base, ctx.state_at(int(s)), list(base)) for s in steps]
        from lossatlas.probes.trajectory import trajectory_pca  # pca

        steps = [s for s in ctx.steps if ctx.step is None or s <= ctx.step]
        pca = trajectory_pca([ctx.state_at(s) for s in steps], base, ignore=self.ignore, kinds_model=ctx.model)
        return list(pca.directions[:k])

    def run(self, ctx: ProbeContext) -> Result:
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
        ev = PointEvaluator(ctx.model, base, dirs, ctx.data, ctx.loss, metrics=extra_metrics(self.metrics), bn=self.bn, bn_data=bn_data)
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
        res = self._result(ctx, out, done, shape, x, y, dirs, status="complete", t0=t0, quadratic=quad, vectorized=ev.vectorized_ok)
        res.meta["chunk_size"] = chunk
        return res

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

    def _axis_line(self, ev: PointEvaluator, out, x, y, axis: int, chunk: int) -> np.ndarray:
        """L along one axis through θ* (the grid's row/column when it contains 0, else evaluated)."""
        a = x if axis == 0 else y
        other = None if y is None else (y if axis == 0 else x)
        if other is None:
            return out["loss"]
        hit = np.flatnonzero(other == 0.0)
        if len(hit):
            z = out["loss"].reshape(len(y), len(x))
            return z[hit[0], :] if axis == 0 else z[:, hit[0]]
        pts = np.zeros((len(a), 2))
        pts[:, axis] = a
        return evaluate_grid(ev, pts, chunk_size=chunk)[0]["loss"]

    def _result(self, ctx, out, done, shape, x, y, dirs, *, status, t0, quadratic=None, vectorized=None) -> Result:
        dims = ("y", "x") if y is not None else ("x",)
        names = list(dirs[0].tensors)
        values = {k: v.reshape(shape).copy() for k, v in out.items()}
        vdims = {k: dims for k in values}
        for key, d in zip(["direction_x", "direction_y"], dirs):
            values[key] = flatten(d, names).detach().double().cpu().numpy()
            vdims[key] = ("param",)
        if status == "partial":
            values["done"] = done.reshape(shape).copy()
            vdims["done"] = dims
        coords = {"x": x} if y is None else {"x": x, "y": y}
        meta = {
            "status": status,
            "indexing": "xy",
            "seed": int(self.seed),
            "loss": ctx.loss,
            "bn": self.bn,
            "param_names": names,
            "param_shapes": [list(dirs[0].tensors[k].shape) for k in names],
            "rules_x": dict(dirs[0].rules),
            "elapsed_s": time.perf_counter() - t0,
        }
        if len(dirs) > 1:
            meta["rules_y"] = dict(dirs[1].rules)
            meta["cosine"] = cosine(dirs[0], dirs[1])
        if quadratic is not None:
            meta["quadratic"] = quadratic
        if vectorized is not None:
            meta["vectorized"] = bool(vectorized)
        return Result(probe=self.name, config=self.config(), step=ctx.step, values=values, dims=vdims, coords=coords, meta=meta)
