"""Representation figures: neural collapse NC1–NC4 (Papyan, Han, Donoho 2020), uniformity and RankMe.

Uniformity and RankMe come with the feature singular-value spectrum (Wang & Isola 2020; Garrido et al. 2023).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, array, as_list, coord, pick_step, series, steps_of
from lossatlas.viz.registry import paper_figure_of
from lossatlas.viz.style import log_if_decades, new_figure, note, paper_style

# (value, label): NC1 within-class variability, NC2 simplex-ETF distance, NC3 self-duality, NC4 NCC mismatch
NC_SERIES: tuple[tuple[str, str], ...] = (
    ("nc1", "NC1 tr(Σ_W Σ_B⁺)/C"),
    ("nc2_etf_means", "NC2 ETF dist. (means)"),
    ("nc2_etf_weights", "NC2 ETF dist. (weights)"),
    ("nc3_self_duality", "NC3 ‖W/‖W‖ − M/‖M‖‖"),
    ("nc4_ncc_mismatch", "NC4 NCC mismatch"),
)
UNIFORMITY_SERIES: tuple[tuple[str, str], ...] = (
    ("uniformity", "uniformity log E e^{-t‖u−v‖²}"),
    ("alignment", "alignment E‖u−v‖^α"),
    ("w2_uniformity", "W2 uniformity"),
    ("tolerance", "tolerance"),
    ("rankme", "RankMe"),
)


def draw_collapse_vs_step(ax, results: Sequence[ResultLike]) -> bool:
    """NC1–NC4 vs step on a log y axis (each tends to 0 under collapse)."""
    results = as_list(results)
    steps = steps_of(results)
    drawn = False
    for i, (name, label) in enumerate(NC_SERIES):
        v = series(results, name)
        if np.isfinite(v).any():
            # a metric that reaches exactly 0 (NC4 at perfect agreement) cannot sit on a log axis: mark it at the floor
            ax.plot(steps, np.where(v > 0, v, np.nan), marker="o", color=f"C{i}", label=label)
            drawn = True
    if not drawn:
        note(ax, "no NC metrics stored\n(lossatlas collapse)")
        return False
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("NC metric (→ 0 under collapse)")
    ax.set_title("neural collapse vs step")
    ax.legend(fontsize=5)
    return True


def draw_collapse_classes(ax, result: ResultLike) -> bool:
    """Per-class norms of the centred class means and of the classifier rows (NC2 equinorm at a glance)."""
    means, weights = array(result, "class_mean_norm"), array(result, "class_weight_norm")
    if means is None:
        note(ax, "no per-class statistics stored")
        return False
    labels = coord(result, "class_mean_norm")
    x = np.arange(means.size)
    w = 0.4 if weights is not None else 0.8
    ax.bar(x - (w / 2 if weights is not None else 0), means / means.mean(), width=w, color="C0", label="‖μ_c − μ_G‖ / mean")
    if weights is not None:
        ax.bar(x + w / 2, weights / weights.mean(), width=w, color="C1", label="‖w_c‖ / mean")
    ax.axhline(1.0, color="0.4", lw=0.6)
    ax.set_xticks(x, [str(c) for c in labels])
    ax.set_xlabel("class")
    ax.set_ylabel("norm relative to the mean")
    ax.set_title(f"per-class norms, step {result.step}")
    ax.legend(fontsize=5)
    return True


def draw_layer_nc1(ax, result: ResultLike) -> bool:
    """NC1 of every probed layer, input to output (progressive collapse with depth)."""
    v = array(result, "layer_nc1")
    if v is None:
        note(ax, "no per-layer NC1 stored (collapse --layers depth)")
        return False
    names = [str(n) for n in coord(result, "layer_nc1")]
    ax.plot(np.arange(v.size), v, marker="o", color="C2")
    ax.set_xticks(np.arange(v.size), names, rotation=45, ha="right")
    log_if_decades(ax, v, decades=1.0)
    ax.set_ylabel("NC1")
    ax.set_title(f"NC1 by layer, step {result.step}")
    return True


@paper_figure_of("collapse")
def collapse_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "collapse" kind: NC1–NC4 vs step (several steps, no ``step``), per-class norms and per-layer NC1."""
    results = as_list(results)
    one = pick_step(results, step)
    panels = [lambda ax: draw_collapse_vs_step(ax, results)] if step is None and len(results) > 1 else []
    panels.append(lambda ax: draw_collapse_classes(ax, one))
    if array(one, "layer_nc1") is not None:
        panels.append(lambda ax: draw_layer_nc1(ax, one))
    with paper_style():
        fig, axes = new_figure(len(panels), 1, height=2.0 * len(panels))
        for ax, draw in zip(axes[:, 0], panels):
            draw(ax)
    return fig


def draw_singular_values(ax, result: ResultLike) -> bool:
    """Feature singular values σ_k, descending, log y (dimensional collapse shows as a cliff), with RankMe."""
    s = array(result, "singular_values")
    if s is None:
        note(ax, "no singular values stored")
        return False
    k = np.arange(1, s.size + 1)
    ax.plot(k, np.where(s > 0, s, np.nan), marker=".", color="C0")
    ax.set_yscale("log")
    rank = result.values.get("rankme")
    if rank is not None:
        ax.axvline(float(rank), color="C3", ls="--", lw=0.8, label=f"RankMe = {float(rank):.1f}")
        ax.legend()
    ax.set_xlabel("component k")
    ax.set_ylabel("singular value σ_k")
    ax.set_title(f"feature spectrum, step {result.step}")
    return True


def draw_uniformity_vs_step(ax, results: Sequence[ResultLike]) -> bool:
    """Uniformity, alignment, W2 uniformity and tolerance vs step on one axis, RankMe on a second.

    The four share the axis as they are: normalising each by its first finite value would hide signs.
    """
    results = as_list(results)
    steps = steps_of(results)
    drawn = False
    for i, (name, label) in enumerate(UNIFORMITY_SERIES):
        v = series(results, name)
        if np.isfinite(v).any() and name != "rankme":
            ax.plot(steps, v, marker="o", color=f"C{i}", label=label)
            drawn = True
    if not drawn:
        note(ax, "no uniformity metrics stored")
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("metric value")
    rank = series(results, "rankme")
    if np.isfinite(rank).any():
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        ax2.plot(steps, rank, marker="s", color="C4", ls="--", label="RankMe")
        ax2.set_ylabel("RankMe (effective rank)", color="C4")
    ax.set_title("uniformity vs step")
    ax.legend(fontsize=5)
    return True


@paper_figure_of("uniformity")
def uniformity_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "uniformity" kind: metrics vs step (several steps, no ``step``) and the feature singular values."""
    results = as_list(results)
    one = pick_step(results, step)
    timeline = step is None and len(results) > 1
    with paper_style():
        fig, axes = new_figure(1 + timeline, 1)
        if timeline:
            draw_uniformity_vs_step(axes[0, 0], results)
        draw_singular_values(axes[-1, 0], one)
    return fig
