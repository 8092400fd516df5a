"""The Lightning adapter, driven through a stand-in ``lightning.pytorch`` module (and a real Trainer when installed).

References: the inner network's own state_dict and torch's optimizer state (bit for bit), and the top
Hessian eigenvalues of the dense float64 Hessian (tests/reference.py) at the recorded checkpoint.
"""

import json
import sys
import types

import pytest
import torch
from conftest import TINY_MLP

from lossatlas import models
from lossatlas.errors import UserError
from lossatlas.store import RunReader

from reference import eigenvalues, hessian


def test_callback_records_steps_and_checkpoints(tmp_path, monkeypatch):
    fake_pl = types.ModuleType("lightning.pytorch")
    fake_pl.Callback = type("Callback", (), {})
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake_pl)
    from lossatlas.lightning import RecorderCallback

    model = models.build_model(TINY_MLP)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = types.SimpleNamespace(optimizers=[opt], global_step=0)
    cb = RecorderCallback(str(tmp_path / "r.h5"), model_spec=TINY_MLP, checkpoint_every=2)
    assert isinstance(cb, fake_pl.Callback)
    cb.on_train_start(trainer, model)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, model, {"loss": loss}, (x, y), 0)
    cb.on_train_end(trainer, model)
    with RunReader(tmp_path / "r.h5") as r:
        assert r.steps() == [0, 2, 4]
        log = r.log(["loss", "grad_norm"])
    assert list(log["step"]) == [1, 2, 3, 4]
    assert log["loss"][-1] == float(loss)


# --- the recorded names are the ones the model spec loads ---------------------------------------------------

INNER = {"name": "mlp", "kwargs": {"widths": [64, 8, 10]}}


class _LitClassifier(torch.nn.Module):
    """What a LightningModule looks like to the callback: the network under ``self.model``, a loss, no tensors of its own."""

    def __init__(self):
        super().__init__()
        self.model = models.build_model(INNER)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)


def _fake_lightning(monkeypatch):
    fake_pl = types.ModuleType("lightning.pytorch")
    fake_pl.Callback = type("Callback", (), {})
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake_pl)


def _train_with_callback(path, lit, steps=3, **kwargs):
    from lossatlas.lightning import RecorderCallback

    opt = torch.optim.SGD(lit.parameters(), lr=0.05, momentum=0.9)
    trainer = types.SimpleNamespace(optimizers=[opt], global_step=0)
    cb = RecorderCallback(str(path), checkpoint_every=steps, **kwargs)
    cb.on_train_start(trainer, lit)
    data = models.build_data({"name": "digits"})
    x, y = data[0][:32], data[1][:32]
    for _ in range(steps):
        loss = lit.loss_fn(lit(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, lit, {"loss": loss}, (x, y), 0)
    cb.on_train_end(trainer, lit)
    return opt, (x, y)


def _eigenvalues_in(report):
    """Every list under a key 'eigenvalues'/'top_eigenvalues' (or its 'data') in a JSON report, wherever it nests."""
    if isinstance(report, dict):
        for k, v in report.items():
            if k in ("eigenvalues", "top_eigenvalues"):
                yield v.get("data") if isinstance(v, dict) else v
            else:
                yield from _eigenvalues_in(v)
    elif isinstance(report, list):
        for v in report:
            yield from _eigenvalues_in(v)


def test_callback_records_the_inner_module_and_hessian_runs_on_it(tmp_path, monkeypatch, capsys):
    _fake_lightning(monkeypatch)
    torch.manual_seed(0)
    lit = _LitClassifier()
    run = tmp_path / "lit.h5"
    opt, (x, y) = _train_with_callback(run, lit, model_spec=INNER, data_spec={"name": "digits"}, loss="cross_entropy")
    with RunReader(run) as r:
        assert r.attrs["lightning_module"] == "model"
        ckpt = r.checkpoint(3, optimizer_state=True)
        state = ckpt.state_dict()
        # the inner network's names and values, bit for bit, and the optimizer state under the same names
        assert sorted(state) == sorted(lit.model.state_dict())
        assert all(torch.equal(state[k], v) for k, v in lit.model.state_dict().items())
        for name, p in lit.model.named_parameters():
            assert torch.equal(ckpt.optimizer_state[name]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    from lossatlas.cli import main

    code = main(["hessian", str(run), "--steps", "3", "--top-k", "2", "--max-examples", "32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    found = [v for v in _eigenvalues_in(json.loads(out)) if isinstance(v, list) and v and isinstance(v[0], (int, float))]
    assert found, out[:500]
    dense = eigenvalues(hessian(lit.model, [(x, y)], "cross_entropy"), descending=True)[:2]
    assert found[0][:2] == pytest.approx(dense.tolist(), rel=1e-5)


def test_callback_without_spec_takes_the_only_child_and_refuses_a_spec_nothing_matches(tmp_path, monkeypatch):
    _fake_lightning(monkeypatch)
    from lossatlas.lightning import recorded_module

    lit = _LitClassifier()
    assert recorded_module(lit) == (lit.model, "model")
    assert recorded_module(lit, model_spec=INNER) == (lit.model, "model")
    assert recorded_module(lit, module=None) == (lit, "")
    assert recorded_module(lit, module="model") == (lit.model, "model")
    with pytest.raises(UserError, match="has no submodule 'net'"):
        recorded_module(lit, module="net")
    with pytest.raises(UserError, match="no part of _LitClassifier has the tensors of the model_spec's model"):
        recorded_module(lit, model_spec=TINY_MLP)
    _train_with_callback(tmp_path / "auto.h5", lit)
    with RunReader(tmp_path / "auto.h5") as r:
        assert sorted(r.checkpoint(3).state_dict()) == sorted(lit.model.state_dict())


def test_real_lightning_trainer_run_loads_into_the_inner_spec(tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")
    from lossatlas.cli import main
    from lossatlas.lightning import RecorderCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = models.build_model(INNER)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = models.build_data({"name": "digits"})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[0][:64], data[1][:64]), batch_size=32)
    run = tmp_path / "pl.h5"
    cb = RecorderCallback(str(run), model_spec=INNER, data_spec={"name": "digits"}, loss="cross_entropy",
                          checkpoint_every=2)
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Lit(), loader)
    assert main(["hessian", str(run), "--steps", "last", "--top-k", "1", "--max-examples", "32"]) == 0
