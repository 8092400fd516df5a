"""``lossatlas import --log`` (CSV, JSONL, TensorBoard, trainer_state.json) and optimizer state in checkpoints.

References: the log rows written here (read back exactly, float32-rounded for TensorBoard, which stores
float32 scalars); the optimizer state torch itself holds after real Adam/SGD steps, keyed by the
parameter each tensor belongs to (``optimizer.state[p]``), against what the run file stores by name.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_MLP

from lossatlas import models
from lossatlas.cli import main
from lossatlas.errors import UserError
from lossatlas.importer import import_checkpoints, log_name, read_log
from lossatlas.store import RunReader

STEPS = [0, 10, 20]
ROWS = [{"step": s, "loss": 2.3 / (1 + 0.1 * s), "lr": 0.1 * 0.5 ** (s // 10), "grad_norm": 1.0 + s / 100,
         "accuracy": s / 40} for s in range(0, 21)]


@pytest.fixture
def ckpts(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(TINY_MLP)
    paths = []
    for s in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp_path / f"ckpt_{s}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
    return paths


def _expected(name):
    return np.array([r[name] for r in ROWS])


def _check_log(run, names=("loss", "lr", "grad_norm", "accuracy"), cast=float):
    with RunReader(run) as r:
        log = r.log()
        assert log["step"].tolist() == [row["step"] for row in ROWS]
        for name in names:
            np.testing.assert_array_equal(log[name], [cast(v) for v in _expected(name)], err_msg=name)
        # each checkpoint carries the lr logged at or before its step
        for s in STEPS:
            assert r.checkpoint_attrs(s)["lr"] == cast(ROWS[s]["lr"])


def test_csv_log_arrives_in_the_run_and_diagnose_reads_it(tmp_path, ckpts, capsys):
    log = tmp_path / "metrics.csv"
    lines = ["step,loss,lr,grad_norm,accuracy,phase"] + [
        f"{r['step']},{r['loss']!r},{r['lr']!r},{r['grad_norm']!r},{r['accuracy']!r},train" for r in ROWS]
    log.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run.h5"
    code = main(["import", *ckpts, "-o", str(run), "--model", json.dumps(TINY_MLP), "--data", '{"name": "digits"}',
                 "--loss", "cross_entropy", "--log", str(log)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "with the log of" in out and "phase" in err  # the text column is named as left out
    _check_log(run)
    with RunReader(run) as r:
        assert "phase" not in r.log_names()
    assert main(["diagnose", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    figure = tmp_path / "training.svg"
    assert main(["plot", str(run), "training", "-o", str(figure)]) == 0, capsys.readouterr().err
    assert figure.stat().st_size > 1000


def test_diagnose_without_a_log_says_how_to_add_one(tmp_path, ckpts, capsys):
    run = tmp_path / "run.h5"
    assert main(["import", *ckpts, "-o", str(run), "--model", json.dumps(TINY_MLP)]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--log" in err


def test_jsonl_with_common_spellings_merges_rows_of_one_step(tmp_path, ckpts):
    log = tmp_path / "log.jsonl"
    lines = []
    for r in ROWS:  # loss and lr logged in separate rows of the same step, under other names
        lines.append(json.dumps({"global_step": r["step"], "train/loss": r["loss"], "train/grad_norm": r["grad_norm"]}))
        lines.append(json.dumps({"global_step": r["step"], "learning_rate": r["lr"], "train_acc": r["accuracy"],
                                 "Val/Loss": 2 * r["loss"]}))
    log.write_text("\n".join(lines) + "\n\n")
    run = tmp_path / "run.h5"
    import_checkpoints(ckpts, run, model_spec=TINY_MLP, log=log)
    _check_log(run)
    with RunReader(run) as r:
        np.testing.assert_array_equal(r.log(["Val_Loss"])["Val_Loss"], 2 * _expected("loss"))


def test_trainer_state_json_as_log(tmp_path, ckpts):
    history = [{"step": r["step"], "loss": r["loss"], "learning_rate": r["lr"], "grad_norm": r["grad_norm"],
                "epoch": r["step"] / 20} for r in ROWS]
    history.append({"step": 20, "eval_loss": 1.5, "epoch": 1.0})
    log = tmp_path / "trainer_state.json"
    log.write_text(json.dumps({"global_step": 20, "log_history": history}))
    run = tmp_path / "run.h5"
    import_checkpoints(ckpts, run, model_spec=TINY_MLP, log=log)
    _check_log(run, names=("loss", "lr", "grad_norm"))
    with RunReader(run) as r:
        ev = r.log(["eval_loss"])
        assert ev["eval_loss"][-1] == 1.5 and np.isnan(ev["eval_loss"][:-1]).all()
    assert read_log(tmp_path) == read_log(log)  # the folder holding it reads the same


def test_tensorboard_event_file(tmp_path, ckpts):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb"
    writer = SummaryWriter(str(tb))
    for r in ROWS:
        writer.add_scalar("train/loss", r["loss"], r["step"])
        writer.add_scalar("train/learning_rate", r["lr"], r["step"])
        writer.add_scalar("train/grad_norm", r["grad_norm"], r["step"])
        writer.add_scalar("train/acc", r["accuracy"], r["step"])
    writer.close()
    event_file = next(tb.glob("events.out.tfevents.*"))
    run = tmp_path / "run.h5"
    import_checkpoints(ckpts, run, model_spec=TINY_MLP, log=event_file)
    _check_log(run, cast=lambda v: float(np.float32(v)))  # TensorBoard keeps float32 scalars
    assert read_log(tb) == read_log(event_file)


def test_tensorboard_missing_says_pip_install(tmp_path, monkeypatch):
    event_file = tmp_path / "events.out.tfevents.123.host"
    event_file.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    with pytest.raises(UserError, match=r"needs the tensorboard package; pip install tensorboard") as info:
        read_log(event_file)
    assert "\n" not in str(info.value)


BAD_LOGS = [
    ("log.csv", "loss,lr\n1.0,0.1\n", r"no step column \(one of step, global_step"),
    ("log.csv", "step,loss\n1.5,2.0\n", r"row 1 has step '1.5', not a non-negative integer"),
    ("log.csv", "step,loss\n-3,2.0\n", r"row 1 has step '-3'"),
    ("log.jsonl", '{"step": 1, "loss": 2}\nnot json\n', r"line 2 is not JSON"),
    ("log.json", '{"step": 1}', r"a JSON log must be a list of objects"),
    ("log.csv", "step,loss\n", r"holds no numeric values with a step"),
    ("log.parquet", "x", r"unknown log format '.parquet'"),
    ("missing.csv", None, r"no such log file"),
]


@pytest.mark.parametrize("name, text, match", BAD_LOGS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_LOGS)])
def test_bad_logs_are_refused_in_one_line(tmp_path, ckpts, capsys, name, text, match):
    log = tmp_path / name
    if text is not None:
        log.write_text(text)
    run = tmp_path / "run.h5"
    assert main(["import", *ckpts, "-o", str(run), "--model", json.dumps(TINY_MLP), "--log", str(log)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not run.exists()  # refused before anything is written


def test_log_names():
    assert [log_name(n) for n in ("train/loss", "learning_rate", "train_acc", "eval/loss", "Val Loss")] == \
        ["loss", "lr", "accuracy", "eval_loss", "Val_Loss"]


# --- optimizer state inside checkpoint dicts -----------------------------------------------------------------


def _trained(opt_cls, steps=3, **kw):
    torch.manual_seed(1)
    model = models.build_model(TINY_MLP)
    opt = opt_cls(model.parameters(), **kw)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("layout", ["nanogpt", "torch_tutorial", "lightning"])
def test_optimizer_state_in_checkpoint_is_imported_by_name(tmp_path, layout):
    model, opt = _trained(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if layout == "nanogpt":
        blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 3}
    elif layout == "torch_tutorial":
        blob = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 1}
    else:
        blob = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 3}
    path = tmp_path / "ckpt_3.pt"
    torch.save(blob, path)
    run = tmp_path / "run.h5"
    import_checkpoints([path], run, model_spec=TINY_MLP)
    with RunReader(run) as r:
        stored = r.checkpoint(3, optimizer_state=True).optimizer_state
        assert r.optimizer == {"name": "AdamW", "defaults": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                               "weight_decay": 0.1}}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(stored) == sorted(names)
    for name, p in model.named_parameters():  # torch's own state of that parameter, bit for bit
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(stored[name][key], opt.state[p][key]), (name, key)
        assert float(stored[name]["step"]) == 3.0


def test_sgd_momentum_state_and_spec(tmp_path):
    model, opt = _trained(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True)
    path = tmp_path / "ckpt_3.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    run = tmp_path / "run.h5"
    import_checkpoints([path], run, model_spec=TINY_MLP)
    with RunReader(run) as r:
        stored = r.checkpoint(3, optimizer_state=True).optimizer_state
        spec = r.optimizer
    assert spec["name"] == "SGD" and spec["defaults"]["momentum"] == 0.9 and spec["defaults"]["lr"] == 0.05
    assert spec["defaults"]["nesterov"] is True
    for name, p in model.named_parameters():
        assert torch.equal(stored[name]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_optimizer_state_that_does_not_match_is_skipped_with_a_warning(tmp_path):
    model, _ = _trained(torch.optim.SGD, lr=0.1)
    params = list(model.parameters())
    partial = torch.optim.Adam(params[:2], lr=1e-3)  # an optimizer over two of the four tensors
    partial.zero_grad()
    sum(p.sum() for p in params[:2]).backward()
    partial.step()
    paths = []
    for s in (1, 2):
        paths.append(tmp_path / f"ckpt_{s}.pt")
        torch.save({"model": model.state_dict(), "optimizer": partial.state_dict()}, paths[-1])
    run = tmp_path / "run.h5"
    with pytest.warns(UserWarning, match=r"ckpt_1.pt and 1 more checkpoint\(s\): optimizer state skipped \(its 2 "
                                         r"parameter ids do not match the model's 4 parameters"):
        import_checkpoints(paths, run, model_spec=TINY_MLP)
    with RunReader(run) as r:
        assert r.checkpoint(1, optimizer_state=True).optimizer_state is None
        assert math.isclose(float(r.checkpoint(2).state_dict()[next(iter(model.state_dict()))].sum()),
                            float(next(iter(model.state_dict().values())).sum()))
