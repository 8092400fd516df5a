"""Figures, the plot command and the HTML report (lossatlas.viz, lossatlas.analysis.reporting).

A real run (20 SGD steps of a tiny MLP on digits) with every probe stored, plus a synthetic "hessian" Result
whose spectrum is known, so that drawn data can be compared with the stored numbers exactly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lossatlas.errors import UserError

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 16, 10]}}
LR = 0.1
HESSIAN_STEPS = (0, 5, 10, 15, 20)


def hessian_result(step: int):
    """A synthetic "hessian" Result with a known spectrum: top-k (5 + s, 3 + s/2, 2), a density on a grid."""
    from lossatlas.probes.base import Result

    grid = np.linspace(-1.0, 30.0, 120)
    density = np.exp(-(grid**2) / 0.1) + 1e-3 * np.exp(-((grid - 25.0) ** 2))
    return Result(
        probe="hessian", config={"k": 3, "synthetic": True}, step=step,
        values={"top_eigenvalues": np.array([5.0 + step, 3.0 + step / 2, 2.0]),
                "bottom_eigenvalues": np.array([-0.5, -0.1]), "trace": np.float64(40.0 + step),
                "trace_stderr": np.float64(2.0), "density": density, "outliers": np.array([25.0, 5.0 + step]),
                "block_top_eigenvalues": np.array([[4.0, 1.0], [0.3, 0.1]])},
        dims={"top_eigenvalues": ("k",), "bottom_eigenvalues": ("k",), "density": ("grid",), "outliers": ("outlier",),
              "block_top_eigenvalues": ("block", "k")},
        coords={"grid": grid, "block": np.array(["layers.0", "layers.2"])},
        meta={"bulk_edge": 1.0},
    )


def make_run(directory, *, probes: bool = True):
    """Train the tiny run into ``directory``/run.h5 and (optionally) store every kind of result for it."""
    from lossatlas.train import TrainConfig, train

    run = directory / "run.h5"
    train(TrainConfig(model=TINY_MLP, data={"name": "digits"}, lr=LR, steps=20, batch_size=64, checkpoint_every=5),
          str(run))
    if not probes:
        return run
    from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
    from lossatlas.probes.collapse import NeuralCollapse
    from lossatlas.probes.connectivity import Interpolate
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.sharpness import Sharpness
    from lossatlas.probes.surface import Surface
    from lossatlas.probes.trajectory import Trajectory
    from lossatlas.probes.uniformity import Uniformity
    from lossatlas.store import ResultsStore, RunReader

    for probe, steps in [
        (Loss(), "all"),
        (Sharpness(measures=("grad_norm", "sam", "average_case"), num_samples=4, max_examples=256), "all"),
        (NeuralCollapse(layers="depth"), "all"),
        (Uniformity(), "all"),
        (Surface(dims=2, xrange=(-1.0, 1.0, 9), quadratic_check=False), "last"),
        (Interpolate(to_step=20, alphas=(0.0, 1.0, 11)), [0]),
        (Trajectory(grid=6), "last"),
    ]:
        run_probe(run, probe, RunOptions(steps=steps, max_examples=256))
    with ResultsStore(default_results_path(run), run_fingerprint=RunReader(run).fingerprint()) as store:
        for s in HESSIAN_STEPS:
            store.write(hessian_result(s), key="synthetic")
    return run


@pytest.fixture(scope="module")
def run_with_results(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("viz"))


@pytest.fixture(scope="module")
def stored(run_with_results):
    """{kind: Results of the newest config, over steps} and the run log."""
    from lossatlas.analysis.reporting import _results_store, latest_results
    from lossatlas.store import RunReader
    from lossatlas.viz import KINDS

    store = _results_store(run_with_results, None)
    out = {k: latest_results(store, k) for k in KINDS if k != "training"}
    return out, RunReader(run_with_results).log()


def ink_fraction(fig) -> float:
    """Share of pixels that differ from the (white) background in the Agg rendering."""
    from lossatlas.viz import figure_rgba

    rgba = figure_rgba(fig, dpi=60)
    return float((np.abs(rgba[..., :3].astype(int) - 255).sum(axis=-1) > 30).mean())


# -- every kind draws -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["training", "loss", "sharpness", "hessian", "collapse", "uniformity", "surface",
                                  "interpolate", "trajectory"])
def test_every_kind_draws_a_labelled_non_blank_figure(stored, kind):
    from lossatlas.viz import KINDS, interactive_figures, paper_figure

    assert kind in KINDS
    results, log = stored
    rs = results.get(kind)
    assert kind == "training" or rs, f"fixture stored no {kind} result"
    fig = paper_figure(kind, rs, log=log, lr=LR)
    ink = ink_fraction(fig)
    assert 0.02 < ink < 0.9, f"{kind}: {ink:.3f} of the pixels are ink (blank or solid figure)"
    drawn = [ax for ax in fig.axes if ax.lines or ax.collections or ax.patches or ax.images]
    assert drawn, f"{kind}: no Axes holds any data"
    for ax in drawn:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() or ax.get_xticklabels(), f"{kind}: an Axes without x label"
        assert ax.get_ylabel() or ax.get_yticks().size, f"{kind}: an Axes without y label"
    figs = interactive_figures(kind, rs, log=log, lr=LR)
    assert figs and all(len(f.data) > 0 for f in figs), f"{kind}: an interactive figure holds no trace"


def test_viz_never_imports_torch_or_h5py():
    code = ("import sys, lossatlas.viz, lossatlas.viz.figures, lossatlas.viz.interactive, lossatlas.viz.report; "
            "bad = [m for m in ('torch', 'h5py') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_paper_style_uses_okabe_ito_and_leaves_rcparams_alone():
    import matplotlib

    from lossatlas.viz import OKABE_ITO, paper_style

    before = matplotlib.rcParams["axes.prop_cycle"]
    with paper_style():
        assert [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]] == list(OKABE_ITO)
        assert matplotlib.rcParams["pdf.fonttype"] == 42
    assert matplotlib.rcParams["axes.prop_cycle"] == before


# -- drawn data equals stored data -------------------------------------------------------------------------------
def test_eigenvalue_timeline_draws_sorted_top_k_and_two_over_eta(stored):
    from lossatlas.viz.curvature import eigenvalues_vs_step_figure

    rs = stored[0]["hessian"]
    fig = eigenvalues_vs_step_figure(rs, lr=LR)
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.lines}
    np.testing.assert_allclose(lines["λ_max"].get_ydata(), [5.0 + s for s in HESSIAN_STEPS])
    np.testing.assert_allclose(lines["λ_max"].get_xdata(), HESSIAN_STEPS)
    np.testing.assert_allclose(lines["2/η"].get_ydata(), 2.0 / LR)
    # tr(H) panel with its ±stderr band
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [40.0 + s for s in HESSIAN_STEPS])


def test_learning_rate_in_force_comes_from_the_log():
    from lossatlas.viz.curvature import learning_rates

    rs = [hessian_result(s) for s in (0, 5, 12)]
    log_steps, log_lr = np.array([1, 2, 5, 6, 10, 11]), np.array([0.1, 0.1, 0.2, np.nan, 0.4, 0.3])
    got = learning_rates(rs, (log_steps, log_lr))
    # brute force: the last finite logged lr at or before each step, the first one before any
    ref = []
    for s in (0, 5, 12):
        ok = [(ls, lv) for ls, lv in zip(log_steps, log_lr) if np.isfinite(lv) and ls <= s]
        ref.append(ok[-1][1] if ok else 0.1)
    np.testing.assert_allclose(got, ref)
    np.testing.assert_allclose(learning_rates(rs, 0.05), 0.05)
    assert np.isnan(learning_rates(rs)).all()


def test_spectrum_draws_density_on_log_scale_with_bulk_edge(stored):
    from lossatlas.viz.curvature import DENSITY_FLOOR, spectrum_figure

    r = stored[0]["hessian"][-1]
    ax = spectrum_figure(r).axes[0]
    assert ax.get_yscale() == "log"
    density_line = next(l for l in ax.lines if l.get_label() == "density (SLQ)")
    np.testing.assert_allclose(density_line.get_xdata(), r.coords["grid"])
    dens = r.values["density"]
    np.testing.assert_allclose(density_line.get_ydata(), np.maximum(dens, dens.max() * DENSITY_FLOOR))
    bulk = next(l for l in ax.lines if l.get_label() == "bulk edge")
    np.testing.assert_allclose(bulk.get_xdata(), [1.0, 1.0])
    outliers = next(l for l in ax.lines if l.get_label() == "outliers")
    np.testing.assert_allclose(outliers.get_xdata(), r.values["outliers"])


def test_spectrum_survives_missing_optional_values():
    from lossatlas.probes.base import Result
    from lossatlas.viz.curvature import hessian_figure

    only_top = Result(probe="hessian", config={}, step=3, values={"top_eigenvalues": np.array([4.0, 1.0])},
                      dims={"top_eigenvalues": ("k",)})
    fig = hessian_figure([only_top])
    assert ink_fraction(fig) > 0.01
    empty = Result(probe="hessian", config={}, step=3, values={"trace": np.float64(2.0)}, dims={"trace": ()})
    assert ink_fraction(hessian_figure([empty])) > 0.005  # a note says what is missing


def test_interpolation_marks_the_stored_barrier_where_the_reference_puts_it(stored):
    from lossatlas.probes.connectivity import barriers
    from lossatlas.viz import interpolate_figure

    r = stored[0]["interpolate"][-1]
    ax = interpolate_figure(r).axes[0]
    ref = barriers(r.coords["alpha"], r.values["loss"])
    assert abs(ref["linear"] - float(r.values["loss_barrier"])) < 1e-12
    arrow = ax.texts[0]  # the annotate arrow sits at the barrier's α
    assert arrow.xy[0] == pytest.approx(ref["argmax_linear"])
    label = next(t for t in ax.texts if "barrier" in t.get_text())
    assert f"{ref['linear']:.3g}" in label.get_text()


def test_surface_figures_hold_the_stored_grid(stored):
    from lossatlas.viz import surface_figure
    from lossatlas.viz.interactive import surface_plotly

    r = stored[0]["surface"][-1]
    ax = surface_figure(r).axes[0]
    levels = ax.collections[0].levels
    z = r.values["loss"]
    assert levels.min() == pytest.approx(z.min()) and levels.max() == pytest.approx(z.max())
    s = surface_plotly(r).data[0]
    assert s.type == "surface"
    np.testing.assert_allclose(np.array(s.z, dtype=float), z)
    np.testing.assert_allclose(np.array(s.x, dtype=float), r.coords["x"])


def test_compare_surfaces_share_one_colour_scale(stored):
    from lossatlas.probes.base import Result
    from lossatlas.viz import compare_surfaces_figure

    r = stored[0]["surface"][-1]
    other = Result(probe="surface", config=r.config, step=r.step, values={"loss": 10.0 * r.values["loss"]},
                   dims={"loss": ("y", "x")}, coords={"x": r.coords["x"], "y": r.coords["y"]})
    fig = compare_surfaces_figure([r, other], ["run A", "run B"])
    sets = [ax.collections[0] for ax in fig.axes[:2]]
    lo, hi = float(r.values["loss"].min()), float(10 * r.values["loss"].max())
    for cs in sets:
        assert cs.norm.vmin == pytest.approx(lo) and cs.norm.vmax == pytest.approx(hi)
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    with pytest.raises(ValueError, match="one label per surface"):
        compare_surfaces_figure([r, other], ["only one"])


def test_log_axis_only_when_the_quantity_spans_decades():
    from lossatlas.viz.training import training_figure

    steps = np.arange(1, 101)
    fig = training_figure({"step": steps, "loss": 10.0 ** (-steps / 25), "grad_norm": 1.0 + 0.01 * steps})
    loss_ax, _, grad_ax = fig.axes[0], fig.axes[1], fig.axes[2]
    assert loss_ax.get_yscale() == "log" and grad_ax.get_yscale() == "linear"


def test_layer_heatmap_matrix_is_the_per_tensor_log(stored):
    from lossatlas.viz.training import layer_matrix

    log = stored[1]
    names, steps, m = layer_matrix(log)
    assert set(names) == {k.split("/", 1)[1] for k in log if k.startswith("grad_norm/")}
    for i, n in enumerate(names):
        np.testing.assert_array_equal(m[i], log[f"grad_norm/{n}"])
    np.testing.assert_array_equal(steps, log["step"])


def test_collapse_timeline_is_log_and_holds_nc1(stored):
    from lossatlas.viz import collapse_figure

    rs = stored[0]["collapse"]
    ax = collapse_figure(rs).axes[0]
    assert ax.get_yscale() == "log"
    nc1 = next(l for l in ax.lines if l.get_label().startswith("NC1"))
    np.testing.assert_allclose(nc1.get_ydata(), [float(r.values["nc1"]) for r in rs])


def test_checkpoint_panel_has_three_labelled_panels_of_one_step(stored):
    from lossatlas.viz import checkpoint_panel_figure

    res = stored[0]
    surface, hess = res["surface"][-1], res["hessian"][-1]
    assert surface.step == hess.step == 20
    fig = checkpoint_panel_figure(surface, hess, res["sharpness"])
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)"]
    assert ink_fraction(fig) > 0.02
    with pytest.raises(ValueError, match="same checkpoint"):
        checkpoint_panel_figure(surface, res["hessian"][0])


# -- plot command -----------------------------------------------------------------------------------------------
def test_plot_command_writes_every_format(run_with_results, tmp_path):
    from lossatlas.analysis.reporting import plot_command
    from lossatlas.viz.report import plotly_js

    pdf = plot_command(run_with_results, "hessian", output=tmp_path / "h.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/Subtype /Image" not in data  # vector: no raster image inside
    assert (plot_command(run_with_results, "surface", output=tmp_path / "s.svg").read_text().find("<svg") >= 0)
    assert plot_command(run_with_results, "collapse", step=10, output=tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = plot_command(run_with_results, "surface", output=tmp_path / "s.html").read_text()
    assert html.count(plotly_js()[:2000]) == 1  # plotly.js inlined, once
    assert not re.search(r"<script[^>]+src=", html)


def test_plot_command_errors_say_how_to_fix(run_with_results, tmp_path):
    from lossatlas.analysis.reporting import plot_command

    with pytest.raises(UserError, match="known kinds: training, loss"):
        plot_command(run_with_results, "curvature", output=tmp_path / "x.png")
    with pytest.raises(UserError, match=r"unsupported output format '\.jpg'"):
        plot_command(run_with_results, "loss", output=tmp_path / "x.jpg")
    (tmp_path / "exists.png").write_bytes(b"user data")
    with pytest.raises(UserError, match="pass --force"):
        plot_command(run_with_results, "loss", output=tmp_path / "exists.png")
    assert (tmp_path / "exists.png").read_bytes() == b"user data"
    plot_command(run_with_results, "loss", output=tmp_path / "exists.png", overwrite=True)
    assert (tmp_path / "exists.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="stored steps: 0, 5, 10, 15, 20"):
        plot_command(run_with_results, "collapse", step=7, output=tmp_path / "c7.png")
    with pytest.raises(UserError, match="no such run file"):
        plot_command(tmp_path / "missing.h5", "loss", output=tmp_path / "m.png")


@pytest.fixture
def bare_run(run_with_results, tmp_path):
    """The same run file in a fresh folder: no results computed yet."""
    run = tmp_path / "bare.h5"
    shutil.copy(run_with_results, run)
    return run


def test_plot_command_names_the_command_for_a_missing_kind(bare_run, tmp_path):
    from lossatlas.analysis.reporting import plot_command

    run = bare_run
    with pytest.raises(UserError, match=r"no 'hessian' result stored .* compute it with `lossatlas hessian"):
        plot_command(run, "hessian", output=tmp_path / "h.png")
    assert plot_command(run, "training", output=tmp_path / "t.pdf").stat().st_size > 0
    assert not list(tmp_path.glob(".t.*"))  # no temporary file left behind


# -- report -------------------------------------------------------------------------------------------------------
def test_report_of_an_empty_run_says_which_commands_fill_it(bare_run, tmp_path):
    from lossatlas.analysis.reporting import report_command
    from lossatlas.viz.report import plotly_js

    run = bare_run
    html = report_command(run, output=tmp_path / "r.html").read_text()
    assert html.count(plotly_js()[:2000]) == 1
    for cmd in ("lossatlas hessian", "lossatlas sharpness", "lossatlas surface", "lossatlas collapse"):
        assert cmd in html
    assert "training curves" in html and '"model"' not in html  # specs are rendered, not dumped raw
    assert "mlp" in html and "digits" in html and "SGD" in html
    with pytest.raises(UserError, match="pass --force"):
        report_command(run, output=tmp_path / "r.html")
    with pytest.raises(UserError, match="unsupported output format"):
        report_command(run, output=tmp_path / "r.pdf")


def test_report_holds_every_stored_result_with_its_config(run_with_results, tmp_path):
    from lossatlas.analysis.reporting import report_command
    from lossatlas.analysis.runner import default_results_path
    from lossatlas.store import ResultsStore
    from lossatlas.viz.report import plotly_js

    html = report_command(run_with_results, output=tmp_path / "report.html").read_text()
    entries = ResultsStore(default_results_path(run_with_results), mode="r").entries()
    for key in {e["key"] for e in entries}:
        assert f"config key {key}" in html
    assert "<tr><th>synthetic</th><td>yes</td></tr>" in html  # the hessian config, a table in its <details>
    assert "&quot;synthetic&quot;" not in html  # not dumped as JSON
    for section in ("overview", "instabilities", "curvature", "sharpness", "landscape", "representations"):
        assert f'<section id="{section}">' in html
    page = html.replace(plotly_js(), "")  # the library's own source mentions URLs it never requests here
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the report references a remote resource"
    n_divs = len(re.findall(r'<div id="plot-\d+"', html))
    assert n_divs >= 12
