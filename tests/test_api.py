"""The public API: plain functions on a model and its data, the top-level names, the deprecated paths.

Each plain function gives the numbers of its probe run through ``run_probe`` on a run file holding
the same model, with the same data and settings, in float64 (to 1e-12); the data may be a tensor
pair, a Dataset, a list of batches or a DataLoader. Every old import path warns, naming the new
one, and gives the very same objects.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DIGITS, TINY_MLP
from torch.utils.data import DataLoader, TensorDataset

import lossatlas
from lossatlas import api
from lossatlas._moved import MOVED, RENAMED
from lossatlas.analysis.runner import RunOptions, load_batches, load_model, run_probe
from lossatlas.errors import UserError
from lossatlas.probes import get_probe
from lossatlas.store import open_run
from lossatlas.train import TrainConfig, train

N = 96  # examples
B = 32  # batch size: the data are three batches


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=10, batch_size=64, checkpoint_every=5), str(path))
    return path


@pytest.fixture(scope="module")
def first_last(run):
    """The run's first and last steps and their models in float64."""
    with open_run(run) as reader:
        steps = reader.steps()
        first, last = steps[0], steps[-1]
        return first, last, load_model(reader, first, dtype=torch.float64), load_model(reader, last, dtype=torch.float64)


@pytest.fixture(scope="module")
def batches():
    return load_batches(DIGITS, batch_size=B, max_examples=N)


def through_runner(run, probe, step, tmp_path):
    options = RunOptions(steps=[step], batch_size=B, max_examples=N, dtype="float64", results_path=tmp_path / "r.h5")
    (result,) = run_probe(run, probe, options).results
    return result


def assert_same_numbers(got, want):
    assert got.probe == want.probe
    assert set(got.values) == set(want.values) and got.values
    for name, value in want.values.items():
        assert got.dims[name] == want.dims[name], name
        np.testing.assert_allclose(got.values[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def pair(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ----------------------------------------------------------------------------------------------- plain functions
CASES = {
    # name: (probe settings for the runner, the plain call with the same settings, the data form)
    "loss": ({}, lambda m, d, **kw: lossatlas.loss(m, d, **kw), "pair"),
    "hessian": (
        dict(top_k=2, trace=True, trace_matvecs=12, density=True, num_probes=2, num_steps=12),
        lambda m, d, **kw: lossatlas.hessian_spectrum(m, d, top_k=2, trace=True, trace_matvecs=12, density=True,
                                                      num_probes=2, num_steps=12, **kw),
        "list",
    ),
    "surface": (dict(xrange=(-0.5, 0.5, 3), yrange=(-1.0, 1.0, 4)),
                lambda m, d, **kw: lossatlas.surface(m, d, xrange=(-0.5, 0.5, 3), yrange=(-1.0, 1.0, 4), **kw),
                "dataset"),
    "sharpness": (
        dict(measures=("grad_norm", "sam", "average_case"), num_samples=3, max_examples=N, batch_size=B),
        lambda m, d, **kw: lossatlas.sharpness(m, d, measures=("grad_norm", "sam", "average_case"), num_samples=3,
                                               **kw),
        "pair",
    ),
    "collapse": (dict(max_examples=N, batch_size=B), lambda m, d, **kw: lossatlas.neural_collapse(m, d, **kw), "loader"),
    "uniformity": (dict(max_examples=N, batch_size=B, augmentation="gaussian_noise"),
                   lambda m, d, **kw: lossatlas.uniformity(m, d, augmentation="gaussian_noise", **kw), "pair"),
}


def data_as(form, batches):
    x, y = pair(batches)
    return {"pair": (x, y), "list": list(batches), "dataset": TensorDataset(x, y),
            "loader": DataLoader(TensorDataset(x, y), batch_size=B)}[form]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_plain_function_gives_the_numbers_of_its_probe_through_the_runner(name, run, first_last, batches, tmp_path):
    settings, call, form = CASES[name]
    _, last, _, model = first_last
    want = through_runner(run, get_probe(name)(**settings), last, tmp_path)
    got = call(model, data_as(form, batches), batch_size=B, max_examples=N, dtype="float64")
    assert_same_numbers(got, want)
    assert got.config == want.config  # the function built the probe the runner ran


def test_interpolate_gives_the_numbers_of_its_probe_through_the_runner(run, first_last, batches, tmp_path):
    first, last, model_a, model_b = first_last
    want = through_runner(run, get_probe("interpolate")(to_step=last, alphas=(0.0, 1.0, 5)), first, tmp_path)
    got = lossatlas.interpolate(model_a, model_b, data_as("loader", batches), alphas=(0.0, 1.0, 5), max_examples=N,
                                dtype=torch.float64)
    assert_same_numbers(got, want)
    assert want.values["loss"][0] != want.values["loss"][-1]  # two different models, so a real path


def test_the_functions_leave_the_callers_model_as_it_was(first_last, batches):
    model = copy.deepcopy(first_last[3]).float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lossatlas.hessian_spectrum(model, pair(batches), top_k=1, dtype="float64")
    lossatlas.surface(model, pair(batches), dims=1, xrange=(-1.0, 1.0, 3))
    after = model.state_dict()
    assert model.training and set(after) == set(before)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_float32_data_meets_a_float64_model(first_last, batches):
    """Without ``dtype`` the inputs are cast to the dtype the model computes in."""
    model = first_last[3]
    x, y = pair(batches)
    got = lossatlas.loss(model, (x.float(), y)).scalar("loss")
    want = torch.nn.functional.cross_entropy(model(x.double()), y).item()
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda m, d: lossatlas.hessian_spectrum(m, d, top_kk=3), "unknown setting 'top_kk'"),
    (lambda m, d: lossatlas.hessian_spectrum(m, d, top_k=-1), "top_k"),
    (lambda m, d: lossatlas.loss(m, d, loss="hinge"), "unknown loss 'hinge'"),
    (lambda m, d: lossatlas.loss(m, "digits"), "cannot use str as data"),
    (lambda m, d: lossatlas.loss(m.state_dict(), d), "model must be a torch.nn.Module"),
    (lambda m, d: lossatlas.loss(m, d, dtype="float8"), "unknown dtype"),
    (lambda m, d: lossatlas.surface(m, d, directions="pca"), "needs a run's other checkpoints"),
    (lambda m, d: lossatlas.interpolate(m, torch.nn.Linear(64, 10), d), "differ from model_a's"),
])
def test_bad_input_is_a_user_error_that_says_what_to_fix(call, message, first_last, batches):
    with pytest.raises(UserError, match=message):
        call(first_last[3], pair(batches))


def test_the_examples_in_the_docstrings_run():
    outcome = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted >= 7 * 5 and outcome.failed == 0


# ----------------------------------------------------------------------------------------------- top-level names
def test_every_top_level_name_resolves():
    assert {"Recorder", "run_probe", "RunOptions", "hessian_spectrum", "surface", "interpolate", "neural_collapse",
            "uniformity", "sharpness", "loss", "curvature", "estimators", "open_run"} <= set(lossatlas.__all__)
    for name in lossatlas.__all__:
        assert getattr(lossatlas, name) is not None, name
    assert lossatlas.curvature is importlib.import_module("lossatlas.curvature")
    assert lossatlas.hessian_spectrum is api.hessian_spectrum
    with pytest.raises(AttributeError):
        lossatlas.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------------------------- deprecated paths
@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_warns_naming_the_new_one_and_gives_the_same_objects(old, monkeypatch):
    new = importlib.import_module(MOVED[old])
    for name in [m for m in sys.modules if m == old or m.startswith(old + ".")]:
        monkeypatch.delitem(sys.modules, name)  # so that the shim runs again (and is restored afterwards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(f"import {old}", __file__, "exec"), {})  # an import written in this file
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and str(w.message).startswith(old + " ")]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert f"import {MOVED[old]} instead" in str(ours[0].message)
    assert ours[0].filename == __file__  # attributed to the importing code, so a notebook shows it
    module = sys.modules[old]
    if hasattr(new, "__path__"):  # a package: its names are the new package's objects
        assert new.__all__ and all(getattr(module, n) is getattr(new, n) for n in new.__all__)
        assert module.__all__ == new.__all__
    else:
        assert module is new


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_name_warns_naming_the_new_one_and_is_the_same_object(old):
    module, _, name = old.rpartition(".")
    new_module, _, new_name = RENAMED[old].rpartition(".")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = getattr(importlib.import_module(module), name)
    assert found is getattr(importlib.import_module(new_module), new_name)
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and str(w.message).startswith(old + " ")]
    assert len(ours) == 1 and f"use {RENAMED[old]} instead" in str(ours[0].message)
    assert ours[0].filename == __file__
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), name + "_never_defined")


def test_the_loss_probes_old_module_and_class_name_still_give_the_loss_probe(monkeypatch):
    from lossatlas.probes.loss import Loss

    monkeypatch.delitem(sys.modules, "lossatlas.probes.evaluate", raising=False)
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("from lossatlas.probes.evaluate import LossAccuracy", __file__, "exec"), scope)
    assert scope["LossAccuracy"] is Loss and get_probe("loss") is Loss
    messages = {str(w.message).split(" is deprecated")[0] for w in caught if w.category is DeprecationWarning}
    assert {"lossatlas.probes.evaluate", "lossatlas.probes.loss.LossAccuracy"} <= messages


def test_a_notebook_or_script_sees_the_warning_under_the_default_filters():
    code = "import lossatlas.probes.curvature; from lossatlas.probes.curvature import HessianOperator as H; print(H)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "lossatlas.curvature.hessian.HessianOperator" in proc.stdout
    assert "DeprecationWarning: lossatlas.probes.curvature is deprecated: import lossatlas.curvature" in proc.stderr
