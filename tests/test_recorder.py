import numpy as np
import pytest
import torch
from conftest import DIGITS, TINY_MLP

from lossatlas import models
from lossatlas.recorder import Recorder, checkpoint_schedule
from lossatlas.store import RunReader


def _train(path, steps=12, **kw):
    model = models.build_model(TINY_MLP)
    x, y = models.build_data(DIGITS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    live = {}
    with Recorder(str(path), model, opt, model_spec=TINY_MLP, data_spec=DIGITS, loss="cross_entropy", **kw) as rec:
        for step in range(1, steps + 1):
            before = [p.detach().clone() for p in model.parameters()]
            loss = torch.nn.functional.cross_entropy(model(x[:64]), y[:64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            rec.step(step, loss=loss.item(), custom=step * 2.0)
            live[step] = {
                "grads": grads, "before": before,
                "after": [p.detach().clone() for p in model.parameters()],
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "out": model(x[:32]).detach().clone(),
            }
    return live, model, x


def test_telemetry_matches_manual_norms(tmp_path):
    live, model, _ = _train(tmp_path / "r.h5", checkpoint_every=4)
    with RunReader(tmp_path / "r.h5") as r:
        log = r.log()
    names = [n for n, _ in model.named_parameters()]
    assert list(log["step"]) == list(range(1, 13))
    np.testing.assert_allclose(log["custom"], 2.0 * np.arange(1, 13))
    for i, step in enumerate(log["step"]):
        g = live[int(step)]["grads"]
        w = live[int(step)]["after"]
        gn = float(torch.sqrt(sum((t.double() ** 2).sum() for t in g)))
        assert log["grad_norm"][i] == pytest.approx(gn, rel=1e-5)
        assert log[f"grad_norm/{names[0]}"][i] == pytest.approx(float(g[0].norm()), rel=1e-5)
        assert log[f"weight_norm/{names[1]}"][i] == pytest.approx(float(w[1].norm()), rel=1e-5)
        assert log["lr"][i] == pytest.approx(1e-2)
        if step > 1:
            u = float(torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(w, live[int(step)]["before"]))))
            wn = float(torch.sqrt(sum((t.double() ** 2).sum() for t in w)))
            assert log["update_ratio"][i] == pytest.approx(u / wn, rel=1e-4)


def test_checkpoints_on_schedule_and_rebuild_exactly(tmp_path):
    live, _, x = _train(tmp_path / "r.h5", checkpoint_every=4)
    from lossatlas.analysis.runner import load_model

    with RunReader(tmp_path / "r.h5") as r:
        assert r.steps() == [4, 8, 12]
        for step in r.steps():
            ckpt = r.checkpoint(step, optimizer_state=True)
            for k, v in live[step]["state"].items():
                assert torch.equal(ckpt.state_dict()[k], v)
            assert "exp_avg_sq" in ckpt.optimizer_state["net.0.weight" if "net.0.weight" in ckpt.optimizer_state else next(iter(ckpt.optimizer_state))]
            rebuilt = load_model(r, step)
            assert torch.equal(rebuilt(x[:32]), live[step]["out"])


def test_schedules():
    assert checkpoint_schedule(steps=[3, 1]) == {1, 3}
    assert checkpoint_schedule(every=10) is None
    sched = checkpoint_schedule(log_spaced=5, max_steps=1000)
    assert sched == {0, 1, 6, 32, 178, 1000}
    with pytest.raises(ValueError, match="positive"):
        checkpoint_schedule(every=0)
    with pytest.raises(ValueError, match="max_steps"):
        checkpoint_schedule(log_spaced=5)


def test_explicit_steps(tmp_path):
    _train(tmp_path / "r.h5", steps=6, checkpoint_steps=[2, 5])
    with RunReader(tmp_path / "r.h5") as r:
        assert r.steps() == [2, 5]


@pytest.mark.parametrize("path", ["ring", "loop"])
def test_every_telemetry_path_logs_the_same_norms(tmp_path, monkeypatch, path):
    """The C pass (the CPU default), the ring buffer (accelerators) and the per-tensor loop (several
    devices) log the same numbers."""
    from lossatlas.norms import NormRing

    torch.manual_seed(0)
    _train(tmp_path / "default.h5", steps=6)
    tracker = {"ring": lambda params: NormRing(params), "loop": lambda params: None}[path]
    monkeypatch.setattr("lossatlas.recorder.norm_tracker", tracker)
    torch.manual_seed(0)
    _train(tmp_path / f"{path}.h5", steps=6)
    with RunReader(tmp_path / "default.h5") as a, RunReader(tmp_path / f"{path}.h5") as b:
        default_log, other_log = a.log(), b.log()
    keys = [k for k in default_log if "norm" in k or "ratio" in k]
    assert len(keys) > 6
    for k in keys:
        np.testing.assert_allclose(other_log[k], default_log[k], rtol=1e-5, equal_nan=True, err_msg=k)
