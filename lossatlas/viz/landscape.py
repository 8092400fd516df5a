"""Landscape figures: 1-D/2-D slices, linear interpolation, the training trajectory, slices compared.

Filter-normalised 1-D/2-D slices (Li et al. 2018), linear interpolation with its barrier (Goodfellow et al. 2015;
Frankle et al. 2020), the training trajectory on its PCA plane (Li et al. 2018), and several runs' slices on one
shared colour scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from lossatlas._moved import renamed
from lossatlas.viz._results import ResultLike, array, as_list, coord, pick_step, scalar
from lossatlas.viz.registry import paper_figure_of
from lossatlas.viz.style import (
    ONE_COLUMN_IN,
    TWO_COLUMN_IN,
    log_if_decades,
    new_figure,
    note,
    paper_style,
    spans_decades,
)

METRICS = ("loss", "accuracy")


def surface_grid(result: ResultLike, metric: str = "loss") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(x, y or None, values) of a surface Result: values (len(y), len(x)) for 2-D, (len(x),) for 1-D."""
    if metric not in METRICS and metric not in result.values:
        raise ValueError(f"unknown surface metric {metric!r}; stored: {', '.join(k for k in result.values if not k.startswith('direction'))}")
    z = np.asarray(result.values[metric], dtype=np.float64)
    if z.ndim == 1:
        return coord(result, metric, 0), None, z
    return coord(result, metric, 1), coord(result, metric, 0), z


def color_norm(values: Sequence[np.ndarray]) -> Normalize:
    """One colour normalisation for all ``values``: log when they are positive and span ≥ 2 decades."""
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in values])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Normalize(0, 1)
    if spans_decades(v):
        return LogNorm(vmin=v.min(), vmax=v.max())
    return Normalize(vmin=v.min(), vmax=v.max() if v.max() > v.min() else v.min() + 1)


def _levels(norm: Normalize, n: int = 20) -> np.ndarray:
    if isinstance(norm, LogNorm):
        return np.geomspace(norm.vmin, norm.vmax, n)
    return np.linspace(norm.vmin, norm.vmax, n)


def draw_surface(fig: Figure, ax, result: ResultLike, metric: str = "loss", *, norm: Normalize | None = None,
                 colorbar: bool = True):
    """A 2-D slice as filled contours, the checkpoint at (0, 0); a 1-D slice as a line.

    Levels are log-spaced when the loss spans decades. Returns the contour set (None for 1-D).
    """
    x, y, z = surface_grid(result, metric)
    unit = "accuracy (%)" if metric == "accuracy" else metric
    zz = 100 * z if metric == "accuracy" else z
    if y is None:
        ax.plot(x, zz, color="C0")
        ax.axvline(0.0, color="0.5", lw=0.6, ls=":")
        if metric != "accuracy":
            log_if_decades(ax, zz, decades=1.0)
        ax.set_xlabel("α (direction 1, filter-normalised)")
        ax.set_ylabel(unit)
        ax.set_title(f"{metric} along a 1-D slice, step {result.step}")
        return None
    norm = norm or color_norm([zz])
    cs = ax.contourf(x, y, np.ma.masked_invalid(zz), levels=_levels(norm), norm=norm, extend="both")
    ax.contour(x, y, np.ma.masked_invalid(zz), levels=_levels(norm, 10), norm=norm, colors="white", linewidths=0.3)
    ax.plot([0], [0], marker="*", color="C3", ms=6, ls="none", label="checkpoint")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(f"{metric} surface, step {result.step}")
    if colorbar:
        fig.colorbar(cs, ax=ax, label=unit, pad=0.01, format="%.3g")
    return cs


def draw_convexity(fig: Figure, ax, result: ResultLike) -> bool:
    """The convexity map |λ_min/λ_max| of the Hessian over the slice (Li et al. 2018, section 6) as a heat map.

    Near 0 (dark) where the loss is locally convex, large (bright) where it has strong negative curvature; a
    1-D slice's map is a line. Draws nothing and returns False when the result has no map (surface --convexity).
    """
    ratio = array(result, "convexity_ratio")
    if ratio is None:
        note(ax, "no convexity map stored (surface --convexity)")
        return False
    ratio = np.asarray(ratio, dtype=np.float64)
    mean = float(np.nanmean(ratio[np.isfinite(ratio)])) if np.isfinite(ratio).any() else float("nan")
    if ratio.ndim == 1:
        ax.plot(coord(result, "convexity_ratio", 0), ratio, color="C3", marker=".")
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("|λmin/λmax|")
    else:
        cx, cy = coord(result, "convexity_ratio", 1), coord(result, "convexity_ratio", 0)
        finite = ratio[np.isfinite(ratio)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        im = ax.pcolormesh(cx, cy, np.ma.masked_invalid(ratio), cmap="magma", vmin=0.0, vmax=top, shading="nearest")
        ax.plot([0], [0], marker="*", color="C0", ms=6, ls="none")
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal", adjustable="box")
        fig.colorbar(im, ax=ax, label="|λmin/λmax|", pad=0.01, format="%.2g")
    ax.set_title(f"convexity map, mean |λmin/λmax| {mean:.3g}")
    return True


@paper_figure_of("surface")
def surface_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None, metric: str = "loss") -> Figure:
    """The "surface" kind: the slice of one checkpoint (the last unless ``step``) as contours (2-D) or a line (1-D).

    With a convexity map stored (``surface --convexity``) its heat map of |λ_min/λ_max| stands beside the contours.
    """
    one = pick_step(as_list(results), step)
    with paper_style():
        if array(one, "convexity_ratio") is None:
            fig, axes = new_figure(height=2.6)
            draw_surface(fig, axes[0, 0], one, metric)
        else:
            fig, axes = new_figure(1, 2, width=TWO_COLUMN_IN, height=2.6)
            draw_surface(fig, axes[0, 0], one, metric)
            draw_convexity(fig, axes[0, 1], one)
    return fig


def draw_interpolation(ax, result: ResultLike) -> bool:
    """Loss along θ(α) = (1−α)θ_a + αθ_b, the linear barrier marked at its α; error on the right axis."""
    loss = array(result, "loss")
    if loss is None:
        note(ax, "no interpolation curve stored")
        return False
    a = coord(result, "loss")
    ax.plot(a, loss, color="C0", marker=".", label="loss")
    ax.set_xlabel("α (0: step %s, 1: step %s)" % (result.meta.get("from_step", result.step), result.meta.get("to_step", "?")))
    ax.set_ylabel("loss", color="C0")
    i0, i1 = np.flatnonzero(a == 0.0), np.flatnonzero(a == 1.0)
    barrier = scalar(result, "loss_barrier")
    if len(i0) and len(i1):
        v0, v1 = loss[i0[0]], loss[i1[0]]
        ax.plot([0, 1], [v0, v1], color="0.5", ls=":", lw=0.8, label="chord between the endpoints")
        inside = (a >= 0) & (a <= 1)
        gap = np.where(inside, loss - ((1 - a) * v0 + a * v1), -np.inf)
        j = int(np.argmax(gap))
        b = barrier if barrier is not None else float(gap[j])
        base = (1 - a[j]) * v0 + a[j] * v1
        ax.annotate("", xy=(a[j], loss[j]), xytext=(a[j], base),
                    arrowprops=dict(arrowstyle="<->", color="C3", lw=0.8))
        ax.text(a[j], (loss[j] + base) / 2, f"  barrier over the chord {b:.3g}", color="C3", va="center",
                fontsize=6)
    err = array(result, "error")
    if err is not None:
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        ax2.plot(a, 100 * err, color="C1", ls="--", label="error")
        ax2.set_ylabel("error (%)", color="C1")
    ax.set_title("linear interpolation")
    return True


@paper_figure_of("interpolate")
def interpolate_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "interpolate" kind: the loss/error path between two checkpoints with the barrier marked."""
    one = pick_step(as_list(results), step)
    with paper_style():
        fig, axes = new_figure()
        draw_interpolation(axes[0, 0], one)
    return fig


def draw_trajectory(fig: Figure, ax, result: ResultLike) -> bool:
    """Checkpoints projected on the top-2 PCA plane (around the final one), over the loss contours when stored."""
    px, py = array(result, "proj_x"), array(result, "proj_y")
    if px is None or py is None:
        note(ax, "no trajectory stored")
        return False
    surf = array(result, "surface_loss")
    if surf is not None:
        x, y = coord(result, "surface_loss", 1), coord(result, "surface_loss", 0)
        norm = color_norm([surf])
        cs = ax.contourf(x, y, surf, levels=_levels(norm), norm=norm, extend="both")
        fig.colorbar(cs, ax=ax, label="loss", pad=0.01, format="%.3g")
    steps = coord(result, "proj_x")
    ax.plot(px, py, color="C3" if surf is not None else "0.4", lw=0.8)
    sc = ax.scatter(px, py, c=steps, cmap="plasma", s=10, zorder=3)
    if surf is None:
        fig.colorbar(sc, ax=ax, label="step", pad=0.01)
    evr = array(result, "explained_variance_ratio")
    lab = [f"PC{i + 1}" + (f" ({100 * evr[i]:.1f}% var.)" if evr is not None and evr.size > i else "") for i in range(2)]
    ax.set_xlabel(lab[0])
    ax.set_ylabel(lab[1])
    ax.set_title(f"trajectory on its PCA plane (final step {result.step})")
    return True


@paper_figure_of("trajectory")
def trajectory_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "trajectory" kind: the PCA-plane projection of the run's checkpoints."""
    one = pick_step(as_list(results), step)
    with paper_style():
        fig, axes = new_figure(height=2.6)
        draw_trajectory(fig, axes[0, 0], one)
    return fig


def compare_surfaces_figure(results: Sequence[ResultLike], labels: Sequence[str] | None = None, *,
                            metric: str = "loss") -> Figure:
    """Several runs' (or checkpoints') 2-D slices side by side on ONE shared colour scale and one colour bar."""
    results = list(results)
    if not results:
        raise ValueError("no surfaces to compare; pass at least one surface Result")
    labels = list(labels) if labels is not None else [f"step {r.step}" for r in results]
    if len(labels) != len(results):
        raise ValueError(f"got {len(labels)} labels for {len(results)} surfaces; give one label per surface")
    grids = [surface_grid(r, metric) for r in results]
    if any(g[1] is None for g in grids):
        raise ValueError("compare_surfaces_figure needs 2-D surfaces (surface --dims 2)")
    norm = color_norm([g[2] for g in grids])
    n = len(results)
    with paper_style():
        fig, axes = new_figure(1, n, width=min(TWO_COLUMN_IN, ONE_COLUMN_IN * max(1, n) * 0.6 + 0.6), height=2.0)
        cs = None
        for ax, r, lab in zip(axes[0], results, labels):
            cs = draw_surface(fig, ax, r, metric, norm=norm, colorbar=False)
            ax.set_title(lab)
        fig.colorbar(cs, ax=list(axes[0]), label=metric, pad=0.01, format="%.3g")
    return fig


def __getattr__(name: str):
    return renamed(__name__, name)  # a figure function's old name, with a DeprecationWarning
