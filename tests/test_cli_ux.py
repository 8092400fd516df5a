"""The layer a researcher touches: named results, --select, JSON with the numbers, --help that explains.

Everything runs through ``lossatlas.cli.main`` in-process on one tiny MLP run (digits, 64 examples), shared by
the module. Numbers printed as JSON are compared with those read back from the results file, and the loss at a
surface's centre with a dense float64 evaluation (tests/reference.py).
"""

import argparse
import json
import math

import numpy as np
import pytest
from conftest import DIGITS, TINY_MLP

from lossatlas.cli import build_parser, main, undocumented_settings
from lossatlas.store import ResultsStore

EXAMPLES = ["--max-examples", "64"]


def cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 20-step run with two hessian configurations stored: the default one and a GGN one on class 3."""
    from lossatlas.train import TrainConfig, train

    path = tmp_path_factory.mktemp("ux") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=20, batch_size=64, checkpoint_every=10), str(path))
    assert main(["hessian", str(path), "--top-k", "2", *EXAMPLES, "--quiet"]) == 0
    assert main(["hessian", str(path), "--top-k", "2", "--curvature", "ggn", "--subset", "class=3",
                 "--max-examples", "256", "--quiet"]) == 0
    return path


def results_of(run):
    return run.with_suffix(".results.h5")


def hessian_configs(run):
    from lossatlas.store.labels import configurations

    return {c["label"]: c for c in configurations(ResultsStore(results_of(run), mode="r").entries("hessian"))}


# -- 1. the right result, named ---------------------------------------------------------------------------------
def test_labels_name_the_settings_that_differ(run):
    assert set(hessian_configs(run)) == {"hessian · top_k=2 · 64 examples",
                                         "hessian · ggn · class=3 · top_k=2 · 256 examples"}


def test_plot_refuses_to_guess_between_two_configurations(run, tmp_path, capsys):
    out = tmp_path / "f.png"
    code, _, err = cli(capsys, "plot", run, "hessian", "-o", out)
    line = one_line(err)
    assert code == 2 and not out.exists()
    for label, c in hessian_configs(run).items():  # both listed, with their keys and steps
        assert f"{label} (key {c['key']}, steps 20)" in line
    assert "--select" in line


def test_select_by_label_draws_it_and_titles_the_figure_with_it(run, tmp_path, capsys):
    label = "hessian · ggn · class=3 · top_k=2 · 256 examples"
    code, out, err = cli(capsys, "plot", run, "hessian", "-o", tmp_path / "f.svg", "--select", label)
    assert code == 0, err
    assert label in (tmp_path / "f.svg").read_text()
    # the figure function itself: the label is the matplotlib suptitle, the chosen configuration's numbers drawn
    from lossatlas.analysis.reporting import selected_results
    from lossatlas.viz.figures import paper_figure

    results, chosen = selected_results(ResultsStore(results_of(run), mode="r"), "hessian", label)
    assert chosen["key"] == hessian_configs(run)[label]["key"] and results[0].config["curvature"] == "ggn"
    fig = paper_figure("hessian", results, label=chosen["label"])
    assert fig.get_suptitle() == label


def test_name_is_stored_selectable_and_unique(run, tmp_path, capsys):
    code, out, err = cli(capsys, "hessian", run, "--top-k", "2", *EXAMPLES, "--name", "small")
    assert code == 0, err
    assert out.splitlines()[0] == "hessian · top_k=2 · 64 examples [name small] (key " \
        f"{hessian_configs(run)['hessian · top_k=2 · 64 examples']['key']})"
    assert "(cached)" in out  # naming reuses the stored result
    code, _, err = cli(capsys, "hessian", run, "--top-k", "3", *EXAMPLES, "--name", "small")
    assert code == 2 and "already names another hessian configuration" in one_line(err)
    code, _, err = cli(capsys, "plot", run, "hessian", "-o", tmp_path / "n.svg", "--select", "small")
    assert code == 0, err
    assert "small: hessian · top_k=2 · 64 examples" in (tmp_path / "n.svg").read_text()
    code, _, err = cli(capsys, "plot", run, "hessian", "-o", tmp_path / "x.svg", "--select", "nothing-like-it")
    assert code == 2 and "names no stored" in one_line(err) and "small" in one_line(err)


def test_info_lists_label_name_settings_steps_and_when(run, capsys):
    main(["hessian", str(run), "--top-k", "2", *EXAMPLES, "--name", "small", "--quiet"])
    code, out, _ = cli(capsys, "info", results_of(run), "--json")
    assert code == 0
    rows = {r["label"]: r for r in json.loads(out)["results"]}
    small = rows["hessian · top_k=2 · 64 examples"]
    assert small["name"] == "small" and small["settings"] == {"top_k": 2} and small["steps"] == [20]
    assert small["written"][:2] == "20" and small["key"] == hessian_configs(run)[small["label"]]["key"]
    ggn = rows["hessian · ggn · class=3 · top_k=2 · 256 examples"]
    assert ggn["settings"] == {"curvature": "ggn", "subset": "class=3", "top_k": 2} and ggn["name"] is None
    code, out, _ = cli(capsys, "info", results_of(run))
    assert "hessian · top_k=2 · 64 examples  [name small]" in out and 'settings top_k=2' in out


def test_report_cards_carry_the_label(run, tmp_path, capsys):
    code, _, err = cli(capsys, "report", run, "-o", tmp_path / "r.html")
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    for label in hessian_configs(run):
        assert label in html
    code, _, err = cli(capsys, "report", run, "-o", tmp_path / "s.html", "--select", "hessian · top_k=2 · 64 examples")
    assert code == 0, err
    html = (tmp_path / "s.html").read_text()
    assert "hessian · top_k=2 · 64 examples" in html and "class=3" not in html


def test_export_uses_the_same_resolver(run, tmp_path, capsys):
    from lossatlas import export
    from lossatlas.store import labels

    assert export._choose.__doc__ and "lossatlas.store.labels.choose" in export._choose.__doc__
    configs = labels.configurations(ResultsStore(results_of(run), mode="r").entries("hessian"))
    by_key = export._choose(configs, configs[0]["key"], "result", results_of(run))
    assert by_key == labels.choose(configs, configs[0]["key"], "result", results_of(run)) == [configs[0]]


# -- 2. --json carries the numbers -------------------------------------------------------------------------------
def stored(run, probe, key, step):
    found = ResultsStore(results_of(run), mode="r").read(probe, key, step)
    assert found is not None
    return found[0]


def assert_same_numbers(entry, result):
    assert set(entry["values"]) == set(result.values)
    for name, arr in result.values.items():
        v = entry["values"][name]
        assert v["dims"] == list(result.dims[name]) and v["shape"] == list(arr.shape)
        if "param" in result.dims[name]:
            assert v["data"] is None and "omitted" in v
            continue
        np.testing.assert_array_equal(np.asarray(v["data"], dtype=arr.dtype), arr)  # bit for bit
    for dim, c in result.coords.items():
        np.testing.assert_array_equal(np.asarray(entry["coords"][dim]["data"]), c)


def test_hessian_json_holds_the_stored_numbers(run, capsys):
    code, out, err = cli(capsys, "hessian", run, "--top-k", "2", "--curvature", "ggn", "--subset", "class=3",
                         "--max-examples", "256", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["label"] == "hessian · ggn · class=3 · top_k=2 · 256 examples" and data["nonfinite"] == {}
    (entry,) = data["steps"]
    assert entry["status"] == "cached" and entry["config"]["curvature"] == "ggn"
    result = stored(run, "hessian", data["key"], 20)
    assert_same_numbers(entry, result)
    assert len(entry["values"]["top_eigenvalues"]["data"]) == 2


def test_surface_json_numbers_and_centre_against_float64(run, capsys):
    from lossatlas import models, store
    from lossatlas.analysis.runner import load_batches

    from reference import loss_value

    code, out, err = cli(capsys, "surface", run, "--xrange", "-1", "1", "3", "--yrange", "-0.5", "0.5", "3",
                         *EXAMPLES, "--json")
    assert code == 0, err
    data = json.loads(out)
    (entry,) = data["steps"]
    result = stored(run, "surface", data["key"], 20)
    assert_same_numbers(entry, result)
    assert entry["coords"]["x"]["data"] == [-1.0, 0.0, 1.0] and entry["coords"]["y"]["data"] == [-0.5, 0.0, 0.5]
    assert entry["values"]["loss"]["dims"] == ["y", "x"]
    model = models.build_model(TINY_MLP).double()
    with store.RunReader(run) as reader:
        model.load_state_dict(reader.checkpoint(20).state_dict())
    batches = [(x.double(), y) for x, y in load_batches(DIGITS, batch_size=256, max_examples=64)]
    centre = loss_value(model, batches, "cross_entropy")
    assert entry["values"]["loss"]["data"][1][1] == pytest.approx(centre, rel=1e-5)  # computed in float32


def test_surface_console_line_summarises_the_grid(run, capsys):
    code, out, _ = cli(capsys, "surface", run, "--xrange", "-1", "1", "3", "--yrange", "-0.5", "0.5", "3", *EXAMPLES)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("step 20"))
    result = stored(run, "surface", json.loads(cli(capsys, "surface", run, "--xrange", "-1", "1", "3", "--yrange",
                                                   "-0.5", "0.5", "3", *EXAMPLES, "--json")[1])["key"], 20)
    loss = result.values["loss"]
    assert "3×3 grid" in line and f"loss at the centre {loss[1, 1]:.4g}" in line
    assert f"min {loss.min():.4g}" in line and f"max {loss.max():.4g}" in line


def test_interpolate_json_and_layerwise_line(run, capsys):
    argv = ["interpolate", run, "--steps", "0", "--to-step", "20", "--alphas", "0", "1", "5", "--layerwise", *EXAMPLES]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "moving one layer: layers.0: " in out and "layers.2: " in out  # the arrays are named by layer
    code, out, _ = cli(capsys, *argv, "--json")
    data = json.loads(out)
    (entry,) = data["steps"]
    result = stored(run, "interpolate", data["key"], 0)
    assert_same_numbers(entry, result)
    loss = np.asarray(entry["values"]["loss"]["data"])
    chord = loss[0] + (loss[-1] - loss[0]) * np.linspace(0, 1, 5)
    assert entry["values"]["loss_barrier"]["data"] == pytest.approx(max(0.0, float(np.max(loss - chord))), abs=1e-6)
    assert entry["coords"]["alpha"]["data"] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_track_json_has_the_schema_and_the_stored_numbers(run, capsys):
    code, out, err = cli(capsys, "track", run, "--top-k", "2", "--steps", "0,20", *EXAMPLES, "--json")
    assert code == 0, err
    data = json.loads(out)
    (entry,) = data["steps"]
    assert data["probe"] == entry["probe"] == "hessian_tracking" and entry["step"] is None
    assert entry["coords"]["step"]["data"] == [0, 20]
    assert entry["values"]["top_eigenvalues"]["dims"] == ["step", "k"]
    result = stored(run, "hessian_tracking", data["key"], None)
    for name, arr in result.values.items():
        np.testing.assert_array_equal(np.asarray(entry["values"][name]["data"], dtype=float), arr.astype(float))
    assert math.isnan(result.values["overlap"][0]) and data["nonfinite"] == {"/steps/0/values/overlap/data/0": "nan"}


def test_trajectory_prints_its_plane_once(run, capsys):
    code, out, err = cli(capsys, "trajectory", run, "--steps", "all", *EXAMPLES)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 1 and lines[0].startswith("steps 0, 10, 20 (")
    assert "PCA plane of 3 checkpoints" in lines[0]


# -- 3. --help that explains -------------------------------------------------------------------------------------
def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_help_renders():
    """argparse %-formats help text: a stray % in a docstring would make `--help` crash."""
    for name, p in subparsers().items():
        assert "usage:" in p.format_help(), name  # raises on a stray %


def test_every_option_of_every_subcommand_is_explained():
    assert undocumented_settings() == []
    bad = []
    for name, p in subparsers().items():
        for a in p._actions:
            where = f"{name} {'/'.join(a.option_strings) or a.dest}"
            text = a.help or ""
            if not text or text[-1] not in ".)" or text.count("(") != text.count(")"):
                bad.append(f"{where}: help {text!r} is not a full sentence")
            metavars = a.metavar if isinstance(a.metavar, tuple) else (a.metavar,)
            shown = [m for m in metavars if m] or ([a.dest.upper()] if a.option_strings and a.nargs != 0 else [])
            if any("__" in m for m in shown):
                bad.append(f"{where}: metavar {shown}")
    assert bad == []


def test_probe_help_shows_choices_formats_and_full_descriptions():
    ps = subparsers()
    hessian = ps["hessian"].format_help()
    assert "--blocks layers|REGEX" in hessian and "--subset class=C[,C...]" in hessian
    assert "--curvature hessian|ggn|fisher|empirical_fisher" in hessian
    surface = ps["surface"].format_help()
    assert "--directions random|pca|eigenvectors|checkpoints" in surface
    assert "--xrange MIN MAX NUM" in surface and "PROBE__" not in surface
    for name, p in ps.items():
        if p.get_default("probe_cls") is not None:
            desc = (p.description or "").strip()
            assert desc.endswith("."), f"{name}: description {desc[-60:]!r} is cut off"


def test_a_range_takes_its_three_typed_values(run, capsys):
    code, _, err = cli(capsys, "surface", run, "--xrange", "-1", "1", "x", *EXAMPLES)
    assert code == 2 and "'x' is not an integer" in one_line(err)
    code, _, err = cli(capsys, "surface", run, "--xrange", "-1", "1", *EXAMPLES)
    assert code == 2 and "--xrange" in one_line(err)
