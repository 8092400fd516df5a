"""Bad input to the ``lossatlas`` command: exit code 2 and one line ``lossatlas: error: ...``, never a traceback.

Also the numerical faults: a checkpoint holding NaN/inf is named at import and refused by every probe
(unless ``--allow-nonfinite``), a NaN/inf loss is a divergence in ``diagnose``, and ``--json`` output
is strict JSON (NaN/inf as null, listed under ``"nonfinite"``).
"""

import errno
import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import DIGITS, TINY_MLP

import lossatlas.probes.registry  # noqa: F401  (registers every probe)
from lossatlas import models
from lossatlas.cli import main
from lossatlas.errors import NonFiniteError, UserError
from lossatlas.probes import PROBES
from lossatlas.store import RunWriter

NAN_STEP, NAN_COUNT, NAN_TENSOR = 300, 12, "layers.0.weight"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code, err):
    """The one stderr line of a refused command."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lossatlas: error: ")
    return lines[0]


def refused(capsys, *argv):
    code, _, err = run(capsys, *argv)
    return error_line(code, err)


def strict_loads(text):
    def no_constant(name):
        raise AssertionError(f"non-strict JSON constant {name} in the output")

    return json.loads(text, parse_constant=no_constant)


def num_params(spec=TINY_MLP):
    return sum(p.numel() for p in models.build_model(spec).parameters())


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    from lossatlas.train import TrainConfig, train

    path = tmp_path_factory.mktemp("run") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=10, batch_size=64, checkpoint_every=5), str(path))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """ckpt_100/200.pt finite, ckpt_300.pt with NAN_COUNT NaN/inf entries in NAN_TENSOR."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for i, step in enumerate((100, 200, NAN_STEP)):
        state = models.build_model({**TINY_MLP, "seed": i}).state_dict()
        if step == NAN_STEP:
            flat = state[NAN_TENSOR].view(-1)
            flat[: NAN_COUNT - 2] = float("nan")
            flat[NAN_COUNT - 2] = float("inf")
            flat[NAN_COUNT - 1] = float("-inf")
        paths.append(folder / f"ckpt_{step}.pt")
        torch.save(state, paths[-1])
    return paths


@pytest.fixture(scope="module")
def nan_run(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "nan.h5"
    assert main(["import", *map(str, checkpoints), "-o", str(path), "--model", json.dumps(TINY_MLP),
                 "--data", "digits"]) == 0
    return path


def nan_message(path):
    return (f"lossatlas: error: {path}: checkpoint at step {NAN_STEP} holds {NAN_COUNT} non-finite values "
            f"({NAN_TENSOR}: {NAN_COUNT}); pass --allow-nonfinite to compute on it anyway")


# -- model/data factories --------------------------------------------------------------------------------------------

FACTORIES = '''
def runtime():
    raise RuntimeError("no kernel for this layer")
def key():
    return {}["missing"]
def zero():
    return 1 / 0
def imports():
    import lossatlas_no_such_package_xyz
'''


@pytest.mark.parametrize("fn, exc", [("runtime", "RuntimeError"), ("key", "KeyError"), ("zero", "ZeroDivisionError"),
                                     ("imports", "ModuleNotFoundError")])
def test_factory_raising_anything_is_one_line(tmp_path, monkeypatch, capsys, fn, exc):
    (tmp_path / "lossatlas_bad_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"factory": f"lossatlas_bad_factories:{fn}"}
    line = refused(capsys, "train", "-o", tmp_path / "r.h5", "--steps", "1", "--model", json.dumps(spec))
    assert f"lossatlas_bad_factories:{fn}" in line and exc in line
    assert not (tmp_path / "r.h5").exists()
    with pytest.raises(UserError, match=exc):
        models.build_data(spec)


# -- probe and track settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(PROBES) + ["track"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_examples_must_be_positive(run_file, capsys, command, value):
    line = refused(capsys, command, run_file, "--max-examples", value)
    assert "--max-examples" in line and value in line


def test_max_examples_refused_by_the_api():
    from lossatlas.analysis.runner import load_batches

    for bad in (0, -5):
        with pytest.raises(UserError, match="max_examples"):
            load_batches(DIGITS, max_examples=bad)
    assert sum(len(y) for _, y in load_batches(DIGITS, max_examples=7)) == 7


@pytest.mark.parametrize("probe, setting, bad", [
    ("collapse", "minority_threshold", math.nan), ("collapse", "minority_threshold", math.inf),
    ("uniformity", "t", math.nan), ("uniformity", "alpha", math.inf), ("uniformity", "noise_std", math.nan),
    ("uniformity", "seed", -1), ("trajectory", "margin", math.inf), ("trajectory", "final_step", -1),
    ("sharpness", "seed", -1), ("surface", "seed", -1), ("surface", "x_step", -1), ("surface", "y_step", -1),
    ("surface", "xrange", (-1.0, math.inf, 5)), ("interpolate", "alphas", (0.0, math.nan, 3)),
])
def test_probe_settings_refuse_nonfinite_and_negative_values(probe, setting, bad):
    extra = {"to_step": 0} if probe == "interpolate" else {}
    with pytest.raises(ValueError, match=setting if setting not in ("xrange", "alphas") else f"{setting}: min and max"):
        PROBES[probe](**extra, **{setting: bad})
    PROBES[probe](**extra)  # the defaults pass


@pytest.mark.parametrize("device, match", [("banana", "unknown device 'banana'"), ("meta", "not supported")])
def test_unknown_device(run_file, capsys, device, match):
    assert match in refused(capsys, "loss", run_file, "--device", device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(run_file, capsys):
    line = refused(capsys, "hessian", run_file, "--device", "cuda")
    assert "CUDA is not available" in line and "--device cpu" in line


@pytest.mark.parametrize("flag, value", [("--window", "0"), ("--window", "-3"), ("--window", "4"),
                                         ("--sensitivity", "-1"), ("--sensitivity", "0"),
                                         ("--sensitivity", "nan"), ("--sensitivity", "inf")])
def test_diagnose_settings(run_file, capsys, flag, value):
    line = refused(capsys, "diagnose", run_file, "--no-curvature", flag, value)
    assert flag in line and value in line


def test_diagnose_settings_refused_by_the_api():
    from lossatlas.analysis.diagnose import diagnose_log

    log = {"step": np.arange(1, 50), "loss": np.linspace(2, 1, 49)}
    for kwargs in ({"window": 0}, {"window": -1}, {"sensitivity": math.nan}, {"sensitivity": -1.0}):
        with pytest.raises(ValueError):
            diagnose_log(log, **kwargs)


@pytest.mark.parametrize("flag", ["--top-k", "--bottom-k"])
def test_hessian_k_above_the_parameter_count(run_file, capsys, monkeypatch, flag):
    def no_solver(*args, **kwargs):
        raise AssertionError("Lanczos ran although k exceeds the parameter count")

    monkeypatch.setattr("lossatlas.probes.spectrum.lanczos_eigs", no_solver)
    argv = ["hessian", run_file, flag, "1000000000", "--force"] + (["--top-k", "0"] if flag == "--bottom-k" else [])
    line = refused(capsys, *argv)
    assert str(num_params()) in line and "1000000000" in line


def test_track_k_above_the_parameter_count(run_file, capsys, monkeypatch):
    monkeypatch.setattr("lossatlas.probes.spectrum.lanczos_eigs", lambda *a, **k: pytest.fail("Lanczos ran"))
    line = refused(capsys, "track", run_file, "--top-k", "1000000000")
    assert str(num_params()) in line


@pytest.mark.parametrize("argv", [["hessian", "--top-k", "-1"], ["hessian", "--top-k", "0"], ["hessian", "--bottom-k", "-1"],
                                  ["track", "--top-k", "0"], ["track", "--top-k", "-2"],
                                  ["track", "--tol", "nan"], ["track", "--curvature", "nope"]])
def test_k_and_tol(run_file, capsys, argv):
    refused(capsys, argv[0], run_file, *argv[1:])


@pytest.mark.parametrize("argv, match", [
    (["hessian", "--subset", "class=99"], "99"),
    (["uniformity", "--max-examples", "1"], "two"),
    (["collapse", "--layers", "nope"], "nope"),
    (["hessian", "--preconditioned"], "optimizer state"),
])
def test_probe_refusals_are_one_line(run_file, tmp_path, capsys, argv, match):
    line = refused(capsys, argv[0], run_file, *argv[1:], "--results", tmp_path / "r.h5")
    assert match in line


def test_results_folder(run_file, tmp_path, capsys):
    assert "folder" in refused(capsys, "loss", run_file, "--results", tmp_path)


# -- train -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--checkpoint-every", "0"), ("--checkpoint-every", "-2"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.1"),
    ("--lr", "0"), ("--warmup", "-5"), ("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--log-spaced", "0"),
    ("--steps", "0"), ("--steps", "-3"), ("--batch-size", "-1"), ("--optimizer", "lbfgs"), ("--schedule", "linear"),
    ("--loss", "hinge"), ("--momentum", "nan"), ("--weight-decay", "-1"),
])
def test_train_settings(tmp_path, capsys, flag, value):
    out = tmp_path / "r.h5"
    line = refused(capsys, "train", "-o", out, "--steps", "2", flag, value)
    assert flag in line and value in line
    assert not out.exists()


@pytest.mark.parametrize("kwargs", [{"lr": math.nan}, {"lr": -1.0}, {"steps": 0}, {"checkpoint_every": 0},
                                    {"warmup": -5}, {"grad_clip": -1.0}, {"log_spaced": 0}, {"batch_size": -1},
                                    {"optimizer": "lbfgs"}, {"schedule": "x"}, {"loss": "x"}, {"lr": "fast"},
                                    {"betas": (2.0, 3.0)}, {"model": 3}])
def test_train_config_refuses_in_python(kwargs):
    from lossatlas.train import TrainConfig

    with pytest.raises(UserError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_train_says_when_the_run_diverges(tmp_path, capsys):
    out = tmp_path / "r.h5"
    code, _, err = run(capsys, "train", "-o", out, "--model", json.dumps(TINY_MLP), "--steps", "15", "--lr", "1e4",
                       "--checkpoint-every", "5")
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lossatlas: warning: ") and "the run diverged" in lines[0]
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    code, text, _ = run(capsys, "diagnose", out, "--no-curvature", "--json")
    data = strict_loads(text)
    assert code == 0 and data["diverged"] and data["spikes"][-1]["spike"]["start"] <= step  # a signal may go first


@pytest.mark.parametrize("config", ["[1, 2]", '{"lr": "fast"}', '{"betas": [2, 3]}'])
def test_train_config_text(tmp_path, capsys, config):
    refused(capsys, "train", config, "-o", tmp_path / "r.h5", "--steps", "2")


# -- import ----------------------------------------------------------------------------------------------------------

def test_import_unknown_loss(checkpoints, tmp_path, capsys):
    line = refused(capsys, "import", checkpoints[0], "-o", tmp_path / "r.h5", "--model", json.dumps(TINY_MLP),
                   "--loss", "nosuch")
    assert "nosuch" in line and "cross_entropy" in line and "mse" in line
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("cut, match", [(0, "empty"), (0.5, "not a readable")])
def test_import_unreadable_checkpoint(checkpoints, tmp_path, capsys, cut, match):
    whole = checkpoints[0].read_bytes()
    bad = tmp_path / "ckpt_5.pt"
    bad.write_bytes(whole[: int(cut * len(whole))])  # an empty file, a cut-off copy
    line = refused(capsys, "import", bad, "-o", tmp_path / "r.h5", "--model", json.dumps(TINY_MLP))
    assert match in line and "ckpt_5.pt" in line
    assert not (tmp_path / "r.h5").exists()


def test_import_warns_about_a_nonfinite_checkpoint(checkpoints, tmp_path, capsys):
    out = tmp_path / "r.h5"
    code, _, err = run(capsys, "import", *checkpoints, "-o", out, "--model", json.dumps(TINY_MLP))
    assert code == 0 and out.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lossatlas: warning: ")
    assert f"step {NAN_STEP} holds {NAN_COUNT} non-finite values ({NAN_TENSOR}: {NAN_COUNT})" in lines[0]


# -- outputs that cannot be written ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["report"], ["plot", "training"]])
def test_output_under_a_file_or_missing_folder(run_file, tmp_path, capsys, command):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    suffix = ".html"
    for output in (blocker / f"out{suffix}", tmp_path / "missing" / f"out{suffix}"):
        line = refused(capsys, command[0], run_file, *command[1:], "-o", output)
        assert str(output.parent.name) in line


@pytest.mark.parametrize("command", [["report"], ["plot", "training"]])
def test_output_in_a_read_only_folder(run_file, tmp_path, capsys, monkeypatch, command):
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/.out.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # what a read-only folder does (also as root)
    output = tmp_path / "out.html"
    line = refused(capsys, command[0], run_file, *command[1:], "-o", output)
    assert str(output) in line and "Permission denied" in line and "permissions" in line


def test_disk_full_is_one_line_and_a_bug_is_not(tmp_path, capsys, monkeypatch):
    import lossatlas.train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r.h5"))

    monkeypatch.setattr(lossatlas.train, "train", full)
    line = refused(capsys, "train", "-o", tmp_path / "r.h5", "--steps", "2")
    assert "No space left on device" in line and "disk space" in line

    def bug(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(lossatlas.train, "train", bug)
    with pytest.raises(RuntimeError, match="internal bug"):  # exit 1 with its traceback
        main(["train", "-o", str(tmp_path / "r.h5"), "--steps", "2"])


# -- damaged run files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attr", ["model", "data", "optimizer", "attrs"])
def test_invalid_json_attribute(run_file, tmp_path, capsys, attr):
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(run_file.read_bytes())
    with h5py.File(damaged, "a") as f:
        f.attrs[attr] = "{not json"
    for command in (["info"], ["loss"], ["diagnose", "--no-curvature"]):
        line = refused(capsys, command[0], damaged, *command[1:])
        assert repr(attr) in line and "not valid JSON" in line


def test_log_names_with_slashes(tmp_path, capsys):
    path = tmp_path / "slash.h5"
    with RunWriter(path, model_spec=None) as w:
        for s in range(1, 60):
            w.log(s, {"loss": 1.0 / s, "group_loss/a/b": 2.0, "x/": 3.0})
    code, out, _ = run(capsys, "info", path, "--json")
    assert code == 0 and {"group_loss/a/b", "x/"} <= set(json.loads(out)["log_names"])
    code, out, _ = run(capsys, "diagnose", path, "--json")
    assert code == 0 and strict_loads(out)["n_steps"] == 59


def test_diagnose_without_a_loss_log(nan_run, capsys):
    assert "no loss" in refused(capsys, "diagnose", nan_run, "--no-curvature")


# -- non-finite checkpoints ------------------------------------------------------------------------------------------

def test_check_finite_names_tensors_and_counts():
    from lossatlas.finite import check_finite

    state = {"a": torch.tensor([1.0, math.nan, math.inf]), "b": torch.ones(3), "n": torch.tensor(3)}
    with pytest.raises(NonFiniteError, match=r"^x holds 2 non-finite values \(a: 2\); pass --allow-nonfinite"):
        check_finite(state, "x")
    check_finite({"b": torch.ones(3)}, "x")


@pytest.mark.parametrize("argv", [["hessian"], ["track"], ["uniformity"], ["trajectory"],
                                  ["loss"], ["sharpness"], ["interpolate", "--steps", "100", "--to-step", str(NAN_STEP)],
                                  ["hessian", "--steps", "all"]])
def test_probes_refuse_a_nonfinite_checkpoint(nan_run, tmp_path, capsys, argv):
    steps = [] if "--steps" in argv else ["--steps", str(NAN_STEP)]
    line = refused(capsys, argv[0], nan_run, *argv[1:], *steps, "--results", tmp_path / "r.h5")
    assert line == nan_message(nan_run)


def test_allow_nonfinite_computes_and_writes_strict_json(nan_run, tmp_path, capsys):
    code, out, err = run(capsys, "loss", nan_run, "--steps", "all", "--allow-nonfinite", "--json",
                         "--results", tmp_path / "r.h5")
    assert code == 0, err
    data = strict_loads(out)
    last = data["steps"][-1]
    assert last["step"] == NAN_STEP and last["values"]["loss"]["data"] is None
    assert data["nonfinite"] == {"/steps/2/values/loss/data": "nan"}
    assert all(math.isfinite(s["values"]["loss"]["data"]) for s in data["steps"][:2])


def test_track_allow_nonfinite_gives_a_nan_row(nan_run, tmp_path, capsys):
    code, out, err = run(capsys, "track", nan_run, "--top-k", "2", "--allow-nonfinite", "--json",
                         "--results", tmp_path / "r.h5")
    assert code == 0, err
    full = strict_loads(out)
    data = {k: v["data"] for k, v in full["steps"][0]["values"].items()}  # the one result's values
    assert data["steps"] == [100, 200, NAN_STEP]
    assert data["top_eigenvalues"][2] == [None, None] and data["matvecs"][2] == 0
    assert all(v is not None and v > 0 for v in data["top_eigenvalues"][0])
    values = "/steps/0/values"
    assert full["nonfinite"][f"{values}/top_eigenvalues/data/2/0"] == "nan"
    assert full["nonfinite"][f"{values}/overlap/data/0"] == "nan"
    assert data["overlap"][1] is not None and 0 <= data["overlap"][1] <= 1 + 1e-9


def test_hessian_allow_nonfinite_says_why_not(nan_run, tmp_path, capsys):
    line = refused(capsys, "hessian", nan_run, "--steps", str(NAN_STEP), "--allow-nonfinite",
                   "--results", tmp_path / "r.h5")
    assert f"{NAN_COUNT} non-finite values ({NAN_TENSOR}: {NAN_COUNT})" in line and "dropout" not in line


def test_numerical_failure_with_allow_nonfinite_is_one_line(nan_run, tmp_path, capsys):
    line = refused(capsys, "uniformity", nan_run, "--steps", str(NAN_STEP), "--allow-nonfinite",
                   "--results", tmp_path / "r.h5")
    assert "--allow-nonfinite" in line


# -- divergence in diagnose ------------------------------------------------------------------------------------------

def _log_run(path, loss):
    with RunWriter(path, model_spec=None) as w:
        for s, v in enumerate(loss, start=1):
            w.log(s, {"loss": float(v)})
    return path


@pytest.mark.parametrize("name, at", [("all_nan", 1), ("nan_from_150", 150), ("inf_at_120", 120)])
def test_diagnose_reports_divergence(tmp_path, capsys, name, at):
    s = np.arange(1, 201)
    healthy = 2.0 / np.sqrt(s)
    loss = {"all_nan": np.full(200, np.nan), "nan_from_150": np.where(s >= 150, np.nan, healthy),
            "inf_at_120": np.where(s == 120, np.inf, healthy)}[name]
    path = _log_run(tmp_path / f"{name}.h5", loss)
    code, out, err = run(capsys, "diagnose", path, "--no-curvature")
    assert code == 0, err
    assert f"diverged at step {at}" in out and "no loss spikes detected" not in out
    code, out, _ = run(capsys, "diagnose", path, "--no-curvature", "--json")
    data = strict_loads(out)
    assert data["diverged"] is True and data["spikes"][-1]["spike"]["start"] == at
    assert data["spikes"][-1]["spike"]["peak_loss"] is None
    last = len(data["spikes"]) - 1
    assert data["nonfinite"][f"/spikes/{last}/spike/peak_loss"] == ("inf" if name == "inf_at_120" else "nan")


def test_strict_json_convention():
    from lossatlas.finite import strict_json

    text = strict_json({"a": [1.0, float("nan")], "b/c": {"d": float("-inf")}, "e": np.float64("inf"), "f": 2})
    data = strict_loads(text)
    assert data == {"a": [1.0, None], "b/c": {"d": None}, "e": None, "f": 2,
                    "nonfinite": {"/a/1": "nan", "/b~1c/d": "-inf", "/e": "inf"}}
