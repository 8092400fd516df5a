"""Figures of the weight spectra and of the representation similarity between checkpoints.

- "weight_spectra": per-layer power-law α (and α̂ = α·log10 λ_max) vs step or vs layer, and one layer's ESD on
  log-log axes with the fitted tail ρ(λ) ∝ λ^(−α) above x_min (Martin & Mahoney 2021, "Predicting trends in the
  quality of state-of-the-art neural networks without access to training or testing data").
- "similarity": layer × layer heatmaps of linear/RBF CKA (Kornblith et al. 2019), SVCCA (Raghu et al. 2017) and
  PWCCA (Morcos et al. 2018) between two checkpoints.

Reads the Results of the ``weight_spectra`` and ``similarity`` probes; every value is optional.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, pick_step, steps_of
from lossatlas.viz.registry import paper_figure_of, plotly_figures_of
from lossatlas.viz.style import json_values, new_figure, note, paper_style, plotly, plotly_layout

SIMILARITY_METRICS: tuple[tuple[str, str], ...] = (
    ("linear_cka", "linear CKA"), ("rbf_cka", "RBF CKA"), ("svcca", "SVCCA"), ("pwcca", "PWCCA"))


def _names(result: ResultLike, value: str, axis: int = 0) -> list[str]:
    dim = result.dims[value][axis]
    names = result.coords.get(dim)
    n = np.asarray(result.values[value]).shape[axis]
    return [str(s) for s in names] if names is not None and len(names) == n else [str(i) for i in range(n)]


# -- weight spectra ----------------------------------------------------------------------------------------------
def draw_alpha(ax, results: Sequence[ResultLike]) -> bool:
    """α of every layer vs step (several steps) or vs layer (one step), with the 2–6 band of Martin & Mahoney."""
    results = as_list(results)
    last = results[-1]
    alpha = array(last, "alpha")
    if alpha is None:
        note(ax, "no weight spectra stored\n(lossatlas weight_spectra)")
        return False
    names = _names(last, "alpha")
    if len(results) > 1:
        steps = steps_of(results)
        for i, name in enumerate(names):
            v = [np.asarray(r.values["alpha"], dtype=float)[i] if "alpha" in r.values and
                 np.asarray(r.values["alpha"]).shape == alpha.shape else np.nan for r in results]
            ax.plot(steps, v, marker="o", ms=3, color=f"C{i % 10}", label=name if i < 10 else None)
        ax.set_xlabel("step")
    else:
        ax.bar(np.arange(len(names)), alpha, color="C0")
        if len(names) <= 24:
            ax.set_xticks(np.arange(len(names)), names, rotation=60, fontsize=5)
        ax.set_xlabel("layer")
    ax.axhspan(2.0, 6.0, color="0.9", zorder=0, label="2 ≤ α ≤ 6")
    ax.set_ylabel("power-law α")
    mean = last.values.get("alpha_weighted_mean")
    ax.set_title("layer α" + (f" (mean α̂ = {float(mean):.3g})" if mean is not None else ""))
    ax.legend(fontsize=5)
    return True


def draw_esd(ax, result: ResultLike, layer: int | None = None) -> bool:
    """One layer's ESD (log-binned density, log-log) with the fitted power law above x_min (default: the largest)."""
    esd, alpha, xmin = array(result, "esd"), array(result, "alpha"), array(result, "xmin")
    if esd is None or esd.ndim != 2:
        note(ax, "no ESD stored")
        return False
    if layer is None:
        sizes = np.isfinite(esd).sum(1)
        layer = int(np.argmax(sizes))
    ev = esd[layer][np.isfinite(esd[layer])]
    ev = ev[ev > 0]
    if ev.size < 2:
        note(ax, "too few eigenvalues")
        return False
    bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), max(8, min(60, ev.size // 4)) + 1)
    dens, edges = np.histogram(ev, bins=bins, density=True)
    mid = np.sqrt(edges[:-1] * edges[1:])
    keep = dens > 0
    ax.plot(mid[keep], dens[keep], marker=".", color="C0", lw=0.8, label="ESD")
    name = _names(result, "alpha")[layer]
    if alpha is not None and xmin is not None and np.isfinite(alpha[layer]) and np.isfinite(xmin[layer]):
        a, x0 = float(alpha[layer]), float(xmin[layer])
        tail = ev[ev >= x0]
        frac = tail.size / ev.size  # the tail's share of the density
        x = np.logspace(np.log10(x0), np.log10(ev.max()), 50)
        ax.plot(x, frac * (a - 1) / x0 * (x / x0) ** (-a), color="C3", ls="--", label=f"α = {a:.2f}")
        ax.axvline(x0, color="C3", lw=0.6, ls=":", label="x_min")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of WᵀW" + ("/N" if "/N" in str(result.meta.get("esd", "/N")) else ""))
    ax.set_ylabel("density")
    ax.set_title(f"ESD of {name}, step {result.step}")
    ax.legend(fontsize=6)
    return True


@paper_figure_of("weight_spectra")
def weight_spectra_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "weight_spectra" kind: layer α vs step (several steps) or per layer, and one step's largest ESD."""
    results = as_list(results)
    one = pick_step(results, step)
    with paper_style():
        fig, axes = new_figure(2, 1, height=4.4)
        draw_alpha(axes[0, 0], results if step is None else [one])
        draw_esd(axes[1, 0], one)
    return fig


# -- similarity --------------------------------------------------------------------------------------------------
def draw_similarity(ax, result: ResultLike, metric: str, label: str) -> bool:
    """The (layer_a, layer_b) heatmap of one similarity, on [0, 1]."""
    mat = array(result, metric)
    if mat is None or mat.ndim != 2:
        note(ax, f"no {label} stored")
        return False
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
    rows, cols = _names(result, metric, 0), _names(result, metric, 1)
    if len(rows) <= 16:
        ax.set_yticks(np.arange(len(rows)), rows, fontsize=4)
    if len(cols) <= 16:
        ax.set_xticks(np.arange(len(cols)), cols, fontsize=4, rotation=60)
    ax.set_ylabel(f"step {result.meta.get('from_step', result.step)}")
    other = result.meta.get("other", "this run")
    ax.set_xlabel(f"step {result.meta.get('to_step')}" + ("" if other == "this run" else f" of {other}"))
    ax.set_title(label)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return True


@paper_figure_of("similarity")
def similarity_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "similarity" kind: one step's layer × layer heatmap of every stored similarity."""
    one = pick_step(as_list(results), step)
    shown = [(m, label) for m, label in SIMILARITY_METRICS if m in one.values] or list(SIMILARITY_METRICS[:1])
    with paper_style():
        fig, axes = new_figure(len(shown), 1, height=2.4 * len(shown))
        for i, (m, label) in enumerate(shown):
            draw_similarity(axes[i, 0], one, m, label)
    return fig


# -- interactive -------------------------------------------------------------------------------------------------






@plotly_figures_of("weight_spectra")
def weight_spectra_figures(results: Sequence[ResultLike]) -> list:
    """Layer α vs step (or per layer at one step), then the last step's α̂ per layer."""
    go = plotly()
    results = as_list(results)
    last = results[-1]
    alpha = array(last, "alpha")
    out: list = [None, None]
    if alpha is None:
        return out
    names = _names(last, "alpha")
    if len(results) > 1:
        steps = steps_of(results)
        traces = []
        for i, name in enumerate(names):
            v = [np.asarray(r.values["alpha"], dtype=float)[i] if "alpha" in r.values and
                 np.asarray(r.values["alpha"]).shape == alpha.shape else np.nan for r in results]
            traces.append(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=name))
        out[0] = plotly_layout(go.Figure(traces), "layer α vs step", "step", "power-law α")
    else:
        out[0] = plotly_layout(go.Figure(go.Bar(x=names, y=json_values(alpha), name="α")), f"layer α, step {last.step}",
                         "layer", "power-law α")
    weighted = array(last, "alpha_weighted")
    if weighted is not None:
        out[1] = plotly_layout(go.Figure(go.Bar(x=names, y=json_values(weighted), name="α̂")),
                         f"weighted α̂ = α·log10 λ_max, step {last.step}", "layer", "α̂")
    return out


@plotly_figures_of("similarity")
def similarity_figures(results: Sequence[ResultLike]) -> list:
    """The last step's layer × layer heatmap of every stored similarity."""
    go = plotly()
    last = as_list(results)[-1]
    out: list = []
    for metric, label in SIMILARITY_METRICS:
        mat = array(last, metric)
        if mat is None or mat.ndim != 2:
            continue
        fig = go.Figure(go.Heatmap(z=[json_values(row) for row in mat], x=_names(last, metric, 1),
                                   y=_names(last, metric, 0), zmin=0.0, zmax=1.0, colorscale="Viridis"))
        out.append(plotly_layout(fig, f"{label}: step {last.meta.get('from_step', last.step)} vs "
                                f"{last.meta.get('to_step')}", "other checkpoint's layer", "this checkpoint's layer"))
    return out or [None]


__all__ = ["draw_alpha", "draw_esd", "draw_similarity", "similarity_figure", "similarity_figures",
           "weight_spectra_figure", "weight_spectra_figures"]
