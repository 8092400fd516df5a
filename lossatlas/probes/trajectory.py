"""The ``trajectory`` probe: a run's checkpoints on their PCA plane around the final one (Li et al. 2018, §7).

The plane is ``trajectory_pca`` of ``lossatlas.probes.directions``: d_e = vec(θ_e − θ_T) for every checkpoint e
(θ_T the final one; biases and norm parameters zeroed with ``ignore="biasbn"``), pc1, pc2 the top principal
axes of the centred rows. Projection (``proj_method='cos'``): x_e = ⟨d_e, pc1⟩, y_e = ⟨d_e, pc2⟩ on the
*uncentred* rows, so θ_T → (0, 0). Each checkpoint's distance to the plane ‖d_e − x_e pc1 − y_e pc2‖
says how much of it the 2-D picture loses, and its true loss next to the loss at its projection
θ_T + x_e pc1 + y_e pc2 (with θ_T's BN statistics, evaluated by ``lossatlas.probes.grid``) shows the
mismatch of a trajectory drawn over a surface. With ``grid`` > 0, also the loss on a grid×grid surface over
the trajectory's bounding box, widened by ``margin`` × its extent on each side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import numpy as np
from torch import Tensor

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.directions import DIR_TYPES, IGNORES, model_state, trajectory_pca
from lossatlas.probes.grid import (
    MetricSettings,
    PointEvaluator,
    auto_chunk_size,
    evaluate_grid,
    grid_points,
)
from lossatlas.probes.paramdicts import flatten
from lossatlas.probes.settings import check_choice, check_finite_number, check_nonneg_int


@register_probe
@dataclass(frozen=True, kw_only=True)
class Trajectory(MetricSettings, Probe):
    """The run's checkpoints on their PCA plane around the final one (Li et al. 2018).

    Settings: ``final_step`` (default the last of ``ctx.steps``), ``ignore`` ("biasbn" zeroes biases and
    norm parameters in the rows), ``dir_type`` ("weights" or "states"), ``grid`` (> 0: also a grid×grid loss
    surface over the trajectory's box widened by ``margin``). Values per checkpoint (dim "checkpoint"):
    "proj_x", "proj_y", "distance_to_plane", "loss"/"accuracy" (true, own BN statistics) and
    "loss_at_projection"/"accuracy_at_projection" (θ_T + x pc1 + y pc2, θ_T's BN statistics).

    Attributes:
        metrics: registered metrics by name (lossatlas.probes.grid.METRICS), as "<name>" and
            "<name>_at_projection" per checkpoint (and "surface_<name>" with grid > 0).
        metric_fns: Python only: {name: fn(outputs, targets) -> float}, batch means averaged like the loss.
    """

    name: ClassVar[str] = "trajectory"
    summary: ClassVar[str] = "PCA plane of the training trajectory, projections and their loss mismatch"
    section: ClassVar[str] = "landscape"
    figure: ClassVar[str | None] = "trajectory"
    usage: ClassVar[str] = ""
    final_step: int | None = None
    ignore: str = "biasbn"
    dir_type: str = "weights"
    grid: int = 0
    margin: float = 0.1
    chunk_size: int | None = None  # None: 1 on CPU, 16 on an accelerator
    metrics: tuple[str, ...] = ()  # registered metric names (lossatlas.probes.grid.METRICS)
    metric_fns: Mapping[str, Callable[[Tensor, Tensor], float]] | None = field(
        default=None, compare=False, hash=False, metadata={"python_only": True})  # callables: no CLI flag

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses an unknown ``ignore``/``dir_type``, a ``grid`` of 1 or below 0, a negative or non-finite ``margin``,
        a negative ``final_step``, and a ``chunk_size`` < 1.
        """
        check_choice("ignore", self.ignore, IGNORES)
        check_choice("dir_type", self.dir_type, DIR_TYPES)
        clash = sorted(set(self._metrics()) & {"loss", "accuracy"})
        if clash or not all(callable(f) for f in self._metrics().values()):
            raise ValueError(f"metrics must be callables fn(outputs, targets) -> float named other than loss and "
                             f"accuracy; got {clash or sorted(self._metrics())}")
        if self.grid < 0 or self.grid == 1:
            raise ValueError(f"grid must be 0 (no surface) or >= 2 points per axis, got {self.grid}")
        check_finite_number("margin", self.margin, minimum=0.0)
        check_nonneg_int("final_step", self.final_step, optional=True)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None (automatic), got {self.chunk_size}")

    def run(self, ctx: ProbeContext) -> Result:
        """Every checkpoint up to ``final_step`` projected on the PCA plane of d_e = θ_e − θ_T, and its loss there.

        Per checkpoint: ``proj_x`` = ⟨d_e, pc1⟩, ``proj_y`` = ⟨d_e, pc2⟩, ``distance_to_plane``
        ‖d_e − x_e pc1 − y_e pc2‖, the true ``loss``/``accuracy`` and ``loss_at_projection``/
        ``accuracy_at_projection`` at θ_T + x_e pc1 + y_e pc2; per component the explained variance (ratio) and
        singular values; the flat ``direction_x``/``direction_y``; with ``grid`` > 0 ``surface_loss``/
        ``surface_accuracy``. ValueError outside a run file or when ``final_step`` precedes every checkpoint.
        """
        t0 = time.perf_counter()
        if ctx.state_at is None or not ctx.steps:
            raise ValueError("trajectory needs the run's checkpoints (ctx.steps, ctx.state_at); run it on a run file")
        final_step = int(self.final_step) if self.final_step is not None else int(max(ctx.steps))
        steps = sorted(int(s) for s in ctx.steps if s <= final_step)
        if not steps:
            raise ValueError(f"final_step {final_step} comes before the run's first checkpoint ({min(ctx.steps)}); "
                             "pick a checkpoint step of the run")
        known = model_state(ctx.model, "states")
        states = [{k: v for k, v in ctx.state_at(s).items() if k in known} for s in steps]
        final = states[-1] if steps[-1] == final_step else {k: v for k, v in ctx.state_at(final_step).items() if k in known}
        names = [k for k in model_state(ctx.model, self.dir_type) if final[k].is_floating_point()]
        pca = trajectory_pca(states, final, ignore=self.ignore, names=names, kinds_model=ctx.model)
        metrics = self._metrics()
        true = [PointEvaluator(ctx.model, s, [], ctx.data, ctx.loss, metrics=metrics).evaluate(np.zeros((1, 0)))
                for s in states]
        ev = PointEvaluator(ctx.model, final, list(pca.directions), ctx.data, ctx.loss, metrics=metrics)
        proj, _ = evaluate_grid(ev, pca.coords, chunk_size=auto_chunk_size(self.chunk_size, ctx.device))
        checkpoint = {"checkpoint": np.array(steps)}
        component = {"component": np.arange(2)}
        res = self.new_result(final_step)
        res.add("proj_x", pca.coords[:, 0], ("checkpoint",), checkpoint)
        res.add("proj_y", pca.coords[:, 1], ("checkpoint",), checkpoint)
        res.add("distance_to_plane", pca.distance, ("checkpoint",), checkpoint)
        res.add("loss", np.array([t["loss"][0] for t in true]), ("checkpoint",), checkpoint)
        res.add("accuracy", np.array([t["accuracy"][0] for t in true]), ("checkpoint",), checkpoint)
        res.add("loss_at_projection", proj["loss"], ("checkpoint",), checkpoint)
        res.add("accuracy_at_projection", proj["accuracy"], ("checkpoint",), checkpoint)
        for name in metrics:  # each metric at the true checkpoint and at its projection
            res.add(name, np.array([t[name][0] for t in true]), ("checkpoint",), checkpoint)
            res.add(f"{name}_at_projection", proj[name], ("checkpoint",), checkpoint)
        for name in ("explained_variance_ratio", "explained_variance", "singular_values"):
            res.add(name, getattr(pca, name), ("component",), component)
        res.add("direction_x", flatten(pca.directions[0], names).numpy(), ("param",))
        res.add("direction_y", flatten(pca.directions[1], names).numpy(), ("param",))
        if self.grid:
            x, y = self._grid_axes(pca.coords)
            out, _ = evaluate_grid(ev, grid_points(x, y), chunk_size=auto_chunk_size(self.chunk_size, ctx.device))
            res.add("surface_loss", out["loss"].reshape(len(y), len(x)), ("y", "x"), {"x": x, "y": y})
            res.add("surface_accuracy", out["accuracy"].reshape(len(y), len(x)), ("y", "x"), {"x": x, "y": y})
            for name in metrics:
                res.add(f"surface_{name}", out[name].reshape(len(y), len(x)), ("y", "x"), {"x": x, "y": y})
        res.meta.update({
            "status": "complete",
            "final_step": final_step,
            "indexing": "xy",
            "proj_method": "cos",
            "param_names": names,
            "param_shapes": [list(final[k].shape) for k in names],
            "rules_x": dict(pca.directions[0].rules),
            "rules_y": dict(pca.directions[1].rules),
            "projection_bn": "the final checkpoint's buffers",
            "elapsed_s": time.perf_counter() - t0,
        })
        return res

    def _grid_axes(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        axes = []
        for k in range(2):
            lo, hi = float(c[:, k].min()), float(c[:, k].max())
            pad = self.margin * max(hi - lo, 1e-12)
            axes.append(np.linspace(lo - pad, hi + pad, self.grid))
        return axes[0], axes[1]
