"""Linear interpolation between checkpoints and mode-connectivity barriers.

Path: θ(α) = θ_a + α(θ_b − θ_a), i.e. (1 − α)θ_a + αθ_b (Goodfellow, Vinyals, Saxe 2015), α ∈ [0, 1] for
barriers (31 points by default) or wider (−0.5:1.5) for plots. Barriers on the α ∈ [0, 1] part of the grid:

- the barrier (primary; ``loss_barrier``, ``error_barrier``): the largest rise over the chord between
  the endpoints, max_α [f(α) − ((1 − α)f(0) + αf(1))] (Entezari, Sedghi, Saukh, Neyshabur 2022, "The Role
  of Permutation Invariance in Linear Mode Connectivity of Neural Networks"); 0 for a convex f, and it
  does not count the difference between the endpoints as a barrier;
- the endpoint-mean barrier (secondary; ``loss_endpoint_mean_barrier``, ``error_endpoint_mean_barrier``):
  max_α f(α) − ½(f(0) + f(1)), the "instability" of Frankle, Dziugaite, Roy, Carbin 2020 ("Linear Mode
  Connectivity and the Lottery Ticket Hypothesis"); it exceeds the chord form by up to ½|f(1) − f(0)|.

Both are stored for the loss and for the error (1 − accuracy). Layer-wise (Adilova et al. 2024): only the
tensors of one group of layers move along the path, the rest stay at θ_a; the barrier of that cut uses the
cut's own endpoints. Cumulative variants move the first k / last k groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.directions import DIR_TYPES, checkpoint_direction, model_state
from lossatlas.probes.grid import (
    BN_MODES,
    Metric,
    MetricSettings,
    PointEvaluator,
    auto_chunk_size,
    evaluate_grid,
    grid_axis,
)
from lossatlas.probes.settings import check_choice

BARRIER_DEFINITION = ("*_barrier: max over α of f(α) − ((1−α)f(0) + αf(1)), the rise over the chord between the "
                      "endpoints (Entezari et al. 2022); *_endpoint_mean_barrier: max over α of f(α) − (f(0)+f(1))/2 "
                      "(Frankle et al. 2020)")


def barriers(alphas: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """The chord barrier (Entezari et al. 2022) and the endpoint-mean barrier (Frankle et al. 2020) on α ∈ [0, 1].

    chord = max_α [f(α) − ((1 − α)f(0) + αf(1))] (the primary barrier); endpoint_mean = max_α f(α) −
    ½(f(0) + f(1)). ``alphas`` must contain 0 and 1; points outside [0, 1] are ignored. Returns "chord",
    "endpoint_mean" and "argmax_chord" (the α of the chord barrier), and the same under their former
    names "linear", "midpoint" and "argmax_linear".
    """
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    i0, i1 = np.flatnonzero(a == 0.0), np.flatnonzero(a == 1.0)
    if not len(i0) or not len(i1):
        raise ValueError("barriers need α = 0 and α = 1 on the path; use a range such as (0, 1, 31)")
    v0, v1 = v[i0[0]], v[i1[0]]
    inside = (a >= 0.0) & (a <= 1.0)
    lin = v[inside] - ((1.0 - a[inside]) * v0 + a[inside] * v1)
    j = int(np.argmax(lin))
    chord, endpoint_mean, at = float(lin[j]), float(v[inside].max() - 0.5 * (v0 + v1)), float(a[inside][j])
    return {"chord": chord, "endpoint_mean": endpoint_mean, "argmax_chord": at,
            "linear": chord, "midpoint": endpoint_mean, "argmax_linear": at}  # former names, same values


def layer_groups(model: nn.Module, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Tensors grouped by the module that owns them (``"fc1.weight"`` → ``"fc1"``), in model order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        owner = n.rsplit(".", 1)[0] if "." in n else n
        groups.setdefault(owner, []).append(n)
    return list(groups.items())


def interpolation_curve(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    alphas: np.ndarray,
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    *,
    names: Sequence[str] | None = None,
    bn: str = "keep",
    bn_data: Sequence[tuple[Tensor, Tensor]] | None = None,
    chunk_size: int = 8,
    metrics: Mapping[str, Metric] | None = None,
) -> dict[str, np.ndarray]:
    """Loss, accuracy, error and ``metrics`` along θ(α) = θ_a + α(θ_b − θ_a), moving only ``names`` (default all).

    ``metrics``: f(outputs, targets) -> batch mean, averaged over the batches like the loss.
    """
    d = checkpoint_direction(start, end, names)
    ev = PointEvaluator(model, start, [d], data, loss, bn=bn, bn_data=bn_data, metrics=metrics)
    out, _ = evaluate_grid(ev, np.asarray(alphas, dtype=np.float64)[:, None], chunk_size=chunk_size)
    out["error"] = 1.0 - out["accuracy"]
    return out


def layerwise_barriers(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    alphas: np.ndarray,
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    *,
    groups: Sequence[tuple[str, Sequence[str]]] | None = None,
    cumulative: bool = True,
    bn: str = "keep",
    bn_data: Sequence[tuple[Tensor, Tensor]] | None = None,
    chunk_size: int = 8,
) -> dict:
    """Layer-wise linear mode connectivity (Adilova, Andriushchenko, Kamp, Fischer, Jaggi, ICLR 2024).

    For each group ℓ: the curve with only group ℓ interpolated, its chord and endpoint-mean loss barriers and
    its chord error barrier; with ``cumulative``, the same for the first k and the last k groups (k = 1..G).
    Returns {"groups": names, "single"|"first"|"last": {"loss": (G, A), "error": (G, A),
    "loss_barrier": (G,), "loss_endpoint_mean_barrier": (G,), "error_barrier": (G,)}} (``*_barrier``: chord form).
    """
    if groups is None:
        groups = layer_groups(model, [k for k in start if start[k].is_floating_point()])
    groups = [(g, list(ns)) for g, ns in groups]
    if not groups:
        raise ValueError("no layer groups to interpolate; the checkpoints hold no floating tensors")
    cuts = {"single": [ns for _, ns in groups]}
    if cumulative:
        cuts["first"] = [sum((ns for _, ns in groups[: k + 1]), []) for k in range(len(groups))]
        cuts["last"] = [sum((ns for _, ns in groups[len(groups) - k - 1 :]), []) for k in range(len(groups))]
    table: dict = {"groups": [g for g, _ in groups]}
    for kind, sets in cuts.items():
        rows = [interpolation_curve(model, start, end, alphas, data, loss, names=s, bn=bn, bn_data=bn_data, chunk_size=chunk_size) for s in sets]
        lb = [barriers(alphas, r["loss"]) for r in rows]
        eb = [barriers(alphas, r["error"]) for r in rows]
        table[kind] = {
            "loss": np.stack([r["loss"] for r in rows]),
            "error": np.stack([r["error"] for r in rows]),
            "loss_barrier": np.array([b["chord"] for b in lb]),
            "loss_endpoint_mean_barrier": np.array([b["endpoint_mean"] for b in lb]),
            "error_barrier": np.array([b["chord"] for b in eb]),
        }
    return table


@register_probe
@dataclass(frozen=True, kw_only=True)
class Interpolate(MetricSettings, Probe):
    """Loss and error on the straight path from this checkpoint to ``to_step``, and its barriers.

    θ(α) = (1 − α)θ_a + αθ_b (Goodfellow, Vinyals, Saxe 2015); the barrier over the chord between the
    endpoints (Entezari et al. 2022; primary) and the endpoint-mean barrier (Frankle et al. 2020) of the
    loss and of the error.

    Settings: ``to_step`` (the other checkpoint), ``alphas`` (min, max, num), default (0, 1, 31);
    ``dir_type`` "states" (buffers move too, as Li et al. advise) or "weights"; ``bn`` "keep" |
    "recompute" (fresh BN statistics at every α from the first ``bn_batches`` batches); ``layerwise``
    adds the single-layer and first-k/last-k barrier tables. Barriers need α = 0 and 1 in the grid.

    Attributes:
        metrics: registered metrics along the path, by name (lossatlas.probes.grid.METRICS: the losses of the
            outputs, top5_accuracy), each a batch mean averaged like the loss.
        metric_fns: Python only: {name: fn(outputs, targets) -> float}, batch means averaged like the loss.
    """

    name: ClassVar[str] = "interpolate"
    summary: ClassVar[str] = "loss along the line between two checkpoints; LMC barriers (incl. layer-wise)"
    section: ClassVar[str] = "landscape"
    figure: ClassVar[str | None] = "interpolate"
    usage: ClassVar[str] = "--step 0 --to-step LAST"
    to_step: int | None = None
    alphas: tuple[float, float, int] = (0.0, 1.0, 31)
    dir_type: str = "states"
    bn: str = "keep"
    bn_batches: int | None = None
    layerwise: bool = False
    chunk_size: int | None = None  # None: 1 on CPU, 16 on an accelerator
    metrics: tuple[str, ...] = ()  # registered metric names (lossatlas.probes.grid.METRICS) along the path
    metric_fns: Mapping[str, Callable[[Tensor, Tensor], float]] | None = field(
        default=None, compare=False, hash=False, metadata={"python_only": True})  # callables: no CLI flag

    def validate(self) -> None:
        """ValueError without ``to_step``, for a bad ``alphas`` range or ``dir_type``/``bn``, or a count < 1."""
        clash = sorted(set(self._metrics()) & {"loss", "accuracy", "error"})
        if clash or not all(callable(f) for f in self._metrics().values()):
            raise ValueError(f"metrics must be callables fn(outputs, targets) -> float named other than loss, accuracy "
                             f"and error; got {clash or sorted(self._metrics())}")
        if self.to_step is None:
            raise ValueError("interpolate needs to_step: the step of the other checkpoint")
        grid_axis(self.alphas, "alphas")
        check_choice("dir_type", self.dir_type, DIR_TYPES)
        check_choice("bn", self.bn, BN_MODES)
        if self.bn_batches is not None and self.bn_batches < 1:
            raise ValueError(f"bn_batches must be >= 1 or None (all data), got {self.bn_batches}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None (automatic), got {self.chunk_size}")

    def run(self, ctx: ProbeContext) -> Result:
        """Loss, accuracy and error at every θ(α) = (1 − α)θ_a + αθ_b, and the barriers of loss and error.

        ``loss_barrier``/``error_barrier`` are max_α [f(α) − ((1 − α)f(0) + αf(1))] (over the chord);
        ``loss_endpoint_mean_barrier``/``error_endpoint_mean_barrier`` are max_α f(α) − (f(0) + f(1))/2 (only
        when α = 0 and 1 are in the grid); ``meta["barrier"]`` states the definition. ``layerwise`` adds ``single_*``, ``first_*`` and ``last_*`` tables where only that
        layer group, the first k or the last k groups move. ValueError outside a run file (no other checkpoint).
        """
        t0 = time.perf_counter()
        if ctx.state_at is None:
            raise ValueError("interpolate needs the other checkpoint (ctx.state_at); run it on a run file")
        a = grid_axis(self.alphas, "alphas")
        start = model_state(ctx.model, self.dir_type)
        end = {k: v for k, v in ctx.state_at(int(self.to_step)).items() if k in start}
        bn_data = list(ctx.data)[: self.bn_batches] if self.bn_batches else None
        curve = interpolation_curve(ctx.model, start, end, a, ctx.data, ctx.loss, bn=self.bn, bn_data=bn_data,
                                    chunk_size=auto_chunk_size(self.chunk_size, ctx.device), metrics=self._metrics())
        res = self.new_result(ctx.step, {"status": "complete", "from_step": ctx.step, "to_step": int(self.to_step),
                                         "loss": ctx.loss, "bn": self.bn})
        for k in ("loss", "accuracy", "error", *self._metrics()):
            res.add(k, curve[k], ("alpha",), {"alpha": a})
        if (a == 0.0).any() and (a == 1.0).any():
            lb, eb = barriers(a, curve["loss"]), barriers(a, curve["error"])
            res.add("loss_barrier", np.float64(lb["chord"]))  # primary: over the chord between the endpoints
            res.add("loss_endpoint_mean_barrier", np.float64(lb["endpoint_mean"]))  # secondary (Frankle et al.)
            res.add("error_barrier", np.float64(eb["chord"]))
            res.add("error_endpoint_mean_barrier", np.float64(eb["endpoint_mean"]))
            res.meta["barrier"] = BARRIER_DEFINITION
            if self.layerwise:
                table = layerwise_barriers(ctx.model, start, end, a, ctx.data, ctx.loss, bn=self.bn, bn_data=bn_data, chunk_size=auto_chunk_size(self.chunk_size, ctx.device))
                res.meta["groups"] = table["groups"]
                res.add_coord("group", np.arange(len(table["groups"])))
                res.add_coord("k", np.arange(1, len(table["groups"]) + 1))
                for kind, axis in (("single", "group"), ("first", "k"), ("last", "k")):
                    for key, arr in table[kind].items():
                        res.add(f"{kind}_{key}", arr, (axis, "alpha") if arr.ndim == 2 else (axis,))
        elif self.layerwise:
            raise ValueError("layerwise barriers need α = 0 and α = 1 in alphas, e.g. (0, 1, 31)")
        res.meta["elapsed_s"] = time.perf_counter() - t0
        return res


__all__ = ["Interpolate", "barriers", "interpolation_curve", "layer_groups", "layerwise_barriers"]
