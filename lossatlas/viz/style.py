"""One paper style for every matplotlib figure: one-column width, vector fonts, Okabe–Ito colours.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global figure state), inside
``paper_style()``, so importing lossatlas never changes a user's rcParams. ``save_figure`` writes
PDF/SVG (vector, TrueType fonts embedded) or PNG.
"""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow (last: weak on white)
    "#000000",  # black
)
SEQUENTIAL_CMAP = "viridis"  # perceptually uniform and colour-blind safe
ONE_COLUMN_IN = 3.3  # width of one column of a two-column paper, inches
TWO_COLUMN_IN = 6.8
MATPLOTLIB_FORMATS = (".pdf", ".png", ".svg")

RC: dict = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "legend.frameon": False,
    "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.0,
    "lines.markersize": 3,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "image.cmap": SEQUENTIAL_CMAP,
    "pdf.fonttype": 42,  # TrueType: text stays text (selectable, editable) in vector output
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "savefig.dpi": 300,
    "figure.dpi": 150,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply the paper rcParams for the block (the user's rcParams are restored afterwards)."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = ONE_COLUMN_IN, height: float | None = None,
               **subplot_kw) -> tuple[Figure, np.ndarray]:
    """A Figure with an (nrows, ncols) array of Axes, ``width`` inches wide (call inside ``paper_style``)."""
    height = height if height is not None else 2.1 * nrows
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def spans_decades(values, decades: float = 2.0) -> bool:
    """Whether positive ``values`` span at least ``decades`` orders of magnitude (then use a log axis)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2 or (v <= 0).any():
        return False
    return bool(np.log10(v.max() / v.min()) >= decades)


def log_if_decades(ax, values, axis: str = "y", decades: float = 2.0) -> bool:
    """Set a log scale on ``axis`` of ``ax`` when ``values`` span ``decades`` orders of magnitude."""
    if spans_decades(values, decades):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def note(ax, text: str) -> None:
    """Write ``text`` in the middle of an empty Axes (a panel whose quantity was not stored)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=6, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path``; the suffix picks the format (.pdf, .svg vector; .png 300 dpi)."""
    path = Path(path)
    if path.suffix.lower() not in MATPLOTLIB_FORMATS:
        raise ValueError(f"{path}: unsupported figure format {path.suffix!r}; use one of {', '.join(MATPLOTLIB_FORMATS)}")
    with paper_style():
        fig.savefig(path, format=path.suffix.lower()[1:])
    return path


def figure_svg(fig: Figure) -> str:
    """``fig`` as an inline ``<svg>`` element (for an HTML page)."""
    buf = io.StringIO()
    with paper_style():
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def figure_png_base64(fig: Figure, dpi: int = 150) -> str:
    """``fig`` as a base64 PNG ``data:`` URL (for an HTML ``<img>``)."""
    buf = io.BytesIO()
    with paper_style():
        fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_rgba(fig: Figure, dpi: int = 100) -> np.ndarray:
    """``fig`` rendered by Agg as an (H, W, 4) uint8 array (for image-level checks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    with paper_style():
        fig.set_dpi(dpi)
        canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


# -- interactive (plotly) ----------------------------------------------------------------------------------------
def plotly():
    """``plotly.graph_objects``, imported on first use (the static figures never need it)."""
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        raise ImportError("interactive figures need plotly: pip install plotly") from exc
    return go


def json_values(v) -> list:
    """Floats for JSON, NaN/inf as None (a gap in a line)."""
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, dtype=np.float64).ravel()]


def plotly_layout(fig, title: str, x: str, y: str, *, log_y: bool = False, log_x: bool = False):
    """The house layout of every interactive figure: white template, Okabe–Ito colours, labelled gridded axes."""
    fig.update_layout(title=title, template="simple_white", colorway=list(OKABE_ITO), hovermode="closest",
                      margin=dict(l=60, r=20, t=50, b=50), height=380, legend=dict(font=dict(size=10)))
    fig.update_xaxes(title_text=x, type="log" if log_x else None, showgrid=True)
    fig.update_yaxes(title_text=y, type="log" if log_y else None, showgrid=True)
    return fig
