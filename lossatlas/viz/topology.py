"""Figures of the landscape's topology and of curved mode connectivity.

- "topology": the 2-D loss surface as contours with every basin's minimum (marker size ∝ depth) and its saddle,
  the persistence diagram (birth = minimum, death = saddle value; the global basin drawn on the top edge) and
  the merge tree (Geniesse et al. 2024, "Visualizing, Analyzing and Constructing Loss Landscapes with Topology").
- "curve": loss and error along the trained curve φ(t) beside the straight line θ₀ + t(θ₁ − θ₀), with both
  barriers in the legend, and the bend's training loss (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity,
  and Fast Ensembling of DNNs").

Reads the Results of the ``topology`` and ``curve`` probes; every value is optional.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, pick_step, scalar
from lossatlas.viz.registry import paper_figure_of, plotly_figures_of
from lossatlas.viz.style import json_values, new_figure, note, paper_style, plotly_layout


# -- topology ----------------------------------------------------------------------------------------------------
def draw_basins(fig: Figure, ax, result: ResultLike) -> bool:
    """Loss contours with each basin's minimum (size ∝ depth) and saddle (x) marked."""
    z = array(result, "loss")
    if z is None or z.ndim != 2:
        note(ax, "no surface stored\n(lossatlas topology)")
        return False
    x, y = np.asarray(result.coords["x"], float), np.asarray(result.coords["y"], float)
    cs = ax.contourf(x, y, z, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="loss", pad=0.01, format="%.3g")
    depth = array(result, "basin_depth")
    if depth is not None:
        size = 8 + 60 * depth / max(float(np.nanmax(depth)), np.finfo(float).tiny)
        ax.scatter(array(result, "basin_min_x"), array(result, "basin_min_y"), s=size, color="C1", edgecolor="k",
                   lw=0.4, zorder=3, label="minima")
        ax.scatter(array(result, "basin_saddle_x"), array(result, "basin_saddle_y"), marker="x", s=14, color="C3",
                   zorder=3, label="saddles")
        ax.legend(fontsize=6)
    n = scalar(result, "num_basins")
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_title(f"{int(n) if n is not None else '?'} basins, step {result.step}")
    return True


def draw_persistence(ax, result: ResultLike) -> bool:
    """The 0-dimensional persistence diagram; the essential pair (death ∞) on the top edge."""
    b, d = array(result, "persistence_birth"), array(result, "persistence_death")
    if b is None or d is None:
        note(ax, "no persistence diagram stored")
        return False
    finite = np.isfinite(d)
    top = float(np.nanmax(np.concatenate([b, d[finite]]))) if finite.any() else float(np.nanmax(b)) + 1.0
    lo = float(np.nanmin(b))
    ax.plot([lo, top], [lo, top], color="0.5", lw=0.6)
    ax.scatter(b[finite], d[finite], s=10, color="C0", label="basins")
    ax.scatter(b[~finite], np.full((~finite).sum(), top), marker="^", s=14, color="C3", label="global (d = ∞)")
    ax.set_xlabel("birth (minimum)")
    ax.set_ylabel("death (saddle)")
    ax.set_title("persistence diagram (H₀)")
    ax.legend(fontsize=6)
    return True


def tree_layout(parent: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Horizontal positions of merge-tree nodes: leaves in depth-first order, each saddle over its children's mean."""
    parent = np.asarray(parent, dtype=np.int64)
    pos = np.full(len(parent), np.nan)
    counter = [0.0]

    def place(n: int) -> float:
        kids = sorted(np.flatnonzero(parent == n), key=lambda c: value[c])
        if not len(kids):
            pos[n], counter[0] = counter[0], counter[0] + 1
        else:
            pos[n] = float(np.mean([place(int(c)) for c in kids]))
        return pos[n]

    for root in np.flatnonzero(parent < 0):
        place(int(root))
    return pos


def draw_merge_tree(ax, result: ResultLike) -> bool:
    """The merge tree: leaves at the minima, joins at the saddle values (y: loss)."""
    value, parent = array(result, "tree_value"), array(result, "tree_parent")
    if value is None or parent is None:
        note(ax, "no merge tree stored")
        return False
    parent = parent.astype(np.int64)
    pos = tree_layout(parent, value)
    for n, p in enumerate(parent):
        if p >= 0:  # an elbow from the child up to its parent's level, then across
            ax.plot([pos[n], pos[n], pos[p]], [value[n], value[p], value[p]], color="0.3", lw=0.7)
    leaves = array(result, "tree_kind") == 0
    ax.scatter(pos[leaves], value[leaves], s=8, color="C1", zorder=3)
    ax.set_xticks([])
    ax.set_ylabel("loss")
    ax.set_title("merge tree")
    return True


@paper_figure_of("topology")
def topology_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "topology" kind: the surface with basins marked, the persistence diagram and the merge tree."""
    one = pick_step(as_list(results), step)
    with paper_style():
        fig, axes = new_figure(3, 1, height=6.3)
        draw_basins(fig, axes[0, 0], one)
        draw_persistence(axes[1, 0], one)
        draw_merge_tree(axes[2, 0], one)
    return fig


# -- curve -------------------------------------------------------------------------------------------------------
def draw_curve(ax, result: ResultLike, value: str = "loss") -> bool:
    """``value`` along the trained curve and along the line, with both chord barriers in the legend."""
    cv, line = array(result, value), array(result, f"line_{value}")
    if cv is None or line is None:
        note(ax, "no curve stored\n(lossatlas curve)")
        return False
    t = np.asarray(result.coords.get("t", np.linspace(0, 1, len(cv))), float)
    bc, bl = scalar(result, f"{value}_barrier"), scalar(result, f"line_{value}_barrier")
    kind = result.meta.get("curve") or result.config.get("curve", "curve")
    ax.plot(t, line, color="C0", ls="--", label="line" + (f", barrier {bl:.3g}" if bl is not None else ""))
    ax.plot(t, cv, color="C3", label=f"{kind}" + (f", barrier {bc:.3g}" if bc is not None else ""))
    ax.set_xlabel("t")
    ax.set_ylabel(value)
    ax.set_title(f"{value} from step {result.meta.get('from_step', result.step)} to {result.meta.get('to_step', '?')}")
    ax.legend(fontsize=6)
    return True


@paper_figure_of("curve")
def curve_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "curve" kind: loss and error along the trained curve beside the straight line."""
    one = pick_step(as_list(results), step)
    with paper_style():
        fig, axes = new_figure(2, 1, height=4.2)
        draw_curve(axes[0, 0], one, "loss")
        draw_curve(axes[1, 0], one, "error")
    return fig


# -- interactive -------------------------------------------------------------------------------------------------




@plotly_figures_of("topology")
def topology_figures(results: Sequence[ResultLike]) -> list:
    """The last step's surface with its basins, and its persistence diagram."""
    import plotly.graph_objects as go

    last = as_list(results)[-1]
    out: list = [None, None]
    z = array(last, "loss")
    if z is not None and z.ndim == 2:
        fig = go.Figure(go.Contour(z=np.where(np.isfinite(z), z, None).tolist(), x=json_values(last.coords["x"]),
                                   y=json_values(last.coords["y"]), colorscale="Viridis", name="loss"))
        if array(last, "basin_depth") is not None:
            fig.add_trace(go.Scatter(x=json_values(array(last, "basin_min_x")), y=json_values(array(last, "basin_min_y")),
                                     mode="markers", name="minima", text=[f"depth {d:.4g}" for d in array(last, "basin_depth")]))
            fig.add_trace(go.Scatter(x=json_values(array(last, "basin_saddle_x")), y=json_values(array(last, "basin_saddle_y")),
                                     mode="markers", marker=dict(symbol="x"), name="saddles"))
        out[0] = plotly_layout(fig, f"basins, step {last.step}", "α", "β")
    b, d = array(last, "persistence_birth"), array(last, "persistence_death")
    if b is not None and d is not None:
        finite = np.isfinite(d)
        top = float(np.max(d[finite])) if finite.any() else float(np.max(b)) + 1.0
        lo = float(np.min(b))
        fig = go.Figure([go.Scatter(x=[lo, top], y=[lo, top], mode="lines", name="diagonal", line=dict(color="gray")),
                         go.Scatter(x=json_values(b[finite]), y=json_values(d[finite]), mode="markers", name="basins"),
                         go.Scatter(x=json_values(b[~finite]), y=[top] * int((~finite).sum()), mode="markers",
                                    marker=dict(symbol="triangle-up"), name="global (d = ∞)")])
        out[1] = plotly_layout(fig, "persistence diagram (H₀)", "birth (minimum)", "death (saddle)")
    return out


@plotly_figures_of("curve")
def curve_figures(results: Sequence[ResultLike]) -> list:
    """The last step's loss and error along the curve and the line."""
    import plotly.graph_objects as go

    last = as_list(results)[-1]
    out: list = []
    for value in ("loss", "error"):
        cv, line = array(last, value), array(last, f"line_{value}")
        if cv is None or line is None:
            out.append(None)
            continue
        t = json_values(last.coords.get("t", np.linspace(0, 1, len(cv))))
        fig = go.Figure([go.Scatter(x=t, y=json_values(line), mode="lines", name="line", line=dict(dash="dash")),
                         go.Scatter(x=t, y=json_values(cv), mode="lines+markers", name=str(last.config.get("curve", "curve")))])
        out.append(plotly_layout(fig, f"{value} along the curve and the line, step {last.step}", "t", value))
    return out


__all__ = ["curve_figure", "curve_figures", "draw_basins", "draw_curve", "draw_merge_tree", "draw_persistence",
           "topology_figure", "topology_figures", "tree_layout"]
