"""Figures from results: matplotlib paper figures, plotly interactive figures and the HTML run report. No torch.

Every figure function takes Results (``lossatlas.probes.base.Result``, or anything with the same fields holding
numpy arrays) or a run's log dict, never a model or a tensor.
"""

from lossatlas._moved import renamed
from lossatlas.viz.curvature import eigenvalues_vs_step_figure, hessian_figure, spectrum_figure
from lossatlas.viz.figures import KINDS, check_kind, interactive_figures, paper_figure
from lossatlas.viz.landscape import compare_surfaces_figure, interpolate_figure, surface_figure, trajectory_figure
from lossatlas.viz.panels import checkpoint_panel_figure
from lossatlas.viz.report import SECTIONS, ReportItem, ReportSection, figures_page, render_report
from lossatlas.viz.representations import collapse_figure, uniformity_figure
from lossatlas.viz.sharpness import loss_figure, sharpness_figure
from lossatlas.viz.style import OKABE_ITO, figure_png_base64, figure_rgba, figure_svg, paper_style, save_figure
from lossatlas.viz.training import training_figure

__all__ = [
    # dispatch
    "KINDS", "check_kind", "paper_figure", "interactive_figures",
    # paper figures
    "training_figure", "loss_figure", "sharpness_figure", "hessian_figure", "spectrum_figure",
    "eigenvalues_vs_step_figure", "collapse_figure", "uniformity_figure", "surface_figure", "interpolate_figure",
    "trajectory_figure", "compare_surfaces_figure", "checkpoint_panel_figure",
    # style and output
    "OKABE_ITO", "paper_style", "save_figure", "figure_svg", "figure_png_base64", "figure_rgba",
    # report
    "SECTIONS", "ReportItem", "ReportSection", "render_report", "figures_page",
]


def __getattr__(name: str):
    return renamed(__name__, name)  # a figure function's old name, with a DeprecationWarning
