"""Every reference model is rebuilt from its stored spec and checkpoint with outputs equal to the live model's."""

import pytest
import torch

from lossatlas import models
from lossatlas.analysis.runner import load_model
from lossatlas.batches import as_batches
from lossatlas.losses import batch_loss
from lossatlas.recorder import Recorder
from lossatlas.store import RunReader

CASES = {
    "mlp": ({"name": "mlp", "kwargs": {"widths": [64, 32, 10]}}, {"name": "digits"}, "cross_entropy"),
    "cnn": ({"name": "cnn"}, {"name": "digits"}, "cross_entropy"),
    "resnet": ({"name": "resnet"}, {"name": "digits"}, "cross_entropy"),
    "resnet_noskip": ({"name": "resnet", "kwargs": {"skip": False}}, {"name": "digits"}, "mse"),
    "gpt": ({"name": "gpt", "kwargs": {"vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16,
                                       "qk_layernorm": True}},
            {"name": "token_stream", "kwargs": {"vocab_size": 16, "block_size": 8, "n_sequences": 32}}, "cross_entropy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rebuilt_model_equals_live_model(tmp_path, case):
    model_spec, data_spec, loss_name = CASES[case]
    model = models.build_model(model_spec)
    x, y = as_batches(models.build_data(data_spec), 32)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outputs = {}
    with Recorder(str(tmp_path / "r.h5"), model, opt, model_spec=model_spec, data_spec=data_spec,
                  loss=loss_name, checkpoint_every=2) as rec:
        for step in range(1, 5):
            model.train()
            loss = batch_loss(loss_name, model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(step, loss=loss.item())
            model.eval()
            with torch.no_grad():
                outputs[step] = model(x)
    with RunReader(tmp_path / "r.h5") as reader:
        assert reader.steps() == [2, 4]
        for step in reader.steps():
            rebuilt = load_model(reader, step).eval()
            with torch.no_grad():
                assert torch.equal(rebuilt(x), outputs[step]), f"{case} step {step}"
