"""Figures of massive activations and attention sinks ("massive_activations").

- per layer, the largest |h| of the residual stream (top 1, 2, 3, …) and the median |h|, on a log axis, as in
  Sun, Chen, Kolter, Liu 2024, "Massive Activations in Large Language Models" (their Fig. 1/3);
- the layer × head heatmap of the mean attention on the first token (attention sinks, Xiao, Tian, Chen, Han,
  Lewis 2024, "Efficient Streaming Language Models with Attention Sinks"), on [0, 1];
- across several checkpoints: max|h|/median|h| of every layer vs step, with the ratio criterion.

Reads the Results of the ``massive_activations`` probe; every value is optional.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, pick_step, steps_of
from lossatlas.viz.registry import paper_figure_of, plotly_figures_of
from lossatlas.viz.style import json_values, new_figure, note, paper_style, plotly_layout


def draw_layer_magnitudes(ax, result: ResultLike) -> bool:
    """Top-k |h| and the median |h| per layer (log y), with the criterion's floor."""
    top, median = array(result, "top_abs"), array(result, "layer_median_abs")
    if top is None or median is None:
        note(ax, "no massive activations stored\n(lossatlas massive_activations)")
        return False
    layers = np.arange(top.shape[0])
    for r in range(top.shape[1]):
        ax.plot(layers, top[:, r], marker="o", ms=3, color=f"C{r % 10}", label=f"top {r + 1}")
    ax.plot(layers, median, marker="s", ms=3, color="0.4", ls="--", label="median")
    floor = result.config.get("min_value")
    if floor is not None and np.isfinite(float(floor)) and float(floor) > 0:
        ax.axhline(float(floor), color="0.6", lw=0.8, ls=":", label=f"|h| = {float(floor):g}")
    if (top[np.isfinite(top)] > 0).all() and (median > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|h| (residual stream)")
    ratio = array(result, "layer_max_ratio")
    shown = f" (max|h|/median {float(np.nanmax(ratio)):.3g})" if ratio is not None and np.isfinite(ratio).any() else ""
    ax.set_title(f"largest |h| per layer, step {result.step}{shown}")
    ax.legend(fontsize=5)
    return True


def draw_sinks(ax, result: ResultLike) -> bool:
    """The (layer, head) heatmap of the mean attention on the first token, with sink heads marked."""
    mass = array(result, "sink_mass")
    if mass is None or mass.ndim != 2:
        note(ax, "no attention-sink mass stored")
        return False
    im = ax.imshow(mass, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
    threshold = result.config.get("sink_threshold")
    if threshold is not None:
        rows, cols = np.nonzero(mass > float(threshold))
        ax.scatter(cols, rows, marker="x", s=12, color="white", label=f"> {float(threshold):g}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("attention on the first token")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return True


def draw_ratio_timeline(ax, results: Sequence[ResultLike]) -> bool:
    """max|h|/median|h| of every layer vs step (log y), with the ratio criterion."""
    results = as_list(results)
    last = array(results[-1], "layer_max_ratio")
    if last is None:
        note(ax, "no massive activations stored")
        return False
    steps = steps_of(results)
    for li in range(last.shape[0]):
        v = [array(r, "layer_max_ratio")[li] if array(r, "layer_max_ratio") is not None
             and array(r, "layer_max_ratio").shape == last.shape else np.nan for r in results]
        ax.plot(steps, v, marker="o", ms=3, color=f"C{li % 10}", label=f"layer {li}" if li < 10 else None)
    ratio = results[-1].config.get("ratio")
    if ratio is not None and float(ratio) > 0:
        ax.axhline(float(ratio), color="0.5", ls="--", lw=0.8, label=f"ratio {float(ratio):g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max|h| / median|h|")
    ax.legend(fontsize=5)
    return True


@paper_figure_of("massive_activations")
def massive_activations_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """One step's per-layer magnitudes and sink heatmap; the ratio vs step too when several steps are stored."""
    results = as_list(results)
    one = pick_step(results, step)
    timeline = step is None and len(results) > 1
    with paper_style():
        fig, axes = new_figure(3 if timeline else 2, 1, height=6.3 if timeline else 4.4)
        draw_layer_magnitudes(axes[0, 0], one)
        draw_sinks(axes[1, 0], one)
        if timeline:
            draw_ratio_timeline(axes[2, 0], results)
    return fig


# -- interactive -------------------------------------------------------------------------------------------------




@plotly_figures_of("massive_activations")
def massive_activations_figures(results: Sequence[ResultLike]) -> list:
    """The last step's top-k |h| per layer and sink heatmap; max|h|/median|h| vs step when several are stored."""
    import plotly.graph_objects as go

    results = as_list(results)
    last = results[-1]
    out: list = []
    top, median = array(last, "top_abs"), array(last, "layer_median_abs")
    if top is not None and median is not None:
        layers = list(range(top.shape[0]))
        traces = [go.Scatter(x=layers, y=json_values(top[:, r]), mode="lines+markers", name=f"top {r + 1}")
                  for r in range(top.shape[1])]
        traces.append(go.Scatter(x=layers, y=json_values(median), mode="lines+markers", name="median",
                                 line=dict(dash="dash")))
        out.append(plotly_layout(go.Figure(traces), f"largest |h| per layer, step {last.step}", "layer", "|h|", log_y=True))
    mass = array(last, "sink_mass")
    if mass is not None and mass.ndim == 2:
        fig = go.Figure(go.Heatmap(z=[json_values(row) for row in mass], zmin=0.0, zmax=1.0, colorscale="Viridis"))
        out.append(plotly_layout(fig, f"attention on the first token, step {last.step}", "head", "layer"))
    ratio = array(last, "layer_max_ratio")
    if len(results) > 1 and ratio is not None:
        steps = json_values(steps_of(results))
        traces = []
        for li in range(ratio.shape[0]):
            v = [array(r, "layer_max_ratio")[li] if array(r, "layer_max_ratio") is not None
                 and array(r, "layer_max_ratio").shape == ratio.shape else np.nan for r in results]
            traces.append(go.Scatter(x=steps, y=json_values(v), mode="lines+markers", name=f"layer {li}"))
        out.append(plotly_layout(go.Figure(traces), "max|h| / median|h| vs step", "step", "ratio", log_y=True))
    return out or [None]


__all__ = ["draw_layer_magnitudes", "draw_ratio_timeline", "draw_sinks", "massive_activations_figure",
           "massive_activations_figures"]
