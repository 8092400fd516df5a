import json

import h5py
import pytest
import torch
from conftest import TINY_MLP

from lossatlas.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_info_json(tiny_run, capsys):
    code, out, _ = run(capsys, "info", str(tiny_run), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["checkpoints"] == 5 and info["steps"] == [0, 20]
    assert info["writer_attached"] is False
    assert "grad_norm" in info["log_names"] and info["log_rows"] == 20


def test_probe_json_and_cache(tiny_run, capsys):
    code, out, _ = run(capsys, "loss", str(tiny_run), "--steps", "0:20:10", "--json")
    assert code == 0
    data = json.loads(out)
    assert [s["step"] for s in data["steps"]] == [0, 10, 20]
    assert data["steps"][0]["values"]["loss"]["data"] > data["steps"][-1]["values"]["loss"]["data"]
    code, out, _ = run(capsys, "loss", str(tiny_run), "--steps", "0:20:10", "--json")
    assert [s["status"] for s in json.loads(out)["steps"]] == ["cached"] * 3
    results = data["results"]
    code, out, _ = run(capsys, "info", results, "--json")  # a results file: its entries
    summary = json.loads(out)
    assert code == 0 and summary["kind"] == "results" and summary["entries"] == 3
    assert [(r["probe"], r["steps"], r["partial"]) for r in summary["results"]] == [("loss", [0, 10, 20], 0)]
    assert summary["results"][0]["label"] == "loss" and summary["results"][0]["settings"] == {}
    code, out, _ = run(capsys, "info", results)
    assert code == 0 and "3 (1 probe settings)" in out and "steps 0 … 20 (3)" in out


def test_no_subcommand_prints_usage_and_one_error_line(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "usage: lossatlas" in out
    assert "no subcommand given" in one_line_error(err)


def test_a_refused_command_prints_no_warning_before_its_error(tiny_run, capsys, monkeypatch):
    import warnings

    from lossatlas.errors import UserError
    from lossatlas.probes.loss import Loss

    def warn_then_refuse(self, ctx):
        warnings.warn("something odd", stacklevel=1)
        raise UserError("refused")

    monkeypatch.setattr(Loss, "run", warn_then_refuse)
    code, _, err = run(capsys, "loss", str(tiny_run), "--force")
    assert code == 2 and one_line_error(err) == "lossatlas: error: refused"


@pytest.mark.parametrize("argv, match", [
    (["info", "missing.h5"], "no such file"),
    (["loss", "RUN", "--steps", "7"], "step 7 is not in the run"),
    (["loss", "RUN", "--steps", "x:y"], "malformed step selection"),
    (["loss", "RUN", "--mode", "bogus"], "unknown mode 'bogus'; choose one of eval, train"),
    (["info", "TEXT"], "not an HDF5 file|not a lossatlas|not HDF5"),
    (["import", "CKPT", "-o", "NEW", "--model", '{"name": "nonexistent_net"}'], "nonexistent_net"),
    (["import", "CKPT", "-o", "NEW", "--model", '{"name": "mlp", "kwargs": {"widths": [64, 32, 10]}}'], "shape mismatch"),
    (["import", "CKPT", "-o", "RUN", "--model", json.dumps(TINY_MLP)], "--force"),
    (["train", "-o", "NEW", "--optimizer", "lbfgs"], "unknown optimizer"),
    (["nonsense-command"], "invalid choice"),
])
def test_bad_input_exit_2(tiny_run, tmp_path, capsys, argv, match):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    ckpt = tmp_path / "ckpt_1.pt"
    from lossatlas import models

    torch.save(models.build_model(TINY_MLP).state_dict(), ckpt)
    before = tiny_run.read_bytes()
    subst = {"RUN": str(tiny_run), "TEXT": str(text), "CKPT": str(ckpt), "NEW": str(tmp_path / "new.h5")}
    code, _, err = run(capsys, *[subst.get(a, a) for a in argv])
    assert code == 2
    import re

    assert re.search(match, one_line_error(err))
    assert tiny_run.read_bytes() == before  # nothing the user wrote is touched


def test_train_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "r.h5"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "train", "-o", str(out), "--steps", "2")
    assert code == 2 and "--force" in one_line_error(err)
    assert out.read_bytes() == b"precious"


def test_train_then_import_end_to_end(tmp_path, capsys):
    run_path = tmp_path / "r.h5"
    code, out, _ = run(capsys, "train", "-o", str(run_path), "--model", json.dumps(TINY_MLP), "--data", "digits",
                       "--steps", "6", "--checkpoint-every", "3", "--batch-size", "0", "--optimizer", "adam", "--lr", "0.01")
    assert code == 0
    with h5py.File(run_path, "r") as f:
        assert f.attrs["lossatlas_format"] == "run"
    code, out, _ = run(capsys, "loss", str(run_path), "--steps", "all")
    assert code == 0 and out.count("step ") == 3
