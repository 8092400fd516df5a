"""Plotly counterparts of the paper figures, for exploration.

A 3-D landscape to rotate, hover values, zoomable spectra and timelines. Every ``*_plotly`` function returns a
``plotly.graph_objects.Figure`` holding at least one trace, or None when the Result holds nothing to draw; the
``*_figures`` functions at the end list them per name.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lossatlas.viz._results import ResultLike, array, as_list, coord, scalar, series, steps_of
from lossatlas.viz.curvature import DENSITY_FLOOR, LrLike, stability_line
from lossatlas.viz.registry import TRAINING, plotly_figures_of
from lossatlas.viz.representations import NC_SERIES, UNIFORMITY_SERIES
from lossatlas.viz.sharpness import MEASURE_LABELS, sharpness_measures
from lossatlas.viz.style import OKABE_ITO, json_values, plotly, plotly_layout, spans_decades
from lossatlas.viz.training import TRAINING_PANELS, constant_value, layer_matrix, logged


def _lines(results: Sequence[ResultLike], names: Sequence[tuple[str, str]], title: str, ylabel: str, *,
           log_y: bool | None = None, stderr: bool = True):
    go = plotly()
    steps = steps_of(results)
    fig = go.Figure()
    shown = []
    for name, label in names:
        v = series(results, name)
        if not np.isfinite(v).any():
            continue
        se = series(results, f"{name}_stderr") if stderr else np.full_like(v, np.nan)
        err = dict(type="data", array=json_values(se), visible=True) if np.isfinite(se).any() else None
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=label, error_y=err))
        shown.append(v)
    if not fig.data:
        return None
    if log_y is None:
        log_y = spans_decades(np.concatenate(shown), 1.0)
    return plotly_layout(fig, title, "step", ylabel, log_y=log_y)


def _panels(results: Sequence[ResultLike], names: Sequence[tuple[str, str]], title: str):
    """Each scalar series vs step in its own panel (its own y axis, log where a positive series spans decades)."""
    go = plotly()
    from plotly.subplots import make_subplots

    steps = steps_of(results)
    found = [(label, v) for name, label in names if np.isfinite(v := series(results, name)).any()]
    if not found:
        return None
    fig = make_subplots(rows=len(found), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[label for label, _ in found])
    for i, (label, v) in enumerate(found, start=1):
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=label,
                                 line=dict(color=OKABE_ITO[(i - 1) % len(OKABE_ITO)])), row=i, col=1)
        positive = np.all(v[np.isfinite(v)] > 0)
        fig.update_yaxes(type="log" if positive and spans_decades(v, 1.0) else None, row=i, col=1)
    fig.update_xaxes(title_text="step", row=len(found), col=1)
    fig.update_layout(template="simple_white", height=170 * len(found) + 80, showlegend=False,
                      margin=dict(l=60, r=20, t=50, b=40), title=title)
    return fig


# -- training log ------------------------------------------------------------------------------------
def training_plotly(log: Mapping[str, np.ndarray]):
    """Loss, η, ‖∇L‖ and update ratio vs step, one zoomable panel each (shared step axis)."""
    go = plotly()
    from plotly.subplots import make_subplots

    found = [(n, lab, logged(log, n)) for n, lab in TRAINING_PANELS]
    # a series that never changes (a constant learning rate) is a sentence (constant_series), not a panel
    found = [(n, lab, f) for n, lab, f in found if f is not None and constant_value(f[1]) is None]
    if not found:
        return None
    fig = make_subplots(rows=len(found), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[lab for _, lab, _ in found])
    for i, (n, lab, (s, v)) in enumerate(found, start=1):
        fig.add_trace(go.Scatter(x=json_values(s), y=json_values(v), mode="lines", name=lab,
                                 line=dict(color=OKABE_ITO[(i - 1) % 8])), row=i, col=1)
        fig.update_yaxes(title_text=n, type="log" if spans_decades(v, 1.0) and n != "lr" else None, row=i, col=1)
    fig.update_xaxes(title_text="step", row=len(found), col=1)
    fig.update_layout(template="simple_white", height=220 * len(found), showlegend=False,
                      margin=dict(l=60, r=20, t=40, b=40), title="training curves")
    return fig


def layer_heatmap_plotly(log: Mapping[str, np.ndarray], prefix: str = "grad_norm/", label: str = "gradient norm"):
    """Per-tensor telemetry (tensor × step) as a heatmap of log10 values, exact values on hover."""
    go = plotly()
    found = layer_matrix(log, prefix)
    if found is None:
        return None
    names, steps, m = found
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(m > 0, np.log10(m), np.nan)
    fig = go.Figure(go.Heatmap(x=json_values(steps), y=names, z=[json_values(r) for r in z], customdata=[json_values(r) for r in m],
                               colorscale="Viridis", colorbar=dict(title=f"log10 {label}"),
                               hovertemplate="step %{x}<br>%{y}<br>" + label + " %{customdata:.4g}<extra></extra>"))
    return plotly_layout(fig, f"per-tensor {label}", "step", "tensor")


# -- curvature -----------------------------------------------------------------------------------------
def spectrum_plotly(result: ResultLike):
    """SLQ density (log y) with outliers, bulk edge and the top/bottom eigenvalues (zoom to inspect)."""
    go = plotly()
    fig = go.Figure()
    density = array(result, "density")
    if density is not None:
        grid = coord(result, "density")
        shown = np.maximum(density, max(float(np.nanmax(density)) * DENSITY_FLOOR, np.finfo(float).tiny))
        fig.add_trace(go.Scatter(x=json_values(grid), y=json_values(shown), mode="lines",
                                 fill="tozeroy", name="density (SLQ)"))
    for name, label, sym in (("top_eigenvalues", "top-k λ", "triangle-down"), ("bottom_eigenvalues", "bottom-k λ", "triangle-up"),
                             ("outliers", "outliers", "x")):
        v = array(result, name)
        if v is not None:
            y = np.full(v.shape, float(np.nanmax(density)) if density is not None else 1.0)
            fig.add_trace(go.Scatter(x=json_values(v), y=json_values(y), mode="markers", name=label, marker=dict(symbol=sym, size=9)))
    if not fig.data:
        return None
    bulk = result.meta.get("bulk_edge")
    if bulk is not None:
        fig.add_vline(x=float(bulk), line_dash="dash", annotation_text="bulk edge")
    plotly_layout(fig, f"Hessian spectrum, step {result.step}", "eigenvalue λ", "density", log_y=density is not None)
    if density is None:  # eigenvalues only: a rug on the λ axis, with no density axis to misread
        fig.update_yaxes(visible=False, range=[0.5, 1.5])
        fig.update_layout(height=200)
    return fig


def eigenvalues_plotly(results: Sequence[ResultLike], lr: LrLike = None):
    """Top-k eigenvalues vs step with 2/η (edge of stability) and tr(H) ± stderr."""
    go = plotly()
    results = as_list(results)
    steps = steps_of(results)
    fig = go.Figure()
    k = max((a.size for r in results if (a := array(r, "top_eigenvalues")) is not None), default=0)
    shown = []
    for j in range(k):
        v = np.array([np.sort(a)[::-1][j] if (a := array(r, "top_eigenvalues")) is not None and a.size > j else np.nan
                      for r in results])
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=f"λ_{j + 1}",
                                 line=dict(color=OKABE_ITO[0]), opacity=1.0 if j == 0 else 0.5))
        shown.append(v)
    threshold, label, rule = stability_line(results, lr)  # the optimizer's own threshold where stored, else 2/η
    if k and np.isfinite(threshold).any():
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(threshold), mode="lines", name=label,
                                 hovertemplate="step %{x}<br>" + label + " %{y:.4g}<br>" + rule + "<extra></extra>",
                                 line=dict(dash="dash", color=OKABE_ITO[3], shape="hv")))
        shown.append(threshold)
    tr = series(results, "trace")
    if np.isfinite(tr).any():
        se = series(results, "trace_stderr")
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(tr), mode="lines+markers", name="tr(H)",
                                 error_y=dict(type="data", array=json_values(se)) if np.isfinite(se).any() else None,
                                 line=dict(color=OKABE_ITO[1])))
        shown.append(tr)
    if not fig.data:
        return None
    return plotly_layout(fig, "Hessian eigenvalues vs step", "step", "eigenvalue",
                   log_y=spans_decades(np.concatenate(shown), 2.0))


def block_spectra_plotly(result: ResultLike):
    """Per-layer top eigenvalues, hover for the block name."""
    go = plotly()
    m = array(result, "block_top_eigenvalues")
    if m is None or m.ndim != 2:
        return None
    names = [str(n) for n in coord(result, "block_top_eigenvalues", 0)]
    fig = go.Figure([go.Scatter(x=names, y=json_values(m[:, j]), mode="markers", name=f"λ_{j + 1}") for j in range(m.shape[1])])
    return plotly_layout(fig, f"per-layer spectra, step {result.step}", "block", "eigenvalue", log_y=spans_decades(m))


# -- sharpness and evaluation ---------------------------------------------------------------------------
def sharpness_plotly(results: Sequence[ResultLike]):
    """Every sharpness measure vs step (±stderr), or bars for a single checkpoint."""
    go = plotly()
    results = as_list(results)
    names = sharpness_measures(results)
    if not names:
        return None
    if len(results) > 1:
        return _lines(results, [(n, MEASURE_LABELS.get(n, n)) for n in names], "sharpness vs step", "sharpness")
    r = results[0]
    vals = [scalar(r, n) for n in names]
    err = [scalar(r, f"{n}_stderr") or 0.0 for n in names]
    fig = go.Figure(go.Bar(x=vals, y=[MEASURE_LABELS.get(n, n) for n in names], orientation="h",
                           error_x=dict(type="data", array=err), marker_color=[OKABE_ITO[i % 8] for i in range(len(names))]))
    fig.update_yaxes(autorange="reversed")
    return plotly_layout(fig, f"sharpness, step {r.step}", "sharpness", "measure", log_x=spans_decades(vals, 1.0))


def loss_plotly(results: Sequence[ResultLike]):
    """Evaluated loss (log axis where it spans a decade) above accuracy (%), one unit per axis, shared step axis."""
    go = plotly()
    from plotly.subplots import make_subplots

    results = as_list(results)
    steps = steps_of(results)
    loss, acc = series(results, "loss"), series(results, "accuracy")
    rows = [(name, label, v) for name, label, v in (("loss", "loss", loss), ("accuracy", "accuracy (%)", 100 * acc))
            if np.isfinite(v).any()]
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[label for _, label, _ in rows])
    for i, (name, label, v) in enumerate(rows, start=1):
        fig.add_trace(go.Scatter(x=json_values(steps), y=json_values(v), mode="lines+markers", name=label,
                                 line=dict(color=OKABE_ITO[i - 1])), row=i, col=1)
        log_y = name == "loss" and spans_decades(v, 1.0)  # a loss falling by decades reads on a log axis
        fig.update_yaxes(title_text=label, type="log" if log_y else None, row=i, col=1,
                         range=[0, 100.5] if name == "accuracy" else None)
    fig.update_xaxes(title_text="step", row=len(rows), col=1)
    fig.update_layout(template="simple_white", height=230 * len(rows) + 60, showlegend=False,
                      margin=dict(l=60, r=20, t=50, b=40), title="evaluated loss and accuracy")
    return fig


# -- landscape --------------------------------------------------------------------------------------------
def surface_plotly(result: ResultLike, metric: str = "loss"):
    """A 2-D slice as a rotatable 3-D surface (with contours projected on the floor); a 1-D slice as a line."""
    go = plotly()
    z = array(result, metric)
    if z is None:
        return None
    if z.ndim == 1:
        x = coord(result, metric, 0)
        fig = go.Figure(go.Scatter(x=json_values(x), y=json_values(z), mode="lines+markers", name=metric))
        return plotly_layout(fig, f"{metric} along a 1-D slice, step {result.step}", "α", metric,
                       log_y=metric == "loss" and spans_decades(z, 1.0))
    x, y = coord(result, metric, 1), coord(result, metric, 0)
    fig = go.Figure(go.Surface(x=json_values(x), y=json_values(y), z=[json_values(r) for r in z], colorscale="Viridis",
                               colorbar=dict(title=metric),
                               contours=dict(z=dict(show=True, usecolormap=True, project_z=True)),
                               hovertemplate="α %{x:.3f}<br>β %{y:.3f}<br>" + metric + " %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"{metric} surface, step {result.step} (drag to rotate)", template="simple_white",
                      height=520, margin=dict(l=10, r=10, t=50, b=10),
                      scene=dict(xaxis_title="α (direction 1)", yaxis_title="β (direction 2)", zaxis_title=metric))
    return fig


def interpolate_plotly(result: ResultLike):
    """Loss and error along the interpolation path; the linear barrier in the title and as a marker."""
    go = plotly()
    loss = array(result, "loss")
    if loss is None:
        return None
    a = coord(result, "loss")
    fig = go.Figure(go.Scatter(x=json_values(a), y=json_values(loss), mode="lines+markers", name="loss"))
    err = array(result, "error")
    if err is not None:
        fig.add_trace(go.Scatter(x=json_values(a), y=json_values(err), mode="lines", name="error", yaxis="y2", line=dict(dash="dash")))
    b = scalar(result, "loss_barrier")
    title = "linear interpolation" + (f" (loss barrier over the chord {b:.3g})" if b is not None else "")
    plotly_layout(fig, title, "α", "loss")
    if err is not None:
        fig.update_layout(yaxis2=dict(title="error", overlaying="y", side="right", range=[0, 1], showgrid=False),
                          legend=dict(x=1.08))
    return fig


def trajectory_plotly(result: ResultLike):
    """The trajectory on its PCA plane over the loss contours; hover for step and loss."""
    go = plotly()
    px, py = array(result, "proj_x"), array(result, "proj_y")
    if px is None or py is None:
        return None
    fig = go.Figure()
    surf = array(result, "surface_loss")
    if surf is not None:
        fig.add_trace(go.Contour(x=json_values(coord(result, "surface_loss", 1)), y=json_values(coord(result, "surface_loss", 0)),
                                 z=[json_values(r) for r in surf], colorscale="Viridis", colorbar=dict(title="loss"), name="loss"))
    steps = coord(result, "proj_x")
    loss = array(result, "loss")
    fig.add_trace(go.Scatter(x=json_values(px), y=json_values(py), mode="lines+markers", name="checkpoints",
                             text=[f"step {int(s)}" + (f", loss {l:.4g}" if loss is not None else "")
                                   for s, l in zip(steps, loss if loss is not None else steps)],
                             marker=dict(color=json_values(steps), colorscale="Plasma", size=8), line=dict(color="#D55E00")))
    return plotly_layout(fig, f"trajectory on its PCA plane (final step {result.step})", "PC1", "PC2")


# -- representations ----------------------------------------------------------------------------------------
def collapse_plotly(results: Sequence[ResultLike]):
    """NC1–NC4 vs step on a log axis; for one checkpoint, per-class norms."""
    go = plotly()
    results = as_list(results)
    if len(results) > 1:
        fig = _lines(results, NC_SERIES, "neural collapse vs step", "NC metric", log_y=True)
        if fig is not None:
            return fig
    r = results[-1]
    means = array(r, "class_mean_norm")
    if means is None:
        return None
    labels = [str(c) for c in coord(r, "class_mean_norm")]
    fig = go.Figure(go.Bar(x=labels, y=json_values(means), name="‖μ_c − μ_G‖"))
    w = array(r, "class_weight_norm")
    if w is not None:
        fig.add_trace(go.Bar(x=labels, y=json_values(w), name="‖w_c‖"))
    return plotly_layout(fig, f"per-class norms, step {r.step}", "class", "norm")


def uniformity_plotly(results: Sequence[ResultLike]):
    """Feature singular values of the last checkpoint (log y); metrics vs step when there are several."""
    go = plotly()
    results = as_list(results)
    if len(results) > 1:  # the metrics have different units and scales: one panel (one axis) each
        fig = _panels(results, UNIFORMITY_SERIES, "uniformity and RankMe vs step")
        if fig is not None:
            return fig
    r = results[-1]
    s = array(r, "singular_values")
    if s is None:
        return None
    fig = go.Figure(go.Scatter(x=list(range(1, s.size + 1)), y=json_values(np.where(s > 0, s, np.nan)), mode="lines+markers",
                               name="σ_k"))
    return plotly_layout(fig, f"feature singular values, step {r.step}", "component k", "σ_k", log_y=True)


def scalars_plotly(results: Sequence[ResultLike], title: str):
    """Fallback for a probe without a dedicated figure: every scalar vs step."""
    from lossatlas.viz._results import scalar_names

    results = as_list(results)
    return _lines(results, [(n, n) for n in scalar_names(results) if not n.endswith("_stderr")], title, "value")


# -- the interactive figures of each name (results sorted by step) ---------------------------------------------
@plotly_figures_of(TRAINING)
def training_figures(log: Mapping[str, np.ndarray]) -> list:
    """The training curves, then the per-tensor gradient-norm heatmap."""
    return [training_plotly(log), layer_heatmap_plotly(log)]


@plotly_figures_of("loss")
def loss_figures(results: Sequence[ResultLike]) -> list:
    """Evaluated loss and accuracy vs step."""
    return [loss_plotly(results)]


@plotly_figures_of("hessian")
def hessian_figures(results: Sequence[ResultLike], lr: LrLike = None) -> list:
    """The eigenvalue timeline (several steps), then the last step's spectrum and per-layer spectra."""
    last = results[-1]
    return [eigenvalues_plotly(results, lr) if len(results) > 1 else None, spectrum_plotly(last),
            block_spectra_plotly(last)]


@plotly_figures_of("sharpness")
def sharpness_figures(results: Sequence[ResultLike]) -> list:
    """Every measure vs step, then the last step's measures (several steps)."""
    return [sharpness_plotly(results), sharpness_plotly([results[-1]]) if len(results) > 1 else None]


@plotly_figures_of("collapse")
def collapse_figures(results: Sequence[ResultLike]) -> list:
    """NC1–NC4 vs step, then the last step's per-class norms (several steps)."""
    return [collapse_plotly(results), collapse_plotly([results[-1]]) if len(results) > 1 else None]


@plotly_figures_of("uniformity")
def uniformity_figures(results: Sequence[ResultLike]) -> list:
    """The metrics vs step, then the last step's feature singular values (several steps)."""
    return [uniformity_plotly(results), uniformity_plotly([results[-1]]) if len(results) > 1 else None]


def convexity_plotly(result: ResultLike):
    """The convexity map |λ_min/λ_max| of the Hessian over the slice (surface --convexity) as a heat map (Li et al. 2018)."""
    go = plotly()
    ratio = array(result, "convexity_ratio")
    if ratio is None:
        return None
    title = f"convexity map |λmin/λmax|, step {result.step}"
    if ratio.ndim == 1:
        fig = go.Figure(go.Scatter(x=json_values(coord(result, "convexity_ratio", 0)), y=json_values(ratio), mode="lines+markers",
                                   name="|λmin/λmax|"))
        return plotly_layout(fig, title, "α", "|λmin/λmax|")
    lmax, lmin = array(result, "convexity_lambda_max"), array(result, "convexity_lambda_min")
    fig = go.Figure(go.Heatmap(x=json_values(coord(result, "convexity_ratio", 1)), y=json_values(coord(result, "convexity_ratio", 0)),
                               z=[json_values(r) for r in ratio], customdata=np.stack([lmax, lmin], axis=-1).tolist(),
                               colorscale="Magma", zmin=0, colorbar=dict(title="|λmin/λmax|"),
                               hovertemplate="α %{x:.3f}<br>β %{y:.3f}<br>|λmin/λmax| %{z:.3g}<br>λmax %{customdata[0]:.4g}"
                                             "<br>λmin %{customdata[1]:.4g}<extra></extra>"))
    return plotly_layout(fig, title, "α (direction 1)", "β (direction 2)")


@plotly_figures_of("surface")
def surface_figures(results: Sequence[ResultLike]) -> list:
    """The last step's slice: a rotatable 3-D surface (2-D slice) or a line (1-D slice), then its convexity map."""
    return [surface_plotly(results[-1]), convexity_plotly(results[-1])]


@plotly_figures_of("interpolate")
def interpolate_figures(results: Sequence[ResultLike]) -> list:
    """The last step's loss and error along the interpolation path, with its barrier."""
    return [interpolate_plotly(results[-1])]


@plotly_figures_of("trajectory")
def trajectory_figures(results: Sequence[ResultLike]) -> list:
    """The last step's trajectory on its PCA plane over the loss contours."""
    return [trajectory_plotly(results[-1])]
