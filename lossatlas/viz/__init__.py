"""Figures from results: matplotlib paper figures, plotly interactive figures and the HTML run report. No torch.

Every figure function takes Results (``lossatlas.probes.base.Result``, or anything with the same fields holding
numpy arrays) or a run's log dict, never a model or a tensor.
"""

from importlib import import_module

from lossatlas._moved import renamed

# name -> the module that defines it, imported on first use: importing lossatlas.viz (or one light module of it,
# such as lossatlas.viz.report or .registry) loads no matplotlib, so `lossatlas info` starts fast
_EXPORTS = {
    **dict.fromkeys(("eigenvalues_vs_step_figure", "hessian_figure", "spectrum_figure"), "lossatlas.viz.curvature"),
    **dict.fromkeys(("KINDS", "check_kind", "interactive_figures", "paper_figure"), "lossatlas.viz.figures"),
    **dict.fromkeys(("compare_surfaces_figure", "interpolate_figure", "surface_figure", "trajectory_figure"),
                    "lossatlas.viz.landscape"),
    "checkpoint_panel_figure": "lossatlas.viz.panels",
    **dict.fromkeys(("SECTIONS", "ReportItem", "ReportSection", "figures_page", "render_report"), "lossatlas.viz.report"),
    **dict.fromkeys(("collapse_figure", "uniformity_figure"), "lossatlas.viz.representations"),
    **dict.fromkeys(("loss_figure", "sharpness_figure"), "lossatlas.viz.sharpness"),
    **dict.fromkeys(("OKABE_ITO", "figure_png_base64", "figure_rgba", "figure_svg", "paper_style", "save_figure"),
                    "lossatlas.viz.style"),
    "training_figure": "lossatlas.viz.training",
}

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
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    return renamed(__name__, name)  # a figure function's old name, with a DeprecationWarning


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
