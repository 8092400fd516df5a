"""Training curves and telemetry from a run's per-step log: loss, lr, gradient norm, update ratio, per-layer norms.

``log`` is what ``RunReader.log()`` returns: ``{"step": (N,), name: (N,)}`` with NaN where a name was not logged.
Per-tensor telemetry is logged as ``"grad_norm/<param>"`` (Recorder ``per_tensor``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lossatlas.viz.registry import TRAINING, paper_figure_of
from lossatlas.viz.style import ONE_COLUMN_IN, log_if_decades, note, paper_style

TRAINING_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "training loss"),
    ("lr", "learning rate η"),
    ("grad_norm", "gradient norm ‖∇L‖₂"),
    ("update_ratio", "update ratio ‖Δθ‖/‖θ‖"),
)


def logged(log: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of the log column ``name`` where it is finite; None when absent or all NaN."""
    if name not in log or "step" not in log:
        return None
    s, v = np.asarray(log["step"], dtype=np.float64), np.asarray(log[name], dtype=np.float64)
    ok = np.isfinite(v)
    return (s[ok], v[ok]) if ok.any() else None


def constant_value(values: np.ndarray, rtol: float = 1e-9) -> float | None:
    """The value of a series that never changes (max − min ≤ rtol·|max|), None when it varies or is empty."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    return hi if hi - lo <= rtol * max(abs(hi), abs(lo)) else None


def constant_series(log: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The training panels whose logged values never change (e.g. a constant η), by name, with their value."""
    out = {}
    for name, _ in TRAINING_PANELS:
        found = logged(log, name)
        if found is not None and (c := constant_value(found[1])) is not None:
            out[name] = c
    return out


def constants_sentence(log: Mapping[str, np.ndarray]) -> str:
    """The constant training series in words, e.g. "learning rate η = 0.05 throughout (constant)."; "" if none."""
    labels = dict(TRAINING_PANELS)
    parts = [f"{labels[n]} = {v:.4g}" for n, v in constant_series(log).items()]
    return f"{' and '.join(parts)} throughout (constant)." if parts else ""


def layer_matrix(log: Mapping[str, np.ndarray], prefix: str = "grad_norm/") -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Per-tensor telemetry as (tensor names, steps (N,), matrix (T, N)); None when nothing was logged per tensor."""
    names = [k[len(prefix):] for k in log if k.startswith(prefix)]
    if not names or "step" not in log:
        return None
    m = np.stack([np.asarray(log[prefix + n], dtype=np.float64) for n in names])  # (T, N)
    keep = np.isfinite(m).any(axis=0)
    if not keep.any():
        return None
    return names, np.asarray(log["step"], dtype=np.float64)[keep], m[:, keep]


def draw_layer_heatmap(fig: Figure, ax, log: Mapping[str, np.ndarray], prefix: str = "grad_norm/",
                       label: str = "gradient norm") -> bool:
    """Per-tensor norms as a (tensor × step) heatmap on a log colour scale; False when none were logged."""
    found = layer_matrix(log, prefix)
    if found is None:
        note(ax, f"no per-tensor '{prefix}…' telemetry logged\n(Recorder(per_tensor=True))")
        return False
    names, steps, m = found
    pos = m[np.isfinite(m) & (m > 0)]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size and pos.max() > pos.min() else None
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(names) + 1), np.ma.masked_invalid(m), norm=norm,
                         shading="flat", rasterized=True)
    ax.set_yticks(np.arange(len(names)) + 0.5, [_short(n) for n in names])
    ax.set_xlabel("step")
    ax.set_title(f"per-tensor {label}")
    fig.colorbar(mesh, ax=ax, label=label, pad=0.01)
    return True


@paper_figure_of(TRAINING)
def training_figure(log: Mapping[str, np.ndarray]) -> Figure:
    """Training curves: loss, η, ‖∇L‖ and update ratio vs step (log y where they span decades) + per-layer heatmap."""
    with paper_style():
        fig = Figure(figsize=(ONE_COLUMN_IN * 2, 4.6), layout="constrained")
        grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 1.2])
        for i, (name, label) in enumerate(TRAINING_PANELS):
            ax = fig.add_subplot(grid[i // 2, i % 2])
            found = logged(log, name)
            if found is None:
                note(ax, f"'{name}' not logged")
                ax.set_title(label)
                continue
            s, v = found
            if (c := constant_value(v)) is not None:  # a constant is a sentence, not a flat line
                note(ax, f"{label} = {c:.4g}\nthroughout (constant)")
                ax.set_axis_off()  # no empty axes around the sentence
                continue
            ax.plot(s, v, color=f"C{i}")
            log_if_decades(ax, v, decades=1.0 if name != "lr" else 2.0)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
        ax = fig.add_subplot(grid[2, :])
        draw_layer_heatmap(fig, ax, log)
    return fig


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around the step centres (for pcolormesh)."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
