"""The Spike No More switches of the GPT and the condition ``diagnose`` reads from checkpoints
(Takase, Kiyono, Kobayashi, Suzuki 2023, "Spike No More: Stabilizing the Pre-training of Large Language Models")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossatlas.analysis.diagnose import diagnose_log, spike_no_more_condition
from lossatlas.models.gpt import GPT, GPTConfig, build_gpt

D = 16


def _first_block_input(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    model(idx)
    handle.remove()
    return seen["x"]


def test_default_gpt_is_unchanged_by_the_new_options():
    torch.manual_seed(0)
    a = build_gpt(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=D)
    torch.manual_seed(0)
    b = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=D, scaled_embed=False, emb_std=0.02,
                      init_std=0.02))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.emb_ln is None and a.emb_scale == 1.0


def test_scaled_embed_multiplies_the_first_block_input_by_sqrt_d():
    torch.manual_seed(1)
    plain = build_gpt(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=D)
    scaled = build_gpt(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=D, scaled_embed=True)
    scaled.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 11, (3, 6))
    x0 = (plain.tok_emb.weight[idx] + plain.pos_emb.weight[:6]).detach()  # E[idx] + P[pos] by hand
    torch.testing.assert_close(_first_block_input(plain, idx), x0, rtol=0, atol=0)
    torch.testing.assert_close(_first_block_input(scaled, idx), x0 * math.sqrt(D), rtol=1e-6, atol=1e-7)


def test_emb_layernorm_normalises_every_position():
    model = build_gpt(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=D, emb_layernorm=True)
    idx = torch.randint(0, 11, (2, 6))
    x = _first_block_input(model, idx).double()
    raw = (model.tok_emb.weight[idx] + model.pos_emb.weight[:6]).detach().double()
    v = raw.var(-1, unbiased=False)
    torch.testing.assert_close(x.mean(-1), torch.zeros(2, 6, dtype=torch.float64), atol=1e-6, rtol=0)
    # LayerNorm (gain 1, bias 0, ε = 1e-5): the variance becomes v/(v + ε) exactly
    torch.testing.assert_close(x.var(-1, unbiased=False), v / (v + 1e-5), atol=1e-5, rtol=1e-4)


def test_init_stds_follow_the_options():
    torch.manual_seed(0)
    m = build_gpt(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, emb_std=0.5, init_std=0.1)
    # sample std of 32768 (or 4096) N(0, σ²) draws is σ within ~1 %; 5 % fails on a wrong σ
    assert abs(m.tok_emb.weight.std().item() / 0.5 - 1) < 0.05
    assert abs(m.blocks[0].attn.q_proj.weight.std().item() / 0.1 - 1) < 0.05
    assert abs(m.blocks[0].mlp.proj.weight.std().item() / (0.1 / math.sqrt(4)) - 1) < 0.05


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), True])
def test_bad_std_is_refused(bad):
    with pytest.raises(ValueError, match="emb_std"):
        build_gpt(emb_std=bad)


def test_condition_matches_numpy_on_a_hand_made_state():
    g = np.random.default_rng(0)
    emb = g.normal(0, 0.02, (50, D))
    w1, w2 = g.normal(0, 0.5, (D, D)), g.normal(0, 0.1, (4 * D, D))  # pooled std ≈ 0.36 > 2·√(2/80) ≈ 0.32
    state = {"tok_emb.weight": torch.tensor(emb), "pos_emb.weight": torch.tensor(g.normal(0, 5, (6, D))),
             "blocks.0.attn.q_proj.weight": torch.tensor(w1), "blocks.0.mlp.fc.weight": torch.tensor(w2),
             "blocks.0.ln_1.weight": torch.ones(D)}
    c = spike_no_more_condition(state)
    assert c["embedding"] == "tok_emb.weight"
    assert c["embedding_std"] == pytest.approx(emb.std(), rel=1e-12)
    assert c["sublayer_std"] == pytest.approx(math.sqrt((w1.var() + w2.var()) / 2), rel=1e-12)
    assert c["small_std"] == pytest.approx(math.sqrt(2 / (5 * D)), rel=1e-12)
    assert c["violated"] == ["embedding_std", "sublayer_std"] and "Spike No More" in c["text"]
    scaled = spike_no_more_condition(state, {"scaled_embed": True})  # ×√16 = 4: 0.08, still ≪ 1
    assert scaled["embedding_std"] == pytest.approx(4 * emb.std(), rel=1e-12)
    ln = spike_no_more_condition({**state, "emb_ln.weight": torch.ones(D)})  # Embed LN satisfies it
    assert "embedding_std" not in ln["violated"]
    ok = {"tok_emb.weight": torch.tensor(g.normal(0, 1.0, (50, D))),
          "blocks.0.attn.q_proj.weight": torch.tensor(g.normal(0, 0.05, (D, D)))}
    assert spike_no_more_condition(ok)["violated"] == []
    assert spike_no_more_condition({"fc.weight": torch.zeros(3, 3)}) is None  # no embedding: no check


def test_diagnose_names_the_condition_at_the_checkpoint_before_a_spike(tmp_path):
    """A run whose loss spikes at step 120, with a vanilla GPT (emb std 0.02) checkpointed at 0 and 100."""
    from lossatlas.analysis.diagnose import diagnose
    from lossatlas.recorder import Recorder

    torch.manual_seed(0)
    model = build_gpt(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=D)
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    spec = {"name": "gpt", "kwargs": {"vocab_size": 11, "block_size": 6, "n_layer": 1, "n_head": 2, "n_embd": D}}
    with Recorder(str(path), model, model_spec=spec) as rec:
        for step in range(0, 200):
            if step in (0, 100):
                rec.checkpoint(step)
            loss = 1.0 + 0.01 * rng.standard_normal() + (3.0 if 120 <= step < 125 else 0.0)
            rec.step(step, loss=float(loss))
    d = diagnose(path)
    assert d.spikes and d.spikes[0].checkpoints["before"] == 100
    cond = d.spikes[0].conditions["spike_no_more"]
    emb_std = model.tok_emb.weight.std(unbiased=False).item()  # population std, as numpy
    assert cond["step"] == 100 and cond["embedding_std"] == pytest.approx(emb_std, rel=1e-5)
    assert "embedding_std" in cond["violated"] and "Spike No More" in d.spikes[0].verdict
    # the in-memory diagnosis (no checkpoints to read) carries no condition
    assert diagnose_log({"step": np.arange(5), "loss": np.ones(5)}).spikes == []
