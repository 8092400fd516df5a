"""The Lightning adapter, driven through a stand-in ``lightning.pytorch`` module (no Lightning install)."""

import sys
import types

import torch
from conftest import TINY_MLP

from lossatlas import models
from lossatlas.store import RunReader


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
