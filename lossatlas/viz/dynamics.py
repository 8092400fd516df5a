"""Training-dynamics figures: diagnosed loss spikes with their precursors, and the edge of stability.

Each diagnosed loss spike is drawn with the signals that moved before it; the edge-of-stability ratio is λ_max·η/2.
Inputs are the plain dicts/arrays of ``Diagnosis.to_dict()`` and ``EoSAnalysis``; no torch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz.style import OKABE_ITO, log_if_decades, new_figure, note, paper_style

MAX_SIGNALS = 3


def _window(spike: Mapping) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    fig = spike.get("figure") or {}
    steps = np.asarray(fig.get("steps", []), dtype=np.float64)
    loss = np.asarray([np.nan if v is None else v for v in fig.get("loss", [])], dtype=np.float64)
    signals = {k: np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
               for k, vals in (fig.get("signals") or {}).items()}
    return steps, loss, signals


def spikes_figure(diagnosis: Mapping, *, max_spikes: int = 3) -> Figure:
    """One column per spike: the loss around it (top) and its top precursor signals (bottom).

    Each signal is scaled to its own pre-spike median, with the spike start marked. A run without spikes gets a
    note.
    """
    spikes = list(diagnosis.get("spikes", []))[:max_spikes]
    with paper_style():
        ncols = max(1, len(spikes))
        fig, axes = new_figure(2, ncols, width=3.3 * min(ncols, 2), height=3.8, sharex="col")
        if not spikes:
            note(axes[0, 0], "no loss spikes detected")
            axes[0, 0].set(xlabel="step", ylabel="loss")
            axes[1, 0].set_visible(False)
            return fig
        for j, entry in enumerate(spikes):
            s = entry["spike"]
            steps, loss, signals = _window(entry)
            top, bottom = axes[0, j], axes[1, j]
            top.plot(steps, loss, color=OKABE_ITO[0], lw=1)
            log_if_decades(top, loss[np.isfinite(loss)] if np.isfinite(loss).any() else [1.0])
            top.set(ylabel="loss", title=f"{s['kind']} at step {s['peak']}: {entry.get('cause', '')}".replace("_", " "))
            names = [p["signal"] for p in entry.get("precursors", []) if p["signal"] in signals][:MAX_SIGNALS]
            for i, name in enumerate(names):
                v = signals[name]
                before = v[(steps < s["start"]) & np.isfinite(v)]
                ref = float(np.median(np.abs(before))) if before.size else 1.0
                bottom.plot(steps, v / (ref or 1.0), color=OKABE_ITO[(i + 1) % len(OKABE_ITO)], lw=1, label=name)
            if names:
                bottom.legend(fontsize=6, loc="upper left")
            else:
                note(bottom, "no precursor signal")
            bottom.set(xlabel="step", ylabel="signal / pre-spike median")
            for ax in (top, bottom):
                ax.axvline(s["start"], color="0.4", ls="--", lw=0.8)
    return fig


def spikes_plotly(diagnosis: Mapping):
    """The whole logged loss with every spike marked (hover: cause and verdict), as a plotly Figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, entry in enumerate(diagnosis.get("spikes", [])):
        steps, loss, signals = _window(entry)
        s = entry["spike"]
        fig.add_trace(go.Scatter(x=steps.tolist(), y=[None if not np.isfinite(v) else float(v) for v in loss],
                                 mode="lines", name=f"loss around step {s['peak']}", line=dict(color=OKABE_ITO[0])))
        fig.add_trace(go.Scatter(x=[s["peak"]], y=[s.get("peak_loss")], mode="markers", name=f"spike {i + 1}",
                                 marker=dict(color=OKABE_ITO[5], size=10, symbol="x"),
                                 hovertext=[entry.get("verdict", "")], hoverinfo="text"))
    if not fig.data:
        return None
    fig.update_layout(title="loss spikes (windows around each)", template="simple_white", height=340,
                      xaxis_title="step", yaxis_title="loss")
    return fig


def eos_figure(steps: Sequence[float], ratio: Sequence[float], *, phases: Sequence[str] | None = None,
               labels: Sequence[str] | None = None) -> Figure:
    """λ_max·η/2 against step, with the stability threshold 1 (Cohen et al. 2021).

    One line per run when ``steps``/``ratio`` are lists of arrays; for one run, the edge-of-stability steps are
    shaded.
    """
    runs_steps = steps if len(steps) and np.ndim(steps[0]) == 1 else [steps]
    runs_ratio = ratio if len(ratio) and np.ndim(ratio[0]) == 1 else [ratio]
    with paper_style():
        fig, axes = new_figure(1, 1, height=2.4)
        ax = axes[0, 0]
        for i, (s, r) in enumerate(zip(runs_steps, runs_ratio, strict=True)):
            label = labels[i] if labels is not None else None
            ax.plot(np.asarray(s), np.asarray(r), color=OKABE_ITO[i % len(OKABE_ITO)], lw=1.2, label=label)
        ax.axhline(1.0, color="0.3", ls="--", lw=0.8, label="2/η")
        if phases is not None and len(runs_steps) == 1:
            s = np.asarray(runs_steps[0])
            eos = np.asarray([p == "eos" for p in phases])
            if eos.any():
                ax.axvspan(s[eos][0], s[eos][-1], color=OKABE_ITO[2], alpha=0.15, lw=0, label="edge of stability")
        ax.set(xlabel="step", ylabel="λ_max · η / 2")
        ax.legend(fontsize=7)
    return fig
