"""Multi-panel paper figures: one checkpoint's landscape, spectrum and sharpness timeline side by side."""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, as_list
from lossatlas.viz.curvature import draw_eigenvalues_vs_step, draw_spectrum
from lossatlas.viz.landscape import draw_surface
from lossatlas.viz.sharpness import draw_sharpness_vs_step
from lossatlas.viz.style import TWO_COLUMN_IN, new_figure, note, paper_style


def checkpoint_panel_figure(surface: ResultLike | None, hessian: ResultLike | None,
                            sharpness: Sequence[ResultLike] | None = None, *,
                            hessian_steps: Sequence[ResultLike] | None = None, lr=None) -> Figure:
    """Three panels labelled a–c: (a) the loss surface, (b) the Hessian spectrum, (c) the sharpness timeline.

    (b) is of the same checkpoint; (c) is, without sharpness results, the top-eigenvalue timeline from
    ``hessian_steps``.
    """
    if surface is not None and hessian is not None and surface.step != hessian.step:
        raise ValueError(f"the surface (step {surface.step}) and the spectrum (step {hessian.step}) must be of the "
                         "same checkpoint; pass results of one step")
    with paper_style():
        fig, axes = new_figure(1, 3, width=TWO_COLUMN_IN, height=2.2)
        a, b, c = axes[0]
        if surface is not None:
            draw_surface(fig, a, surface)
        else:
            note(a, "no surface stored\n(lossatlas surface)")
        if hessian is not None:
            draw_spectrum(b, hessian)
        else:
            note(b, "no spectrum stored\n(lossatlas hessian)")
        if sharpness:
            draw_sharpness_vs_step(c, as_list(sharpness))
        elif hessian_steps:
            draw_eigenvalues_vs_step(c, as_list(hessian_steps), lr)
        else:
            note(c, "no sharpness timeline\n(lossatlas sharpness --steps all)")
        for ax, tag in zip((a, b, c), "abc"):
            title = ax.get_title()
            ax.set_title("")
            ax.set_title(f"({tag}) {title}", loc="left")
    return fig
