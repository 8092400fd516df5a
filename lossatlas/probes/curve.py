"""Curved mode connectivity: a trained low-loss curve between two checkpoints, beside the straight line.

Garipov, Izmailov, Podoprikhin, Vetrov, Wilson 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs"; Draxler, Veschgini, Salmhofer, Hamprecht 2018, "Essentially No Barriers in Neural Network Energy
Landscape". Between θ₀ (this checkpoint) and θ₁ (``to_step``), a curve φ(t), t ∈ [0, 1], with one trainable
bend θ_b:

- quadratic Bézier (``curve="bezier"``): φ(t) = (1 − t)²θ₀ + 2t(1 − t)θ_b + t²θ₁;
- polygonal chain with one bend (``curve="polychain"``): φ(t) = θ₀ + 2t(θ_b − θ₀) for t ≤ ½,
  θ_b + (2t − 1)(θ₁ − θ_b) for t > ½.

Both are φ(t) = θ₀ + c_b(t)(θ_b − θ₀) + c₁(t)(θ₁ − θ₀) with (c_b, c₁) = (2t(1 − t), t²) (Bézier) or (2t, 0) |
(2 − 2t, 2t − 1) (chain), so the evaluation reuses the plane evaluator of ``lossatlas.probes.grid``. θ_b starts
at the midpoint ½(θ₀ + θ₁) (the curve is then the straight line) and is trained by Adam or SGD on the
stochastic objective E_{t∼U(0,1)} L(φ(t)): each step draws one t (a seeded generator) and takes the next
batch of the data set in order (Garipov et al.'s Algorithm). Only parameters bend; floating buffers move
linearly, θ₀ + t(θ₁ − θ₀) (their bend is held at the midpoint), and with ``bn="recompute"`` the BatchNorm
running statistics are recomputed at every evaluated point (the plain average over ``bn_batches`` batches,
as Garipov et al. do); BN models train the curve in train mode (batch statistics).

Reported at ``num_points`` values of t ∈ [0, 1] (default 31): loss, accuracy and error along the curve and along
the line θ₀ + t(θ₁ − θ₀), and for each path the chord barrier max_t [f(t) − ((1 − t)f(0) + t f(1))] (Entezari
et al. 2022) and the endpoint-mean barrier max_t f(t) − ½(f(0) + f(1)) (Frankle et al. 2020), exactly as the
``interpolate`` probe defines them.

Caveat: for minima related by a sign flip, θ₁ = −θ₀ (e.g. (w₁, w₂) and (−w₁, −w₂) of a deep linear net), the
midpoint bend is θ_b = 0 and the objective's gradient there vanishes by the t ↔ 1 − t symmetry in every
direction that leaves the line's plane, so the bend stays in that plane and the barrier barely falls; minima
related by a permutation of hidden units train to a near-zero barrier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas import losses as L
from lossatlas.outputs import model_outputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.connectivity import BARRIER_DEFINITION, barriers
from lossatlas.probes.directions import model_state
from lossatlas.probes.grid import BN_MODES, PointEvaluator, _bn_stat_names, auto_chunk_size, evaluate_grid, grid_axis
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.settings import check_choice, check_finite_number, check_nonneg_int

CURVES: tuple[str, ...] = ("bezier", "polychain")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


def curve_weights(curve: str, t: float | np.ndarray) -> np.ndarray:
    """The weights (w₀, w_b, w₁) of φ(t) = w₀θ₀ + w_bθ_b + w₁θ₁; rows for an array of t, summing to 1.

    Bézier: ((1 − t)², 2t(1 − t), t²); chain: (1 − 2t, 2t, 0) for t ≤ ½, (0, 2 − 2t, 2t − 1) for t > ½.
    """
    check_choice("curve", curve, CURVES)
    t = np.asarray(t, dtype=np.float64)
    if curve == "bezier":
        return np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], axis=-1)
    first = t <= 0.5
    return np.stack([np.where(first, 1 - 2 * t, 0.0), np.where(first, 2 * t, 2 - 2 * t),
                     np.where(first, 0.0, 2 * t - 1)], axis=-1)


def _has_bn(model: nn.Module) -> bool:
    return bool(_bn_stat_names(model))


def fit_curve(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    *,
    curve: str = "bezier",
    steps: int = 200,
    lr: float = 0.01,
    optimizer: str = "adam",
    momentum: float = 0.9,
    seed: int = 0,
) -> tuple[dict[str, Tensor], np.ndarray]:
    """Train the bend θ_b of the curve from ``start`` to ``end`` on E_{t∼U(0,1)} L(φ(t)) (Garipov et al. 2018).

    θ_b starts at ½(θ₀ + θ₁) over the model's parameters in ``start``; each of ``steps`` steps draws
    t ∼ U(0, 1) from a generator seeded with ``seed``, takes batch ``k mod len(data)`` and steps Adam
    (``lr``) or SGD (``lr``, ``momentum``) on the batch's mean loss at φ(t). Buffers in ``start``/``end``
    sit at θ₀ + t(θ₁ − θ₀); BN models run in train mode (batch statistics, on copies of the buffers),
    others in eval mode; dropout draws from a torch RNG seeded with ``seed``. Returns (θ_b by name,
    the per-step training losses).
    """
    params = {k for k, _ in model.named_parameters()}
    names = [k for k in start if k in params and start[k].is_floating_point()]
    if not names:
        raise ValueError("the checkpoints hold no floating parameters to bend")
    bend = {k: (0.5 * (start[k] + end[k])).detach().clone().requires_grad_(True) for k in names}
    moving_buffers = [k for k in start if k not in params and start[k].is_floating_point()]
    fixed = {k: v.detach() for k, v in start.items() if k not in bend and k not in moving_buffers}
    opt = (torch.optim.Adam(list(bend.values()), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(list(bend.values()), lr=lr, momentum=momentum))
    gen = torch.Generator().manual_seed(int(seed))
    history = np.zeros(int(steps))
    mode = "train" if _has_bn(model) else "eval"  # BN: batch statistics along the curve, as Garipov et al. train
    with torch.random.fork_rng(devices=[]), evaluation_mode(model, mode):
        torch.manual_seed(int(seed))  # dropout masks (train mode) repeat under the seed
        for k in range(int(steps)):
            t = float(torch.rand((), generator=gen, dtype=torch.float64))
            w0, wb, w1 = (float(v) for v in curve_weights(curve, t))
            point = {n: w0 * start[n].detach() + wb * bend[n] + w1 * end[n].detach() for n in names}
            bufs = {n: (1 - t) * start[n] + t * end[n] for n in moving_buffers}  # fresh tensors: BN may update them
            x, y = data[k % len(data)]
            out = model_outputs(model, x, params=({**fixed, **bufs, **point},))
            lb = L.batch_loss(loss, out, y)
            opt.zero_grad(set_to_none=True)
            lb.backward()
            opt.step()
            history[k] = float(lb.detach())
    return {k: v.detach() for k, v in bend.items()}, history


def curve_directions(start: Mapping[str, Tensor], end: Mapping[str, Tensor],
                     bend: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """(θ_b − θ₀, θ₁ − θ₀) over the floating tensors: φ(t) = θ₀ + c_b(θ_b − θ₀) + c₁(θ₁ − θ₀).

    A tensor without a bend (a buffer) bends at the midpoint, (θ₁ − θ₀)/2, so it moves on the straight line.
    """
    floating = [k for k in start if start[k].is_floating_point()]
    to_end = {k: (end[k] - start[k]).detach() for k in floating}
    to_bend = {k: (bend[k] - start[k]).detach() if k in bend else 0.5 * to_end[k] for k in floating}
    return [to_bend, to_end]


@register_probe
@dataclass(frozen=True, kw_only=True)
class Curve(Probe):
    """A trained low-loss curve (Bézier or polygonal chain) between this checkpoint and ``to_step``, and its barriers.

    Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs": the bend θ_b of
    φ(t) = (1 − t)²θ₀ + 2t(1 − t)θ_b + t²θ₁ is trained on E_t L(φ(t)); loss and error along the curve beside the
    straight line's, with the chord and endpoint-mean barriers of both (as ``interpolate`` defines them).

    Attributes:
        to_step: the step of the other checkpoint θ₁.
        curve: "bezier" (quadratic Bézier, default) or "polychain" (one bend).
        num_points: the number of evaluated t values in [0, 1], endpoints included (default 31).
        curve_steps: training steps of the bend (default 200); 0 keeps it at the midpoint (the straight line).
        optimizer: "adam" (default) or "sgd" (with ``momentum``).
        curve_lr: the learning rate of the bend's optimizer (default 0.01).
        momentum: SGD's momentum (default 0.9).
        seed: seeds the t draws (and dropout) of the training (default 0).
        bn: "recompute" (default: fresh BatchNorm statistics at every evaluated point) or "keep".
        bn_batches: the batches that recompute BN statistics (default all).
        chunk_size: points per vectorized forward (None: 1 on CPU, 16 on an accelerator).
    """

    name: ClassVar[str] = "curve"
    summary: ClassVar[str] = "a trained Bézier/polychain curve between two checkpoints; its barrier beside the line's"
    section: ClassVar[str] = "landscape"
    title: ClassVar[str] = "Curved mode connectivity"
    figure: ClassVar[str | None] = "curve"
    usage: ClassVar[str] = "--step 0 --to-step LAST"
    to_step: int | None = None
    curve: str = "bezier"
    num_points: int = 31
    curve_steps: int = 200
    optimizer: str = "adam"
    curve_lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    bn: str = "recompute"
    bn_batches: int | None = None
    chunk_size: int | None = None

    def validate(self) -> None:
        """ValueError without ``to_step`` or for a setting out of range."""
        if self.to_step is None:
            raise ValueError("curve needs to_step: the step of the other checkpoint")
        check_nonneg_int("to_step", self.to_step)
        check_choice("curve", self.curve, CURVES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("bn", self.bn, BN_MODES)
        if isinstance(self.num_points, bool) or not isinstance(self.num_points, int) or self.num_points < 2:
            raise ValueError(f"num_points must be an integer >= 2 (t = 0 and 1 at least), got {self.num_points!r}")
        check_nonneg_int("curve_steps", self.curve_steps)
        check_finite_number("curve_lr", self.curve_lr, minimum=0.0, strict=True)
        check_finite_number("momentum", self.momentum, minimum=0.0)
        check_nonneg_int("seed", self.seed)
        if self.bn_batches is not None and self.bn_batches < 1:
            raise ValueError(f"bn_batches must be >= 1 or None (all data), got {self.bn_batches}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None (automatic), got {self.chunk_size}")

    def run(self, ctx: ProbeContext) -> Result:
        """Train the bend, then loss/accuracy/error along the curve and the line at t ∈ linspace(0, 1, num_points).

        Values: ``loss``/``accuracy``/``error`` (the curve) and ``line_loss``/``line_accuracy``/``line_error``
        over ("t",); ``loss_barrier``/``error_barrier`` (chord form) and ``*_endpoint_mean_barrier`` of the curve,
        the same prefixed ``line_`` for the line; ``train_loss`` over ("curve_step",); ``bend_offset``
        = ‖θ_b − ½(θ₀ + θ₁)‖ / ‖θ₁ − θ₀‖ over the parameters. ValueError outside a run file.
        """
        t0 = time.perf_counter()
        if ctx.state_at is None:
            raise ValueError("curve needs the other checkpoint (ctx.state_at); run it on a run file")
        start = model_state(ctx.model, "states")
        end = {k: v.to(start[k].device) for k, v in ctx.state_at(int(self.to_step)).items() if k in start}
        missing = [k for k in start if k not in end]
        if missing:
            raise ValueError(f"the checkpoint at step {self.to_step} lacks {missing[:3]}; both need the same model")
        bend, history = fit_curve(ctx.model, start, end, ctx.data, ctx.loss, curve=self.curve, steps=self.curve_steps,
                                  lr=self.curve_lr, optimizer=self.optimizer, momentum=self.momentum, seed=self.seed)
        t = grid_axis((0.0, 1.0, self.num_points), "num_points")
        bn = self.bn if _has_bn(ctx.model) else "keep"  # nothing to recompute without BatchNorm
        bn_data = list(ctx.data)[: self.bn_batches] if self.bn_batches else None
        ev = PointEvaluator(ctx.model, start, curve_directions(start, end, bend), ctx.data, ctx.loss,
                            bn=bn, bn_data=bn_data)
        on_curve = curve_weights(self.curve, t)[:, 1:]  # (c_b, c₁) = (w_b, w₁)
        on_line = np.stack([np.zeros_like(t), t], axis=1)  # θ₀ + t(θ₁ − θ₀)
        out, _ = evaluate_grid(ev, np.concatenate([on_curve, on_line]), chunk_size=auto_chunk_size(self.chunk_size, ctx.device))
        n = len(t)
        res = self.new_result(ctx.step, {"status": "complete", "from_step": ctx.step, "to_step": int(self.to_step),
                                         "loss": ctx.loss, "bn": bn, "curve": self.curve, "barrier": BARRIER_DEFINITION})
        for prefix, part in (("", slice(0, n)), ("line_", slice(n, 2 * n))):
            values = {"loss": out["loss"][part], "accuracy": out["accuracy"][part]}
            values["error"] = 1.0 - values["accuracy"]
            for k, v in values.items():
                res.add(prefix + k, v, ("t",), {"t": t})
            lb, eb = barriers(t, values["loss"]), barriers(t, values["error"])
            res.add(prefix + "loss_barrier", np.float64(lb["chord"]))
            res.add(prefix + "loss_endpoint_mean_barrier", np.float64(lb["endpoint_mean"]))
            res.add(prefix + "error_barrier", np.float64(eb["chord"]))
            res.add(prefix + "error_endpoint_mean_barrier", np.float64(eb["endpoint_mean"]))
        res.add("train_loss", history, ("curve_step",), {"curve_step": np.arange(1, len(history) + 1)})
        num = sum(float(((bend[k] - 0.5 * (start[k] + end[k])).double() ** 2).sum()) for k in bend)
        den = sum(float(((end[k] - start[k]).double() ** 2).sum()) for k in bend)
        res.add("bend_offset", np.float64(np.sqrt(num / den) if den > 0 else np.nan))
        res.meta["elapsed_s"] = time.perf_counter() - t0
        return res


__all__ = ["CURVES", "Curve", "curve_directions", "curve_weights", "fit_curve"]
