"""Hessian figures: spectral density, eigenvalues across steps, per-layer spectra.

The spectral density with bulk and outliers (Sagun et al. 2017; Papyan 2019), the top-k eigenvalues across
steps against the 2/η stability threshold (Cohen et al. 2021), and the per-layer spectra.

Reads the "hessian" Result: "top_eigenvalues" ("k",), "bottom_eigenvalues" ("k",), "trace" + "trace_stderr",
"density" ("grid",) with coord "grid", "outliers" ("outlier",), meta "bulk_edge", "block_top_eigenvalues"
("block", "k") with coord "block". Every one of them is optional.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, coord, pick_step, series, steps_of
from lossatlas.viz.registry import paper_figure_of
from lossatlas.viz.style import log_if_decades, new_figure, note, paper_style

LrLike = float | tuple[Sequence[float], Sequence[float]] | None
DENSITY_FLOOR = 1e-8  # densities below this fraction of the peak are drawn at it (log axis; SLQ tails are ~0)


def learning_rates(results: Sequence[ResultLike], lr: LrLike = None) -> np.ndarray:
    """η at each result's step: ``lr`` (a number, or (steps, lrs) from the run log), else meta["lr"]; NaN if unknown."""
    steps = steps_of(results)
    if isinstance(lr, (int, float)):
        return np.full(steps.shape, float(lr))
    if lr is not None:
        ls, lv = (np.asarray(a, dtype=np.float64) for a in lr)
        ok = np.isfinite(lv)
        if ok.any():
            ls, lv = ls[ok], lv[ok]
            # the lr in force at a checkpoint: the last logged value at or before it (the first one before any)
            idx = np.clip(np.searchsorted(ls, steps, side="right") - 1, 0, ls.size - 1)
            return np.where(np.isfinite(steps), lv[idx], np.nan)
    return np.array([float(r.meta["lr"]) if r.meta.get("lr") is not None else np.nan for r in results])


def stability_line(results: Sequence[ResultLike], lr: LrLike = None) -> tuple[np.ndarray, str, str]:
    """The sharpness threshold to draw against λ_max at each result's step: (values, legend label, rule in words).

    The optimizer's own threshold where the results store it (meta "stability_threshold": 2(1+β)/η for heavy-ball
    momentum, 2/η for plain gradient descent, ...; lossatlas.probes.stability), else 2/η from ``lr``
    (Cohen, Kaur, Li, Kolter, Talwalkar 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability"). NaN where neither is known.
    """
    stored = np.array([float(r.meta["stability_threshold"]) if r.meta.get("stability_threshold") is not None
                       else np.nan for r in results])
    if np.isfinite(stored).any():
        rule = next((str(r.meta["stability_rule"]) for r in results if r.meta.get("stability_rule")), "")
        return stored, "stability threshold", rule
    return 2.0 / learning_rates(results, lr), "2/η", "gradient descent 2/η"


def draw_spectrum(ax, result: ResultLike) -> bool:
    """SLQ density on a log y axis with the bulk edge and outliers marked; top/bottom eigenvalues as a rug."""
    density = array(result, "density")
    top, bottom, outliers = array(result, "top_eigenvalues"), array(result, "bottom_eigenvalues"), array(result, "outliers")
    if density is None and top is None:
        note(ax, "no spectrum stored\n(lossatlas hessian)")
        return False
    if density is not None:
        grid = coord(result, "density")
        floor = max(np.nanmax(density) * DENSITY_FLOOR, np.finfo(float).tiny)
        ax.fill_between(grid, np.maximum(density, floor), floor, color="C0", alpha=0.3, lw=0)
        ax.plot(grid, np.maximum(density, floor), color="C0", label="density (SLQ)")
        ax.set_yscale("log")
        ax.set_ylabel("spectral density")
    else:
        ax.set_yticks([])
    bulk = result.meta.get("bulk_edge")
    if bulk is not None:
        ax.axvline(float(bulk), color="C2", ls="--", lw=0.8, label="bulk edge")
    if outliers is not None:
        ax.plot(outliers, np.zeros_like(outliers), ls="none", marker="v", color="C3", ms=4,
                transform=ax.get_xaxis_transform(), label="outliers", clip_on=False)
    for vals, c, lab in ((top, "C1", "top-k λ"), (bottom, "C4", "bottom-k λ")):
        if vals is not None:
            for i, v in enumerate(vals):
                ax.axvline(v, ymin=0.9, ymax=1.0, color=c, lw=1.0, label=lab if i == 0 else None)
    ax.set_xlabel("eigenvalue λ of ∇²L")
    ax.set_title(f"Hessian spectrum, step {result.step}")
    ax.legend(loc="upper right")
    return True


def spectrum_figure(result: ResultLike) -> Figure:
    """The Hessian spectrum of one checkpoint: density (log scale), bulk edge, outliers, top/bottom eigenvalues."""
    with paper_style():
        fig, axes = new_figure()
        draw_spectrum(axes[0, 0], result)
    return fig


def draw_eigenvalues_vs_step(ax, results: Sequence[ResultLike], lr: LrLike = None) -> bool:
    """Top-k eigenvalues vs step with the 2/η line where η is known (edge of stability, Cohen et al. 2021)."""
    results = as_list(results)
    steps = steps_of(results)
    tops = [array(r, "top_eigenvalues") for r in results]
    k = max((t.size for t in tops if t is not None), default=0)
    if k == 0:
        note(ax, "no top eigenvalues stored\n(lossatlas hessian)")
        return False
    m = np.full((len(results), k), np.nan)
    for i, t in enumerate(tops):
        if t is not None:
            m[i, : t.size] = np.sort(t)[::-1]
    for j in range(k):
        ax.plot(steps, m[:, j], marker="o", color="C0", alpha=1.0 if j == 0 else 0.45,
                label="λ_max" if j == 0 else ("λ_2…λ_k" if j == 1 else None))
    threshold, label, _ = stability_line(results, lr)  # the optimizer's own threshold where stored, else 2/η
    shown = m.copy()
    if np.isfinite(threshold).any():
        ax.plot(steps, threshold, color="C3", ls="--", drawstyle="steps-post", label=label)
        shown = np.column_stack([m, threshold])
    log_if_decades(ax, shown)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("top-k eigenvalues")
    ax.legend()
    return True


def eigenvalues_vs_step_figure(results: Sequence[ResultLike], lr: LrLike = None) -> Figure:
    """Top-k Hessian eigenvalues vs step with 2/η, and tr(H) ± stderr when stored."""
    results = as_list(results)
    trace = series(results, "trace")
    with paper_style():
        fig, axes = new_figure(2 if np.isfinite(trace).any() else 1, 1)
        draw_eigenvalues_vs_step(axes[0, 0], results, lr)
        if axes.shape[0] > 1:
            draw_trace_vs_step(axes[1, 0], results)
    return fig


def draw_trace_vs_step(ax, results: Sequence[ResultLike]) -> None:
    """tr(∇²L) vs step with a ±1 standard-error band (Hutch++, Meyer et al. 2021)."""
    steps, tr, se = steps_of(results), series(results, "trace"), series(results, "trace_stderr")
    ax.plot(steps, tr, marker="o", color="C1", label="tr(H)")
    if np.isfinite(se).any():
        ax.fill_between(steps, tr - se, tr + se, color="C1", alpha=0.25, lw=0, label="± stderr")
    log_if_decades(ax, tr)
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian trace")
    ax.legend()


def draw_block_spectra(ax, result: ResultLike) -> bool:
    """Per-layer (block-diagonal) top eigenvalues: one column of dots per block, log y if they span decades."""
    m = array(result, "block_top_eigenvalues")
    if m is None or m.ndim != 2:
        note(ax, "no per-layer spectra stored")
        return False
    names = [str(n) for n in coord(result, "block_top_eigenvalues", 0)]
    for j in range(m.shape[1]):
        ax.plot(np.arange(len(names)), m[:, j], ls="none", marker="o", color="C0", alpha=1.0 if j == 0 else 0.45,
                label="λ_max" if j == 0 else ("λ_2…λ_k" if j == 1 else None))
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
    log_if_decades(ax, m)
    ax.set_ylabel("block Hessian eigenvalue")
    ax.set_title(f"per-layer spectra, step {result.step}")
    ax.legend()
    return True


@paper_figure_of("hessian")
def hessian_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None, lr: LrLike = None) -> Figure:
    """The "hessian" kind: eigenvalue timeline, one step's spectrum, and its per-layer spectra.

    The timeline appears with several steps and no ``step`` given; the per-layer spectra when stored.
    """
    results = as_list(results)
    one = pick_step(results, step)
    timeline = step is None and len(results) > 1
    blocks = array(one, "block_top_eigenvalues") is not None
    n = 1 + timeline + blocks
    with paper_style():
        fig, axes = new_figure(n, 1, height=2.0 * n)
        i = 0
        if timeline:
            draw_eigenvalues_vs_step(axes[0, 0], results, lr)
            i = 1
        draw_spectrum(axes[i, 0], one)
        if blocks:
            draw_block_spectra(axes[i + 1, 0], one)
    return fig
