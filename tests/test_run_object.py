"""``lossatlas.open_run``: a run in a notebook, whose probe methods run in this process and store their Results.

Numbers are checked against dense float64 references (tests/reference.py) on the checkpoint the probe read.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import lossatlas
from lossatlas.errors import UserError

from reference import eigenvalues, hessian, loss_value

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 8, 10]}}
N = 96  # examples the probes use: small enough for a dense Hessian (610 parameters)


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    from lossatlas.train import TrainConfig, train

    path = tmp_path_factory.mktemp("runobj") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data={"name": "digits"}, lr=0.1, steps=10, batch_size=32, checkpoint_every=5),
          str(path))
    return path


def _reference(run_path, step: int):
    """The checkpoint's model in float64 and the first N examples, built as the runner builds them."""
    from lossatlas.analysis.runner import load_batches, load_model
    from lossatlas.store import RunReader

    reader = RunReader(run_path)
    model = load_model(reader, step, dtype=torch.float64)
    batches = [(x.double(), y) for x, y in load_batches(reader.data_spec, batch_size=256, max_examples=N)]
    return model, batches


def test_open_run_reads_the_run(run_path):
    from lossatlas.store import RunReader

    run = lossatlas.open_run(run_path)
    assert isinstance(run, lossatlas.Run)
    reader = RunReader(run_path)
    assert run.steps == reader.steps() == [0, 5, 10]
    log = run.log
    ref = reader.log()
    assert set(log) == set(ref) and np.array_equal(log["step"], ref["step"])
    assert np.allclose(log["loss"], ref["loss"], equal_nan=True)
    assert run.model_spec["name"] == "mlp" and run.results() == []
    assert "3 checkpoints" in repr(run)


def test_hessian_top_eigenvalues_equal_the_dense_float64_spectrum(run_path):
    run = lossatlas.open_run(run_path)
    res = run.hessian(top_k=3, max_examples=N, dtype="float64", tol=1e-8)
    assert res.probe == "hessian" and res.step == 10
    model, batches = _reference(run_path, 10)
    exact = eigenvalues(hessian(model, batches, "cross_entropy"), descending=True)[:3].numpy()
    got = np.sort(np.asarray(res.values["top_eigenvalues"]))[::-1]
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-9)

    # stored: read back the same numbers, and a second call reuses them (same values, no new entry)
    stored = run.results("hessian")
    assert [r.step for r in stored] == [10]
    np.testing.assert_array_equal(stored[0].values["top_eigenvalues"], res.values["top_eigenvalues"])
    again = run.hessian(top_k=3, max_examples=N, dtype="float64", tol=1e-8)
    np.testing.assert_array_equal(again.values["top_eigenvalues"], res.values["top_eigenvalues"])
    assert len(run.results()) == 1


def test_loss_over_all_steps_equals_the_reference(run_path):
    run = lossatlas.open_run(run_path)
    out = run.loss(steps="all", max_examples=N, dtype="float64")
    assert isinstance(out, list) and [r.step for r in out] == [0, 5, 10]
    for r in out:
        model, batches = _reference(run_path, r.step)
        assert float(r.values["loss"]) == pytest.approx(loss_value(model, batches, "cross_entropy"), rel=1e-10)
    one = run.loss(steps=5, max_examples=N, dtype="float64")
    assert one.step == 5 and float(one.values["loss"]) == float(out[1].values["loss"])


def test_surface_and_generic_probe(run_path):
    run = lossatlas.open_run(run_path)
    surf = run.surface(dims=1, xrange=(-0.5, 0.5, 5), max_examples=N, dtype="float64", quadratic_check=False)
    loss = np.asarray(surf.values["loss"])
    assert loss.shape == (5,)
    model, batches = _reference(run_path, 10)
    assert loss[2] == pytest.approx(loss_value(model, batches, "cross_entropy"), rel=1e-9)  # α = 0: the checkpoint
    same = run.probe("surface", dims=1, xrange=(-0.5, 0.5, 5), max_examples=N, dtype="float64",
                     quadratic_check=False)
    np.testing.assert_array_equal(np.asarray(same.values["loss"]), loss)


def test_a_probe_setting_named_like_a_run_option(run_path):
    """``dtype`` is the run option; the Hessian probe's own ``dtype`` setting is passed as ``hessian_dtype``."""
    run = lossatlas.open_run(run_path)
    res = run.hessian(top_k=1, max_examples=N, hessian_dtype="float64")
    assert res.config["dtype"] == "float64"


def test_bad_input_is_a_user_error(run_path, tmp_path):
    run = lossatlas.open_run(run_path)
    with pytest.raises(UserError, match="unknown probe 'hesian'"):
        run.probe("hesian")
    with pytest.raises(UserError, match="no setting 'topk'.*top_k"):
        run.hessian(topk=3)
    with pytest.raises(UserError, match="probe 'hessian'"):
        run.hessian(top_k=0)
    with pytest.raises(UserError, match="no such run file"):
        lossatlas.open_run(tmp_path / "missing.h5")
    with pytest.raises(UserError, match="step 7 is not in the run"):
        run.loss(steps=7)
    with pytest.raises(UserError, match="no 'hessian' results under key 'abc'"):
        run.results("hessian", key="abc")


def test_import_lossatlas_stays_light():
    code = ("import sys, lossatlas\n"
            "assert callable(lossatlas.open_run) and lossatlas.Run.__module__ == 'lossatlas.run'\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
