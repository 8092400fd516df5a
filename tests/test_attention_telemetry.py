"""Per-head attention telemetry (MaxLogit and entropy) against brute-force recomputation from q and k.

The reference recomputes q, k from the attention module's weights and its hooked input with plain
float64 tensor algebra, and takes the max and the entropy query by query in Python loops over the keys
each query may see (causal, and not padded), independently of ``AttentionHeadMonitor``'s vectorized
reduction.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.analysis.diagnose import diagnose_log
from lossatlas.models.gpt import GPT, GPTConfig
from lossatlas.recorder import Recorder
from lossatlas.store import RunReader
from lossatlas.telemetry import AttentionHeadMonitor, head_array

DT = torch.float64
transformers = pytest.importorskip("transformers")


def _brute(q: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor | None = None):
    """Per-head (max logit, mean entropy) of q, k (B, H, T, d) over causal (and ``keep`` (B, T)) keys."""
    B, H, T, _ = q.shape
    mx, ent = [], []
    for h in range(H):
        best, total, rows = -math.inf, 0.0, 0
        for b in range(B):
            for i in range(T):
                js = [j for j in range(i + 1) if keep is None or bool(keep[b, j])]
                if not js:
                    continue
                z = [float(q[b, h, i] @ k[b, h, j]) * scale for j in js]
                best = max(best, max(z))
                m = max(z)
                w = [math.exp(v - m) for v in z]
                s = sum(w)
                total += -sum((x / s) * math.log(x / s) for x in w if x > 0)
                rows += 1
        mx.append(best)
        ent.append(total / rows)
    return np.array(mx), np.array(ent)


def _row(mon: AttentionHeadMonitor, layer: int):
    out = mon.collect()
    H = mon.heads[layer]
    return (np.array([out[f"attn_max_logit/layer{layer}/head{h}"] for h in range(H)]),
            np.array([out[f"attn_entropy/layer{layer}/head{h}"] for h in range(H)]))


def _capture_input(module: nn.Module, store: dict, key: str = "x"):
    def pre(m, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach()
        store["kwargs"] = kwargs
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _check_unchanged(model, call):
    """Outputs and gradients with and without the monitor are bitwise equal."""
    out0 = call()
    g0 = torch.autograd.grad(out0.sum(), [p for p in model.parameters()], allow_unused=True)
    mon = AttentionHeadMonitor(model)
    out1 = call()
    g1 = torch.autograd.grad(out1.sum(), [p for p in model.parameters()], allow_unused=True)
    mon.close()
    assert torch.equal(out0, out1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))


def test_reference_gpt_per_head_matches_brute_force():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, qk_layernorm=True)).to(DT)
    for p in model.parameters():  # larger weights: logits of order 1, entropies well below log T
        nn.init.normal_(p, std=0.7)
    idx = torch.randint(0, 11, (3, 6))
    mon = AttentionHeadMonitor(model)
    assert mon.layers == ["blocks.0.attn", "blocks.1.attn"] and mon.heads == [2, 2]
    got = {}
    attn = model.blocks[1].attn
    h = _capture_input(attn, got)
    model(idx)
    h.remove()
    x = got["x"]
    q, k = attn._heads(attn.q_proj(x)), attn._heads(attn.k_proj(x))
    q, k = attn.q_ln(q), attn.k_ln(k)
    mx_ref, ent_ref = _brute(q.detach(), k.detach(), 1 / math.sqrt(4))
    mx, ent = _row(mon, 1)
    assert np.allclose(mx, mx_ref, rtol=1e-12, atol=0) and np.allclose(ent, ent_ref, rtol=1e-12, atol=0)
    assert mon.collect() == {}  # reset after collect
    # the future keys hold larger logits here: the test would see them if the causal mask were ignored
    z_all = (q @ k.transpose(-2, -1)).detach() / 2
    assert not np.allclose(z_all.amax(dim=(0, 2, 3)).numpy(), mx, rtol=1e-6)
    mon.close()
    _check_unchanged(model, lambda: model(idx))


def _tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=13, n_positions=8,
                                  scale_attn_by_inverse_layer_idx=True, attn_implementation="eager",
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model


def test_gpt2_per_head_matches_brute_force_with_padding():
    model = _tiny_gpt2()
    idx = torch.randint(0, 13, (2, 5))
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # right padding: keys 3, 4 of example 1 masked
    mon = AttentionHeadMonitor(model)
    assert mon.layers == ["transformer.h.0.attn", "transformer.h.1.attn"]
    attn = model.transformer.h[1].attn
    got = {}
    h = _capture_input(attn, got)
    model(idx, attention_mask=pad)
    h.remove()
    W, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()  # Conv1D: x @ W + b
    qkv = got["x"] @ W + b
    q, k = qkv[..., :8], qkv[..., 8:16]
    q, k = q.view(2, 5, 2, 4).transpose(1, 2), k.view(2, 5, 2, 4).transpose(1, 2)
    scale = 4 ** -0.5 / 2  # 1/√d_h and 1/(layer_idx + 1)
    mx_ref, ent_ref = _brute(q, k, scale, keep=pad)
    mx, ent = _row(mon, 1)
    assert np.allclose(mx, mx_ref, rtol=1e-12, atol=0) and np.allclose(ent, ent_ref, rtol=1e-12, atol=0)
    # without honouring the padding the entropy would differ
    _, ent_nopad = _brute(q, k, scale)
    assert not np.allclose(ent, ent_nopad, rtol=1e-6)
    mon.close()
    _check_unchanged(model, lambda: model(idx, attention_mask=pad).logits)


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


def test_llama_gqa_rope_per_head_matches_brute_force():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                                   intermediate_size=8, vocab_size=13, attn_implementation="eager",
                                   max_position_embeddings=16)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(cfg).to(DT).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    idx = torch.randint(0, 13, (2, 6))
    mon = AttentionHeadMonitor(model)
    assert mon.heads == [4, 4]
    attn = model.model.layers[0].self_attn
    got = {}
    h = _capture_input(attn, got)
    model(idx)
    h.remove()
    x, (cos, sin) = got["x"], got["kwargs"]["position_embeddings"]
    q = (x @ attn.q_proj.weight.detach().T).view(2, 6, 4, 4).transpose(1, 2)
    k = (x @ attn.k_proj.weight.detach().T).view(2, 6, 2, 4).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k[:, [0, 0, 1, 1]]  # query heads 0, 1 share key head 0; 2, 3 share key head 1
    mx_ref, ent_ref = _brute(q, k, 4 ** -0.5)
    mx, ent = _row(mon, 0)
    assert np.allclose(mx, mx_ref, rtol=1e-12, atol=0) and np.allclose(ent, ent_ref, rtol=1e-12, atol=0)
    mon.close()
    _check_unchanged(model, lambda: model(idx).logits)


def test_recorder_logs_per_head_columns(tmp_path):
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 11, (4, 6))
    seen = []
    with Recorder(str(tmp_path / "r.h5"), model, opt, attention_heads=True, telemetry=False) as rec:
        brute = AttentionHeadMonitor(model)  # a second monitor on the same forwards: the same numbers
        for step in range(1, 4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1))
            loss.backward()
            opt.step()
            seen.append(brute.collect())
            rec.step(step, loss=loss.item())
        brute.close()
    with RunReader(tmp_path / "r.h5") as r:
        log = r.log()
    arr = head_array(log, "attn_max_logit")
    ent = head_array(log, "attn_entropy")
    assert arr.shape == (3, 2, 2) and ent.shape == (3, 2, 2)
    for t in range(3):
        for i in range(2):
            for h in range(2):
                assert arr[t, i, h] == seen[t][f"attn_max_logit/layer{i}/head{h}"]
                assert ent[t, i, h] == seen[t][f"attn_entropy/layer{i}/head{h}"]
    assert np.all(ent > 0) and np.all(ent <= math.log(6) + 1e-6)


def test_diagnose_blames_a_head_whose_max_logit_grew():
    N, spike = 400, 300
    rng = np.random.default_rng(0)
    t = np.arange(1, N + 1)
    log = {"step": t, "loss": (3.0 * (1 + t / 30) ** -0.4 + 0.5) * np.exp(0.02 * rng.standard_normal(N)),
           "lr": np.full(N, 1e-3)}
    for h in range(3):
        log[f"attn_max_logit/layer1/head{h}"] = 5.0 * np.exp(0.02 * rng.standard_normal(N))
        log[f"attn_entropy/layer1/head{h}"] = 1.5 * np.exp(0.02 * rng.standard_normal(N))
    log["loss"][spike - 1: spike + 5] *= 3.0 ** (1 - np.arange(6) / 6)
    grow = np.arange(N) >= spike - 40  # head 2's MaxLogit climbs ×1.08 per step for 40 steps before the spike
    log["attn_max_logit/layer1/head2"][grow] *= 1.08 ** np.minimum(np.arange(grow.sum()), 40)
    d = diagnose_log(log)
    assert len(d.spikes) == 1
    sd = d.spikes[0]
    assert sd.cause == "attention_logit_growth" and "layer1/head2" in sd.verdict
    # an entropy collapse alone names the same cause; a rising entropy does not
    log2 = {k: v.copy() for k, v in log.items()}
    log2["attn_max_logit/layer1/head2"] = log["attn_max_logit/layer1/head1"].copy()
    log2["attn_entropy/layer1/head0"][grow] /= 1.08 ** np.minimum(np.arange(grow.sum()), 40)
    assert diagnose_log(log2).spikes[0].cause == "attention_logit_growth"
    log3 = {k: v.copy() for k, v in log2.items()}
    log3["attn_entropy/layer1/head0"] = log["attn_entropy/layer1/head0"].copy()
    log3["attn_entropy/layer1/head0"][grow] *= 1.08 ** np.minimum(np.arange(grow.sum()), 40)
    assert diagnose_log(log3).spikes[0].cause != "attention_logit_growth"
