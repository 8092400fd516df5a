"""Massive activations and attention sinks: exact recovery of a planted massive dimension and a planted sink head.

References: (i) a GPT whose block 1 MLP output bias holds 1000 in feature j: every token is massive in feature j from
layer 1 on (the residual stream carries it), none at layer 0; (ii) a head whose logits get +60 on key 0: its
attention on the first token is 1 to 1e-12, the unmodified heads sit far below 0.5; (iii) brute-force
recomputation of the sink mass from the model's own attention (Hugging Face GPT-2, eager attention).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.models.gpt import build_gpt
from lossatlas.probes.base import ProbeContext
from lossatlas.probes.massive_activations import MassiveActivations, massive_mask, sink_mass


class PlantSink(nn.Module):
    """Adds ``boost`` to the logits of head ``head`` on key 0 (a planted attention sink)."""

    def __init__(self, head: int, boost: float) -> None:
        super().__init__()
        self.head, self.boost = head, boost

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[:, self.head, :, 0] += self.boost
        return out


def planted_gpt(dim: int = 5, sink: tuple[int, int] = (1, 2)) -> nn.Module:
    torch.manual_seed(0)
    model = build_gpt(vocab_size=32, block_size=16, n_layer=3, n_head=4, n_embd=32)
    with torch.no_grad():
        model.blocks[1].mlp.proj.bias[dim] = 1000.0  # planted massive feature from layer 1 on
    model.blocks[sink[0]].attn.logits_hook = PlantSink(sink[1], 60.0)
    return model.eval()


def test_massive_mask_closed_form():
    h = torch.ones(2, 4, 8)
    h[0, 0, 3] = 150.0  # massive: 150 ≥ 100·1 and ≥ 100
    h[1, 2, 5] = 99.0  # ratio 99 < 100: not massive
    mask, median = massive_mask(h)
    assert median == 1.0
    assert mask.sum() == 1 and bool(mask[0, 0, 3])
    mask, _ = massive_mask(h, ratio=50.0, min_value=50.0)
    assert mask.sum() == 2


def test_sink_mass_brute_force():
    a = torch.softmax(torch.randn(2, 3, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -torch.inf), -1)
    expected = torch.stack([torch.stack([a[b, h, 1:, 0] for b in range(2)]).mean() for h in range(3)])
    torch.testing.assert_close(sink_mass(a), expected.to(torch.float64))


def test_planted_gpt_exact_recovery():
    model = planted_gpt()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    res = MassiveActivations().run(ProbeContext(model=model, data=[(x, x)]))
    v = res.values
    expected = np.zeros((3, 32), dtype=bool)
    expected[1:, 5] = True
    np.testing.assert_array_equal(v["massive_dims"], expected)
    np.testing.assert_array_equal(v["layer_num_massive"], [0, 4 * 16, 4 * 16])  # every token, one feature
    sinks = np.zeros((3, 4), dtype=bool)
    sinks[1, 2] = True
    np.testing.assert_array_equal(v["sink_heads"], sinks)
    assert v["sink_mass"][1, 2] == pytest.approx(1.0, abs=1e-12)
    assert np.delete(v["sink_mass"].ravel(), 1 * 4 + 2).max() < 0.4
    assert int(v["num_sink_heads"]) == 1 and int(v["num_massive_layers"]) == 2
    assert v["layer_first_token_share"][1] == pytest.approx(1 / 16)


def test_hf_gpt2_matches_brute_force():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(2))
    res = MassiveActivations(ratio=2.0, min_value=0.0).run(ProbeContext(model=model, data=[({"input_ids": ids}, ids)]))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    brute = np.stack([a[:, :, 1:, 0].double().mean(dim=(0, 2)).numpy() for a in out.attentions])
    np.testing.assert_allclose(res.values["sink_mass"], brute, rtol=1e-12)
    for li, h in enumerate(out.hidden_states[1:]):
        a = h.abs().double()
        mask = (a >= 2.0 * a.flatten().median())
        np.testing.assert_array_equal(res.values["massive_dims"][li], mask.reshape(-1, 16).any(0).numpy())
        assert res.values["layer_max_abs"][li] == pytest.approx(float(a.max()))


def test_bad_settings():
    with pytest.raises(ValueError):
        MassiveActivations(sink_threshold=1.5).validate()
    with pytest.raises(ValueError):
        MassiveActivations(max_batches=0).validate()
    with pytest.raises(ValueError):
        MassiveActivations().run(ProbeContext(model=nn.Linear(3, 3), data=[(torch.zeros(2, 3), torch.zeros(2))]))
