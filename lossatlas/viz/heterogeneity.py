"""Figures of the curvature along the update and across parameter blocks.

- "critical_sharpness": the critical sharpness λ_c = 2/η_c vs step beside the Rayleigh quotient dᵀHd/dᵀd and
  λ_max, against the 2/η line (Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for Analyzing
  the Training Dynamics of LLMs"; Cohen et al. 2021), and one step's line search L(θ − ηd) − L(θ) vs η.
- "block_heterogeneity": one step's block spectral densities on their common grid, the matrix of pairwise
  Jensen–Shannon divergences, and JS⁰ vs step (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian
  Perspective").

Reads the Results of the ``critical_sharpness`` and ``block_heterogeneity`` probes; every value is optional.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, pick_step, series, steps_of
from lossatlas.viz.curvature import LrLike, learning_rates
from lossatlas.viz.registry import paper_figure_of, plotly_figures_of
from lossatlas.viz.style import (
    json_values,
    log_if_decades,
    new_figure,
    note,
    paper_style,
    plotly,
    plotly_layout,
    spans_decades,
)

CRITICAL_SERIES: tuple[tuple[str, str], ...] = (
    ("critical_sharpness", "λ_c = 2/η_c"),
    ("rayleigh_quotient", "dᵀHd/dᵀd"),
    ("quadratic_estimate", "dᵀHd/gᵀd"),
    ("lambda_max", "λ_max"),
)
DENSITY_FLOOR = 1e-6  # densities below this fraction of the peak are drawn at it (log axis)


# -- critical sharpness ------------------------------------------------------------------------------------------
def draw_critical_vs_step(ax, results: Sequence[ResultLike], lr: LrLike = None) -> bool:
    """λ_c, the Rayleigh quotient, the quadratic estimate and λ_max vs step, with 2/η where η is known."""
    results = as_list(results)
    steps = steps_of(results)
    shown = []
    for i, (name, label) in enumerate(CRITICAL_SERIES):
        v = series(results, name)
        if np.isfinite(v).any():
            ax.plot(steps, v, marker="o", color=f"C{i}", label=label)
            shown.append(v)
    if not shown:
        note(ax, "no critical sharpness stored\n(lossatlas critical_sharpness)")
        return False
    eta = learning_rates(results, lr)
    if np.isfinite(eta).any():
        ax.plot(steps, 2.0 / eta, color="C3", ls="--", drawstyle="steps-post", label="2/η")
        shown.append(2.0 / eta)
    log_if_decades(ax, np.concatenate(shown))
    ax.set_xlabel("step")
    ax.set_ylabel("curvature")
    direction = results[-1].meta.get("direction") or results[-1].config.get("direction", "")
    ax.set_title(f"critical sharpness along the {direction} direction".replace("  ", " "))
    ax.legend(fontsize=6)
    return True


def draw_line_search(ax, result: ResultLike) -> bool:
    """L(θ − ηd) − L(θ) at every step η the line search tried, with η_c marked."""
    eta, change = array(result, "search_eta"), array(result, "search_loss_change")
    if eta is None or change is None:
        note(ax, "no line search stored")
        return False
    order = np.argsort(eta)
    ax.plot(eta[order], change[order], marker=".", color="C0", label="L(θ − ηd) − L(θ)")
    ax.axhline(0.0, color="0.5", lw=0.6)
    eta_c = result.values.get("critical_step")
    if eta_c is not None and math.isfinite(float(eta_c)):
        ax.axvline(float(eta_c), color="C3", ls="--", lw=0.8, label=f"η_c = {float(eta_c):.3g}")
    if spans_decades(eta, 1.0):
        ax.set_xscale("log")
    ax.set_xlabel("step η along d")
    ax.set_ylabel("loss change")
    ax.set_title(f"line search, step {result.step}")
    ax.legend(fontsize=6)
    return True


@paper_figure_of("critical_sharpness")
def critical_sharpness_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None,
                              lr: LrLike = None) -> Figure:
    """The "critical_sharpness" kind: λ_c vs step beside dᵀHd/dᵀd and λ_max with 2/η, and one step's line search.

    The timeline appears with several steps and no ``step`` given.
    """
    results = as_list(results)
    timeline = step is None and len(results) > 1
    with paper_style():
        fig, axes = new_figure(1 + timeline, 1, height=2.1 * (1 + timeline))
        if timeline:
            draw_critical_vs_step(axes[0, 0], results, lr)
        draw_line_search(axes[-1, 0], pick_step(results, step))
    return fig


# -- block heterogeneity -----------------------------------------------------------------------------------------
def _block_names(result: ResultLike, value: str) -> list[str]:
    dim = result.dims[value][0]
    names = result.coords.get(dim)
    n = np.asarray(result.values[value]).shape[0]
    return [str(s) for s in names] if names is not None and len(names) == n else [str(i) for i in range(n)]


def draw_block_densities(ax, result: ResultLike) -> bool:
    """Every block's smoothed spectral density on the common grid (log y), the largest-spectrum blocks labelled."""
    dens = array(result, "block_density")
    if dens is None or dens.ndim != 2:
        note(ax, "no block spectra stored\n(lossatlas block_heterogeneity)")
        return False
    grid = np.asarray(result.coords.get("grid", np.arange(dens.shape[1])), dtype=np.float64)
    names = _block_names(result, "block_density")
    floor = max(np.nanmax(dens) * DENSITY_FLOOR, np.finfo(float).tiny)
    top = array(result, "block_top_ritz")
    labelled = set(np.argsort(top)[::-1][:6]) if top is not None else set(range(min(6, len(names))))
    for i in range(dens.shape[0]):
        ax.plot(grid, np.maximum(dens[i], floor), lw=0.7, color=f"C{i % 10}", alpha=0.85,
                label=names[i] if i in labelled else None)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of the block Hessian")
    ax.set_ylabel("density")
    js0 = result.values.get("js0")
    extra = f", JS⁰ = {float(js0):.3g}" if js0 is not None else ""
    ax.set_title(f"{dens.shape[0]} block spectra, step {result.step}{extra}")
    ax.legend(fontsize=5)
    return True


def draw_js_matrix(ax, result: ResultLike) -> bool:
    """The pairwise Jensen–Shannon divergences (nats, 0 to ln 2) between the block spectra."""
    js = array(result, "js_matrix")
    if js is None or js.ndim != 2:
        note(ax, "no JS matrix stored")
        return False
    im = ax.imshow(js, vmin=0.0, vmax=math.log(2), cmap="viridis")
    names = _block_names(result, "js_matrix")
    if len(names) <= 24:  # label the axes while the names stay readable
        ax.set_yticks(np.arange(len(names)), names, fontsize=4)
    ax.set_xlabel("block")
    ax.set_title("JS(ρ_i ‖ ρ_j), nats")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return True


@paper_figure_of("block_heterogeneity")
def block_heterogeneity_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "block_heterogeneity" kind: JS⁰ vs step (several steps), one step's block densities and JS matrix."""
    results = as_list(results)
    one = pick_step(results, step)
    timeline = step is None and len(results) > 1
    n = 2 + timeline
    with paper_style():
        fig, axes = new_figure(n, 1, height=2.2 * n)
        if timeline:
            ax = axes[0, 0]
            ax.plot(steps_of(results), series(results, "js0"), marker="o", color="C0", label="JS⁰")
            ax.set_xlabel("step")
            ax.set_ylabel("JS⁰ (nats)")
            ax.legend()
        draw_block_densities(axes[n - 2, 0], one)
        draw_js_matrix(axes[n - 1, 0], one)
    return fig


# -- interactive -------------------------------------------------------------------------------------------------






@plotly_figures_of("critical_sharpness")
def critical_sharpness_figures(results: Sequence[ResultLike], lr: LrLike = None) -> list:
    """λ_c, dᵀHd/dᵀd and λ_max vs step with 2/η (several steps), then the last step's line search."""
    go = plotly()
    results = as_list(results)
    steps = steps_of(results)
    out: list = []
    if len(results) > 1:
        fig, shown = go.Figure(), []
        for name, label in CRITICAL_SERIES:
            v = series(results, name)
            if np.isfinite(v).any():
                fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=label))
                shown.append(v)
        eta = learning_rates(results, lr)
        if shown and np.isfinite(eta).any():
            fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(2.0 / eta), mode="lines", name="2/η",
                                     line=dict(dash="dash", shape="hv")))
            shown.append(2.0 / eta)
        out.append(plotly_layout(fig, "critical sharpness vs step", "step", "curvature",
                           log_y=spans_decades(np.concatenate(shown), 2.0)) if shown else None)
    last = results[-1]
    eta, change = array(last, "search_eta"), array(last, "search_loss_change")
    if eta is not None and change is not None:
        order = np.argsort(eta)
        fig = go.Figure(go.Scatter(x=json_values(eta[order]), y=json_values(change[order]), mode="lines+markers",
                                   name="L(θ − ηd) − L(θ)"))
        out.append(plotly_layout(fig, f"line search, step {last.step}", "step η along d", "loss change",
                           log_x=spans_decades(eta, 1.0)))
    else:
        out.append(None)
    return out


@plotly_figures_of("block_heterogeneity")
def block_heterogeneity_figures(results: Sequence[ResultLike]) -> list:
    """The last step's block densities (log y) and its JS matrix as a heatmap."""
    go = plotly()
    last = as_list(results)[-1]
    dens, js = array(last, "block_density"), array(last, "js_matrix")
    out: list = [None, None]
    if dens is not None and dens.ndim == 2:
        grid = np.asarray(last.coords.get("grid", np.arange(dens.shape[1])), dtype=np.float64)
        names = _block_names(last, "block_density")
        floor = max(np.nanmax(dens) * DENSITY_FLOOR, np.finfo(float).tiny)
        fig = go.Figure([go.Scatter(x=json_values(grid), y=json_values(np.maximum(d, floor)), mode="lines", name=n)
                         for n, d in zip(names, dens)])
        js0 = last.values.get("js0")
        title = f"block spectra, step {last.step}" + (f", JS⁰ = {float(js0):.3g}" if js0 is not None else "")
        out[0] = plotly_layout(fig, title, "eigenvalue λ of the block Hessian", "density", log_y=True)
    if js is not None and js.ndim == 2:
        names = _block_names(last, "js_matrix")
        fig = go.Figure(go.Heatmap(z=js.tolist(), x=names, y=names, zmin=0.0, zmax=math.log(2), colorscale="Viridis"))
        out[1] = plotly_layout(fig, "JS(ρ_i ‖ ρ_j), nats", "block", "block")
    return out


__all__ = ["critical_sharpness_figure", "block_heterogeneity_figure", "critical_sharpness_figures",
           "block_heterogeneity_figures", "draw_critical_vs_step", "draw_line_search", "draw_block_densities",
           "draw_js_matrix"]
