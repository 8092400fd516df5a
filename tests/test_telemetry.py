"""InstabilityMonitor against brute-force recomputation on the reference GPT,
and the gradient noise scale (McCandlish et al. 2018) against closed forms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.analysis import noise_scale as ns
from lossatlas.models import build_model
from lossatlas.telemetry import InstabilityMonitor, default_blocks, z_loss

GPT_SMALL = {"name": "gpt", "kwargs": {"vocab_size": 17, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}}


def _gpt(**kw):
    torch.manual_seed(0)
    spec = {"name": "gpt", "kwargs": {**GPT_SMALL["kwargs"], **kw}}
    return build_model(spec).double()


def _brute_force(model, idx):
    """Attention logits max over the causal triangle, block outputs, output logits: by hand."""
    T = idx.shape[1]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
    attn_max, act_max = {}, {}
    for i, block in enumerate(model.blocks):
        a = block.attn
        h = block.ln_1(x)
        q = a.q_proj(h).view(*h.shape[:2], a.n_head, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(*h.shape[:2], a.n_head, a.head_dim).transpose(1, 2)
        if a.q_ln is not None:
            q, k = a.q_ln(q), a.k_ln(k)
        z = q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)  # (B, nh, T, T)
        rows, cols = torch.tril_indices(T, T)
        attn_max[f"blocks.{i}"] = z[..., rows, cols].abs().max().item()
        x = block(x)
        act_max[f"blocks.{i}"] = x.abs().max().item()
    logits = model(idx)
    return attn_max, act_max, logits


@pytest.mark.parametrize("qk_layernorm", [False, True], ids=["plain", "qk_ln"])
def test_hook_values_equal_brute_force(qk_layernorm):
    model = _gpt(qk_layernorm=qk_layernorm)
    with torch.no_grad():  # make logits large and asymmetric so the causal mask matters
        for b in model.blocks:
            b.attn.q_proj.weight.mul_(8.0)
            b.attn.k_proj.weight.mul_(8.0)
    idx = torch.randint(0, 17, (3, 8), generator=torch.Generator().manual_seed(1))
    attn_ref, act_ref, logits_ref = _brute_force(model, idx)
    mon = InstabilityMonitor(model)
    out = model(idx)
    row = mon.collect()
    mon.close()
    assert torch.equal(out, logits_ref)  # the hooks change nothing
    for layer in ("blocks.0", "blocks.1"):
        assert row[f"attn_logit_max/{layer}"] == pytest.approx(attn_ref[layer], rel=1e-12)
        assert row[f"act_max/{layer}"] == pytest.approx(act_ref[layer], rel=1e-12)
    logz = torch.logsumexp(logits_ref, dim=-1)
    assert row["output_logz_mean"] == pytest.approx(logz.mean().item(), rel=1e-12)
    assert row["output_logit_max"] == pytest.approx(logits_ref.max().item(), rel=1e-12)


def test_causal_mask_excludes_future_logits():
    """The largest |logit| sits above the diagonal: the monitor must not report it."""
    model = _gpt()
    full = {}
    model.blocks[0].attn.logits_hook.register_forward_hook(lambda m, a, o: full.setdefault("z", o.detach()))
    mon = InstabilityMonitor(model)
    idx = torch.randint(0, 17, (2, 8), generator=torch.Generator().manual_seed(3))
    model(idx)
    row = mon.collect()
    mon.close()
    z = full["z"]
    upper = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)
    lower = z.abs()[..., ~upper].max().item()
    assert row["attn_logit_max/blocks.0"] == pytest.approx(lower, rel=1e-12)
    # closed form: q_i = k_j = s·u gives max logit s²/√d_h
    d_h = 8
    s = 3.0
    u = torch.ones(d_h, dtype=torch.float64) / math.sqrt(d_h)
    q = (s * u).expand(1, 1, 4, d_h)
    zz = q @ q.transpose(-2, -1) / math.sqrt(d_h)
    mon2 = InstabilityMonitor(nn.Sequential())
    hook = mon2._attention_hook("attn_logit_max/x")
    hook(None, (), zz)
    assert mon2.collect()["attn_logit_max/x"] == pytest.approx(s**2 / math.sqrt(d_h), rel=1e-12)


def test_max_over_forwards_and_reset():
    model = _gpt()
    mon = InstabilityMonitor(model)
    gen = torch.Generator().manual_seed(2)
    idx1, idx2 = torch.randint(0, 17, (2, 8), generator=gen), torch.randint(0, 17, (5, 8), generator=gen)
    a1, _, l1 = _brute_force(model, idx1)
    a2, _, l2 = _brute_force(model, idx2)
    model(idx1)
    model(idx2)
    row = mon.collect()
    assert row["attn_logit_max/blocks.1"] == pytest.approx(max(a1["blocks.1"], a2["blocks.1"]), rel=1e-12)
    logz = torch.cat([torch.logsumexp(l1, -1).flatten(), torch.logsumexp(l2, -1).flatten()])
    assert row["output_logz_mean"] == pytest.approx(logz.mean().item(), rel=1e-12)
    assert mon.collect() == {}  # reset after collect, nothing seen since
    mon.close()


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_statistics_equal_formula(opt_cls):
    model = _gpt()
    opt = opt_cls(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    mon = InstabilityMonitor(model, opt)
    idx = torch.randint(0, 17, (4, 8), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        opt.zero_grad()
        out = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(out.reshape(-1, 17), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        row = mon.collect()
    mon.close()
    vs, us = [], []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        v_hat = st["exp_avg_sq"] / (1 - 0.95**t)
        vs.append(st["exp_avg_sq"].flatten())
        us.append((st["exp_avg"] / (1 - 0.9**t) / (v_hat.sqrt() + 1e-8)).flatten())
    v, u = torch.cat(vs), torch.cat(us)
    assert row["adam_v_max"] == pytest.approx(v.max().item(), rel=1e-6)
    assert row["adam_v_mean"] == pytest.approx(v.mean().item(), rel=1e-6)
    assert row["adam_update_rms"] == pytest.approx(u.pow(2).mean().sqrt().item(), rel=1e-5)
    assert row["adam_update_max"] == pytest.approx(u.abs().max().item(), rel=1e-5)
    assert 0.0 <= row["adam_eps_frac"] < 1.0


def test_sgd_gives_no_adam_values_and_groups_are_checked():
    model = _gpt()
    mon = InstabilityMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), groups=["easy", "hard"])
    row = mon.collect(group_losses={"easy": 0.5, "hard": 2.0})
    assert row == {"group_loss/easy": 0.5, "group_loss/hard": 2.0}
    with pytest.raises(ValueError, match="unknown data group 'other'"):
        mon.collect(group_losses={"other": 1.0})
    mon.close()


def test_hooks_removed_on_close_and_model_untouched():
    model = _gpt()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    with InstabilityMonitor(model) as mon:
        assert n_hooks() == 2 + 2 + 1  # 2 attention logits, 2 blocks, the output
        model(torch.zeros(1, 8, dtype=torch.long))
    assert n_hooks() == 0
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="closed"):
        mon.collect()
    assert default_blocks(model) == ["blocks.0", "blocks.1"]
    with pytest.raises(ValueError, match="no module named 'nope'"):
        InstabilityMonitor(model, blocks=["nope"])


def test_z_loss_closed_form():
    """z-loss: logits with logsumexp c give 1e-4·c²; a constant shift moves log Z by that constant."""
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)) + 2.5  # log Z = 2.5
    assert z_loss(logits).item() == pytest.approx(1e-4 * 2.5**2, rel=1e-12)
    assert z_loss(logits + 1.0).item() == pytest.approx(1e-4 * 3.5**2, rel=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        z_loss(logits, -1.0)


# -- gradient noise scale ----------------------------------------------------------
def test_two_batch_estimator_recovers_known_noise():
    """g_i = G + ξ_i, ξ_i ~ N(0, (T/D) I), D = 20, T = tr Σ = 30; B_small 8, B_big 128, 2·10⁴ reps."""
    rng = np.random.default_rng(0)
    D, T, reps, bs, bb = 20, 30.0, 20000, 8, 128
    G = rng.standard_normal(D)
    G *= 2.0 / np.linalg.norm(G)  # |G|² = 4, B_simple = 7.5
    # the mean of B iid N(0, s²I) noises is N(0, s²/B I): sample batch means directly
    small = G + rng.standard_normal((reps, D)) * math.sqrt(T / D / bs)
    big = G + rng.standard_normal((reps, D)) * math.sqrt(T / D / bb)
    est = ns.noise_scale_from_norms((small**2).sum(1), (big**2).sum(1), bs, bb)
    assert est.grad_sq == pytest.approx(4.0, rel=0.02)
    assert est.trace_sigma == pytest.approx(T, rel=0.02)
    assert est.b_simple == pytest.approx(T / 4.0, rel=0.02)
    with pytest.raises(ValueError, match="b_small < b_big"):
        ns.noise_scale_from_norms([1.0], [1.0], 8, 8)


def test_noise_scale_on_linear_regression_closed_form():
    """y = xᵀw* + σε, x ~ N(0, I_D), ℓ = (xᵀw − y)², at w = w* + δ:
    G = 2δ, Σ = 4(|δ|² + σ²) I + 4 δδᵀ, so B_simple = (D(|δ|² + σ²) + |δ|²)/|δ|²."""
    torch.manual_seed(0)
    D, N, sigma = 4, 40000, 0.5
    w_star = torch.randn(D, dtype=torch.float64)
    delta = torch.tensor([0.6, -0.3, 0.2, 0.4], dtype=torch.float64)
    x = torch.randn(N, D, dtype=torch.float64)
    y = (x @ w_star + sigma * torch.randn(N, dtype=torch.float64)).unsqueeze(1)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta).unsqueeze(0))
    d2 = float(delta @ delta)
    expected = (D * (d2 + sigma**2) + d2) / d2
    batches = [(x[i:i + 5000], y[i:i + 5000]) for i in range(0, N, 5000)]
    est = ns.gradient_noise_scale(model, batches, "mse")
    assert est.grad_sq == pytest.approx(4 * d2, rel=0.05)
    assert est.trace_sigma == pytest.approx(4 * (D * (d2 + sigma**2) + d2), rel=0.03)
    assert est.b_simple == pytest.approx(expected, rel=0.06)
    assert est.b_simple != pytest.approx(expected, rel=1e-6)  # an estimate, not the formula
    assert model.training  # untouched


def test_per_example_estimator_matches_dense_computation():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((50, 6)) + 0.3
    est = ns.noise_scale_per_example(g)
    mean = g.mean(0)
    tr = ((g - mean) ** 2).sum() / 49
    assert est.trace_sigma == pytest.approx(tr, rel=1e-12)
    assert est.grad_sq == pytest.approx(mean @ mean - tr / 50, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        ns.noise_scale_per_example(g[:1])
