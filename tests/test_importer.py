import os

import pytest
import torch
from conftest import TINY_MLP
from safetensors.torch import save_file

from lossatlas import models
from lossatlas.errors import UserError
from lossatlas.importer import import_checkpoints, load_state_dict, step_from_name
from lossatlas.store import RunReader


@pytest.fixture
def state():
    return models.build_model(TINY_MLP).state_dict()


@pytest.mark.parametrize("layout", ["plain", "lightning", "nanogpt_compiled", "ddp", "safetensors"])
def test_layouts_round_trip(tmp_path, state, layout):
    if layout == "plain":
        path = tmp_path / "ckpt_100.pt"
        torch.save(state, path)
    elif layout == "lightning":
        path = tmp_path / "epoch=3-step=100.ckpt.pth"
        torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, path)
    elif layout == "nanogpt_compiled":
        path = tmp_path / "ckpt_100.pt"
        torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}, "iter_num": 100,
                    "optimizer": {"state": {}, "param_groups": []}}, path)
    elif layout == "ddp":
        path = tmp_path / "ckpt_100.pth"
        torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "ckpt_100.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    out = tmp_path / "run.h5"
    steps = import_checkpoints([path], out, model_spec=TINY_MLP, step_pattern=r"step=(\d+)" if layout == "lightning" else None)
    assert steps == [100]
    with RunReader(out) as r:
        assert r.steps() == [100]
        back = r.checkpoint(100).state_dict()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "ckpt_5.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()


def test_step_from_name():
    assert step_from_name("run/ckpt_0001200.pt") == 1200
    assert step_from_name("epoch=3-step=500.ckpt", r"step=(\d+)") == 500
    with pytest.raises(UserError, match="no step number"):
        step_from_name("final.pt")
    with pytest.raises(UserError, match="does not match"):
        step_from_name("final.pt", r"step=(\d+)")


def test_mismatched_spec_names_keys(tmp_path, state):
    path = tmp_path / "ckpt_1.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"shape mismatch .*stored \(16, 64\) vs model \(32, 64\)"):
        import_checkpoints([path], tmp_path / "r.h5", model_spec={"name": "mlp", "kwargs": {"widths": [64, 32, 10]}})
    assert not (tmp_path / "r.h5").exists()  # a refused import leaves no half-written run behind


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt_1.pt"
    path.write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_state_dict(path)
    path2 = tmp_path / "ckpt_2.pt"
    torch.save({"epoch": 3}, path2)
    with pytest.raises(UserError, match="no state_dict found"):
        load_state_dict(path2)
