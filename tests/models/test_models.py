"""lossatlas.models: the spec registry, the reference architectures and the no-download data sets.

References: dense float64 finite differences for double backward, closed forms for parameter
counts, modular arithmetic (p² equations, each (a, b) once; division drops b = 0) and mixture means,
exact module structure for the ResNet skip switch (Li et al. 2018) and GPT's qk-layernorm / z-loss
(Wortsman et al. 2023).
"""

from __future__ import annotations

import json
import math
import random
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from lossatlas.batches import as_batches
from lossatlas.errors import UserError
from lossatlas.losses import batch_loss
from lossatlas.models import (
    DATASETS,
    MODELS,
    build_data,
    build_model,
    normalize_spec,
    register_data,
    register_model,
    spec_fingerprint,
)
from lossatlas.models.datasets import markov_transitions, mixture_means

# Every registered model with data its defaults fit (a new model must be added here).
MATCHING_DATA = {
    "mlp": {"name": "digits"},
    "cnn": {"name": "digits"},
    "resnet": {"name": "digits"},
    "gpt": {"name": "token_stream"},
    "modular_mlp": {"name": "modular_arithmetic"},
}


def small_batch(data_spec: dict, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_batches(build_data(data_spec), limit=n)[0]
    return (x.double() if x.is_floating_point() else x), y


def rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_rng_unchanged(before: tuple) -> None:
    after = rng_states()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]


# ---------------------------------------------------------------------------------------------
# Models: build, forward, determinism, double backward


def test_every_registered_model_has_matching_data():
    assert set(MODELS) >= set(MATCHING_DATA)
    assert set(MATCHING_DATA) >= {"mlp", "cnn", "resnet", "gpt"}
    assert {"digits", "gaussian_mixture", "modular_arithmetic", "token_stream"} <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(MATCHING_DATA))
def test_model_builds_with_defaults_and_runs_on_matching_data(name):
    model = build_model({"name": name})
    x, y = as_batches(build_data(MATCHING_DATA[name]), limit=5)[0]
    out = model(x)
    assert torch.isfinite(out).all()
    loss = batch_loss("cross_entropy", out, y)  # the output shape fits the targets
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(MATCHING_DATA))
def test_same_spec_same_weights_and_global_rng_untouched(name):
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    before = rng_states()
    a = build_model({"name": name})
    b = build_model(json.dumps({"name": name, "seed": 0}))
    c = build_model({"name": name, "seed": 1})
    assert_rng_unchanged(before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if k.endswith("weight") and sa[k].ndim > 1]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)


def test_seed_in_kwargs_equals_seed_at_top():
    a = build_model({"name": "mlp", "seed": 5})
    b = build_model({"name": "mlp", "kwargs": {"seed": 5}})
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _hvp_double_backward(model, params, x, y, v):
    params = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    loss = batch_loss("cross_entropy", functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((g * v[k]).sum() for g, k in zip(grads, params))
    return dict(zip(params, torch.autograd.grad(dot, list(params.values()))))


def _grad_at(model, params, x, y):
    params = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    loss = batch_loss("cross_entropy", functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


# Smooth activations: finite differences straddle ReLU kinks (many units sit within 1e-5 of one).
SMOOTH_CASES = {
    "mlp": {"name": "mlp", "kwargs": {"widths": [64, 12, 10], "activation": "tanh"}},
    "cnn": {"name": "cnn", "kwargs": {"channels": [3, 4], "activation": "gelu"}},
    "resnet": {"name": "resnet", "kwargs": {"widths": [4, 6], "activation": "gelu"}},
    "gpt": {"name": "gpt", "kwargs": {"n_layer": 1, "n_embd": 16, "n_head": 2, "qk_layernorm": True}},
    "modular_mlp": {"name": "modular_mlp", "kwargs": {"p": 113, "width": 6}},
}
# Default (ReLU) activations: forward-over-reverse and reverse-over-reverse agree exactly.
GRAD_CASES = {
    "mlp": {"name": "mlp", "kwargs": {"widths": [64, 12, 10]}},
    "cnn": {"name": "cnn", "kwargs": {"channels": [3, 4]}},
    "resnet": {"name": "resnet", "kwargs": {"widths": [4, 6]}},
    "gpt": {"name": "gpt", "kwargs": {"n_layer": 1, "n_embd": 16, "n_head": 2, "qk_layernorm": True}},
    "modular_mlp": {"name": "modular_mlp", "kwargs": {"p": 113, "width": 6}},
}


@pytest.mark.parametrize("name", sorted(SMOOTH_CASES))
def test_double_backward_matches_finite_differences(name):
    model = build_model(SMOOTH_CASES[name]).double()  # train mode: BatchNorm uses batch statistics
    x, y = small_batch(MATCHING_DATA[name], n=6)
    if name == "gpt":
        x, y = x[:, :8], y[:, :8]
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    hv = _flat(_hvp_double_backward(model, params, x, y, v))
    eps = 1e-5
    plus = _flat(_grad_at(model, {k: p + eps * v[k] for k, p in params.items()}, x, y))
    minus = _flat(_grad_at(model, {k: p - eps * v[k] for k, p in params.items()}, x, y))
    fd = (plus - minus) / (2 * eps)
    assert hv.norm() > 0
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_forward_over_reverse_hvp_matches_double_backward(name):
    model = build_model(GRAD_CASES[name]).double().eval()  # BN buffers must not update under torch.func
    x, y = small_batch(MATCHING_DATA[name], n=4)
    if name == "gpt":
        x, y = x[:, :8], y[:, :8]
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}

    def loss(p):
        return batch_loss("cross_entropy", functional_call(model, p, (x,)), y)

    _, hv_fwd = jvp(grad(loss), (params,), (v,))
    hv_rev = _hvp_double_backward(model, params, x, y, v)
    assert torch.allclose(_flat(hv_fwd), _flat(hv_rev), rtol=1e-9, atol=1e-11)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_parameter_counts():
    widths = [64, 128, 128, 10]
    mlp = build_model({"name": "mlp"})
    assert _count(mlp) == sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))  # 26,122
    assert abs(_count(mlp) - 26_000) < 1_000
    cnn = build_model({"name": "cnn"})
    # conv 3×3 layers (c_in·9 + 1)·c_out, two 2× poolings: 8×8 → 2×2 before the classifier
    chans = [1, 16, 32, 64]
    expected = sum((a * 9 + 1) * b for a, b in zip(chans[:-1], chans[1:])) + (64 * 2 * 2 + 1) * 10
    assert _count(cnn) == expected
    assert abs(_count(cnn) - 25_000) < 1_500
    assert _count(build_model({"name": "mlp", "kwargs": {"widths": [5, 3], "bias": False}})) == 15


def test_mlp_and_cnn_accept_flat_and_image_inputs():
    x, _ = small_batch({"name": "digits"})
    for name in ("mlp", "cnn", "resnet"):
        model = build_model({"name": name}).double().eval()
        assert torch.allclose(model(x), model(x.reshape(-1, 1, 8, 8)), atol=1e-12)
    with pytest.raises(ValueError, match="image_size"):
        build_model({"name": "cnn"})(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="input features"):
        build_model({"name": "mlp"})(torch.zeros(2, 63))


# ---------------------------------------------------------------------------------------------
# ResNet skip switch (Li et al. 2018, "Visualizing the loss landscape of neural nets")


def test_resnet_skip_false_has_no_shortcut_modules():
    with_skip = build_model({"name": "resnet", "kwargs": {"widths": [4, 8]}})
    no_skip = build_model({"name": "resnet", "kwargs": {"widths": [4, 8], "skip": False}})
    assert [n for n, _ in with_skip.named_modules() if n.endswith("shortcut")] == ["stages.0.0.shortcut", "stages.1.0.shortcut"]
    assert isinstance(with_skip.stages[0][0].shortcut, nn.Identity)
    assert not any("shortcut" in n for n, _ in no_skip.named_modules())
    # the projection shortcut (1×1 conv + BN) is the only parameter difference
    assert _count(with_skip) - _count(no_skip) == 4 * 8 + 2 * 8


@pytest.mark.parametrize("skip", [True, False])
def test_resnet_block_with_zeroed_residual_branch(skip):
    """bn2 weight = bias = 0 kills a block's residual branch: it maps x ≥ 0 to relu(x) = x with skips, 0 without."""
    model = build_model({"name": "resnet", "kwargs": {"widths": [6], "blocks_per_stage": 2, "skip": skip}}).double()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    for k in params:
        if k.startswith("stages.0.1.bn2."):
            params[k] = torch.zeros_like(params[k])
    seen = {}
    handle = model.stages[0][1].register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    try:
        x, _ = small_batch({"name": "digits"})
        functional_call(model, params, (x,))
    finally:
        handle.remove()
    assert seen["inp"].abs().sum() > 0
    expected = seen["inp"] if skip else torch.zeros_like(seen["inp"])
    assert torch.allclose(seen["out"], expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# GPT: causality, qk-layernorm, z-loss, last-token logits (Wortsman et al. 2023, arXiv 2309.14322)


def test_gpt_is_causal():
    model = build_model({"name": "gpt", "kwargs": {"n_layer": 2, "n_embd": 16, "n_head": 2}}).double()
    x, _ = small_batch({"name": "token_stream"}, n=3)
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 64
    a, b = model(x), model(x2)
    assert a.shape == (3, 32, 64)
    assert torch.allclose(a[:, :20], b[:, :20], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-6)


def _attention_logits(model, x, params=None):
    seen = []
    handle = model.blocks[0].attn.logits_hook.register_forward_hook(lambda m, inp, out: seen.append(out))
    try:
        functional_call(model, params or dict(model.named_parameters()), (x,))
    finally:
        handle.remove()
    return seen[0]


def test_gpt_qk_layernorm_adds_layernorms_and_makes_logits_scale_free():
    kw = {"n_layer": 2, "n_embd": 16, "n_head": 2}
    plain = build_model({"name": "gpt", "kwargs": kw}).double()
    normed = build_model({"name": "gpt", "kwargs": {**kw, "qk_layernorm": True}}).double()
    names = {n for n, m in normed.named_modules() if isinstance(m, nn.LayerNorm)}
    plain_names = {n for n, m in plain.named_modules() if isinstance(m, nn.LayerNorm)}
    assert names - plain_names == {f"blocks.{i}.attn.{q}_ln" for i in range(2) for q in "qk"}
    x, _ = small_batch({"name": "token_stream"}, n=2)
    x = x[:, :10]
    for model, ratio in ((plain, 100.0), (normed, 1.0)):
        params = {k: p.detach() for k, p in model.named_parameters()}

        def scaled(c, params=params):
            return {k: (c * p if ".attn.q_proj." in k or ".attn.k_proj." in k else p) for k, p in params.items()}

        # q and k both ×10 more: plain logits ×100; LayerNormed q, k are scale-invariant (scales ≥ 10
        # keep LN's eps = 1e-5 negligible next to the variance of the init-scale queries)
        base, big = _attention_logits(model, x, scaled(10.0)), _attention_logits(model, x, scaled(100.0))
        assert base.shape == (2, 2, 10, 10) and base.abs().max() > 1e-2
        assert torch.allclose(big, ratio * base, rtol=1e-4, atol=1e-8)


def test_gpt_z_loss_and_last_token_only():
    kw = {"vocab_size": 14, "block_size": 3, "n_layer": 1, "n_embd": 8, "n_head": 2}
    full = build_model({"name": "gpt", "kwargs": {**kw, "z_loss": 1e-4}}).double()
    last = build_model({"name": "gpt", "kwargs": {**kw, "z_loss": 1e-4, "last_token_only": True}}).double()
    assert full.z_loss == 1e-4
    x, y = build_data({"name": "modular_arithmetic", "kwargs": {"p": 13}})
    logits = full(x[:5])
    assert logits.shape == (5, 3, 14)
    assert torch.equal(last(x[:5]), logits[:, -1])  # same seed ⇒ same weights
    log_z = torch.log(torch.exp(logits).sum(dim=-1))
    assert torch.allclose(full.z_loss_penalty(logits), 1e-4 * (log_z**2).mean(), rtol=1e-12)
    assert torch.isfinite(batch_loss("cross_entropy", last(x[:5]), y[:5]))
    with pytest.raises(ValueError, match="block_size"):
        full(torch.zeros(1, 4, dtype=torch.long))


def test_modular_mlp_shapes_formula_and_output_scale():
    """f(a, b) = (α/√N) W_out (E_a[a] + E_b[b])² (Gromov 2023); α scales the output (Kumar et al. 2024)."""
    x, y = build_data({"name": "modular_arithmetic", "kwargs": {"p": 11}})
    model = build_model({"name": "modular_mlp", "kwargs": {"p": 11, "width": 7}}).double()
    scaled = build_model({"name": "modular_mlp", "kwargs": {"p": 11, "width": 7, "alpha": 3.0}}).double()
    assert x.shape[1] == 3 and model(x).shape == (x.shape[0], 11)
    assert _count(model) == 2 * 11 * 7 + 7 * 11
    h = model.embed_a.weight[x[:, 0]] + model.embed_b.weight[x[:, 1]]
    assert torch.allclose(model(x), (h**2) @ model.readout.weight.T / math.sqrt(7), rtol=1e-12)
    assert torch.allclose(scaled(x), 3.0 * model(x), rtol=1e-12)  # same seed ⇒ same weights
    assert torch.equal(model(x), model(x[:, :2]))  # the "=" token is ignored
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="activation"):
        build_model({"name": "modular_mlp", "kwargs": {"activation": "tanh"}})


@pytest.mark.parametrize("activation", ["quadratic", "relu"])
def test_modular_mlp_trace_ntk_matches_autograd(activation):
    """ModularMLP.trace_ntk equals Σ_c J_c J_cᵀ from per-logit autograd gradients (float64)."""
    x, _ = build_data({"name": "modular_arithmetic", "kwargs": {"p": 7, "split": "all"}})
    x = x[::5][:9]  # some pairs share a or b
    model = build_model({"name": "modular_mlp", "kwargs": {"p": 7, "width": 5, "alpha": 1.7,
                                                           "activation": activation}}).double()
    params = list(model.parameters())
    J = torch.stack([torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x[i:i + 1])[0, c], params)])
                                  for c in range(7)]) for i in range(x.shape[0])])  # (n, p, P)
    K = torch.einsum("icp,jcp->ij", J, J)
    assert K.abs().max() > 1.0
    assert torch.allclose(model.trace_ntk(x), K, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Data sets


DATA_CASES = {
    "digits": {},
    "gaussian_mixture": {"num_classes": 4, "dim": 3, "imbalance": 4.0},
    "modular_arithmetic": {"p": 23},
    "token_stream": {"n_sequences": 16, "block_size": 8},
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_data_is_deterministic_and_leaves_rng_alone(name):
    before = rng_states()
    a = build_data({"name": name, "kwargs": DATA_CASES[name]})
    b = build_data({"name": name, "kwargs": DATA_CASES[name]})
    c = build_data({"name": name, "kwargs": DATA_CASES[name], "seed": 3})
    assert_rng_unchanged(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_digits_splits_and_standardization():
    raw = build_data({"name": "digits", "kwargs": {"split": "all", "standardize": False, "dtype": "float64"}})
    train = build_data({"name": "digits", "kwargs": {"standardize": False, "dtype": "float64"}})
    test = build_data({"name": "digits", "kwargs": {"split": "test", "standardize": False, "dtype": "float64"}})
    assert raw[0].shape == (1797, 64) and raw[1].dtype == torch.long
    assert test[0].shape[0] == round(0.2 * 1797) and train[0].shape[0] + test[0].shape[0] == 1797
    assert raw[0].min() >= 0 and raw[0].max() <= 16 and set(raw[1].tolist()) == set(range(10))
    # the two splits partition the data set: same multiset of (image, label) rows
    rows = lambda x, y: sorted(map(tuple, torch.cat([x, y[:, None].double()], 1).tolist()))  # noqa: E731
    assert rows(*raw) == rows(torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]]))
    xs, _ = build_data({"name": "digits", "kwargs": {"dtype": "float64"}})
    assert xs.dtype == torch.float64
    varying = train[0].std(dim=0) > 0
    assert torch.allclose(xs.mean(dim=0), torch.zeros(64, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(xs.std(dim=0)[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-10)
    xt, _ = build_data({"name": "digits", "kwargs": {"split": "test", "dtype": "float64"}})
    mean, std = train[0].mean(0), torch.where(varying, train[0].std(0), torch.ones(64, dtype=torch.float64))
    assert torch.allclose(xt, (test[0] - mean) / std, atol=1e-10)  # test set uses train statistics


@pytest.mark.parametrize("p, operation, expected_n", [(113, "add", 113**2), (97, "div", 9312), (11, "sub", 121), (11, "mul", 121)])
def test_modular_arithmetic_equations(p, operation, expected_n):
    x, c = build_data({"name": "modular_arithmetic", "kwargs": {"p": p, "operation": operation, "split": "all"}})
    assert x.shape == (expected_n, 3) and c.shape == (expected_n,)
    a, b = x[:, 0], x[:, 1]
    assert torch.all(x[:, 2] == p) and a.max() < p and b.max() < p and c.max() < p
    reference = {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p}
    if operation == "div":
        assert torch.all((c * b) % p == a) and torch.all(b != 0)
    else:
        assert torch.equal(c, reference[operation])
    assert len(set((a * p + b).tolist())) == expected_n  # every pair once


def test_modular_arithmetic_split_and_sequence_targets():
    train = build_data({"name": "modular_arithmetic"})
    test = build_data({"name": "modular_arithmetic", "kwargs": {"split": "test"}})
    assert train[0].shape[0] == 3830  # Nanda et al. 2023: p = 113, frac_train 0.3
    code = lambda x: set((x[:, 0] * 113 + x[:, 1]).tolist())  # noqa: E731
    assert not code(train[0]) & code(test[0]) and len(code(train[0]) | code(test[0])) == 113**2
    assert torch.equal(train[1], (train[0][:, 0] + train[0][:, 1]) % 113)
    x, t = build_data({"name": "modular_arithmetic", "kwargs": {"p": 7, "target": "sequence"}})
    assert t.shape == x.shape
    assert torch.equal(t[:, :2], x[:, 1:]) and torch.equal(t[:, 2], (x[:, 0] + x[:, 1]) % 7)


def test_gaussian_mixture_counts_means_and_split():
    means = mixture_means(3, 5, 2.0)
    assert torch.allclose(torch.cdist(means, means)[~torch.eye(3, dtype=torch.bool)], torch.full((6,), 2.0, dtype=torch.float64))
    ring = mixture_means(6, 2, 1.5)
    assert torch.allclose((ring - ring.roll(1, 0)).norm(dim=1), torch.full((6,), 1.5, dtype=torch.float64))
    spec = {"num_classes": 3, "dim": 5, "separation": 2.0, "noise_std": 0.1, "imbalance": [50, 30, 20], "dtype": "float64"}
    x, y = build_data({"name": "gaussian_mixture", "kwargs": {**spec, "split": "all"}})
    assert x.shape == (100, 5) and torch.bincount(y).tolist() == [50, 30, 20]
    for k in range(3):
        # class mean within 5 standard errors of μ_k (se = 0.1/√n_k per coordinate)
        assert (x[y == k].mean(0) - means[k]).abs().max() < 5 * 0.1 / math.sqrt((y == k).sum())
    _, y_test = build_data({"name": "gaussian_mixture", "kwargs": {**spec, "split": "test"}})
    assert torch.bincount(y_test).tolist() == [10, 6, 4]  # stratified: round(0.2·n_k)
    _, y_ratio = build_data({"name": "gaussian_mixture", "kwargs": {"num_classes": 3, "n_per_class": 40, "imbalance": 4.0, "split": "all"}})
    assert torch.bincount(y_ratio).tolist() == [40, 20, 10]
    _, y_total = build_data({"name": "gaussian_mixture", "kwargs": {"num_classes": 3, "n": 10, "split": "all"}})
    assert torch.bincount(y_total).tolist() == [4, 3, 3]


def test_token_stream_follows_its_markov_chain():
    x, t = build_data({"name": "token_stream", "kwargs": {"vocab_size": 20, "block_size": 12, "n_sequences": 50, "branching": 3}})
    assert x.shape == t.shape == (50, 12) and x.dtype == torch.long
    assert torch.equal(t[:, :-1], x[:, 1:])
    probs = markov_transitions(20, 3, torch.Generator().manual_seed(0))  # the chain of seed 0
    assert torch.allclose(probs.sum(1), torch.ones(20, dtype=torch.float64)) and torch.all((probs > 0).sum(1) == 3)
    assert torch.all(probs[x, t] > 0)  # every step is an allowed transition
    xt, _ = build_data({"name": "token_stream", "kwargs": {"vocab_size": 20, "block_size": 12, "n_sequences": 50, "branching": 3, "split": "test"}})
    assert not torch.equal(x, xt) and torch.all(probs[xt[:, :-1], xt[:, 1:]] > 0)


# ---------------------------------------------------------------------------------------------
# Specs: canonical form, fingerprint, user factories, registration, errors


def test_normalize_spec_canonical_form_and_fingerprint():
    canon = normalize_spec('{"name": "mlp", "kwargs": {"widths": [64, 10], "seed": 2}}')
    assert canon == {"name": "mlp", "kwargs": {"widths": [64, 10]}, "seed": 2}
    assert normalize_spec({"name": "mlp", "kwargs": {"widths": (64, 10)}, "seed": 2}) == canon
    assert json.loads(json.dumps(canon)) == canon
    assert normalize_spec(canon) == canon  # idempotent
    fp = spec_fingerprint(canon)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert spec_fingerprint({"seed": 2, "kwargs": {"widths": [64, 10]}, "name": "mlp"}) == fp
    assert spec_fingerprint({"name": "mlp"}) == spec_fingerprint({"name": "mlp", "kwargs": {}, "seed": 0})
    assert spec_fingerprint({"name": "mlp", "kwargs": {"widths": [64, 11]}, "seed": 2}) != fp
    assert spec_fingerprint({"name": "mlp", "kwargs": {"widths": [64, 10]}, "seed": 3}) != fp


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build_net(width=4, seed=None):
        net = nn.Linear(3, width)
        net.seen_seed = seed
        return net

    class Factories:
        @staticmethod
        def data(n=5, seed=0):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)

    def loader(n=4):
        return [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)) for _ in range(n // 2)]

    def not_a_model():
        return 42

    def buggy(width=1):
        return len(width)  # raises TypeError inside the factory

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "lossatlas_user_factories.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lossatlas_user_factories"


def test_user_factories_build_models_and_data(user_module):
    net = build_model({"factory": f"{user_module}:build_net", "kwargs": {"width": 7}, "seed": 4})
    assert isinstance(net, nn.Linear) and net.out_features == 7 and net.seen_seed == 4
    again = build_model({"factory": f"{user_module}:build_net", "kwargs": {"width": 7, "seed": 4}})
    assert torch.equal(net.weight, again.weight)
    x, y = build_data({"factory": f"{user_module}:Factories.data", "kwargs": {"n": 6}, "seed": 2})
    g = torch.Generator().manual_seed(2)
    assert torch.equal(x, torch.randn(6, 3, generator=g)) and y.shape == (6,)
    batches = build_data({"factory": f"{user_module}:loader"})
    assert len(as_batches(batches)) == 2


def test_register_model_and_data_decorators():
    try:

        @register_model("tiny_test_model")
        def tiny(width: int = 2) -> nn.Module:
            return nn.Linear(2, width)

        @register_data("tiny_test_data")
        def tiny_data(seed: int = 0):
            return torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)

        assert build_model({"name": "tiny_test_model", "kwargs": {"width": 5}}).out_features == 5
        assert build_data({"name": "tiny_test_data"})[0].shape == (3, 2)
        with pytest.raises(TypeError, match="registered twice"):
            register_model("tiny_test_model")(lambda: nn.Linear(1, 1))
    finally:
        MODELS.pop("tiny_test_model", None)
        DATASETS.pop("tiny_test_data", None)


BAD_MODEL_SPECS = [
    (["mlp"], r"spec must be a dict"),
    ("{name: mlp}", r"spec is not valid JSON"),
    ({"name": "mlp", "factory": "a.b:c"}, r"both of 'name' and 'factory'; give exactly one"),
    ({"kwargs": {}}, r"neither of 'name' and 'factory'; give exactly one"),
    ({"name": "mlp", "kwarg": {}}, r"unknown spec key\(s\) 'kwarg'; allowed keys: name, factory, kwargs, seed"),
    ({"name": "mlp", "kwargs": [64, 10]}, r"'kwargs' must be a dict"),
    ({"name": "mlp", "kwargs": {"widths": torch.zeros(2)}}, r"'kwargs' must hold only JSON values"),
    ({"name": "mlp", "seed": -1}, r"'seed' must be a non-negative integer"),
    ({"name": "mlp", "seed": 1.5}, r"'seed' must be a non-negative integer"),
    ({"name": "mlp", "seed": 1, "kwargs": {"seed": 2}}, r"two seeds .* keep one"),
    ({"name": ""}, r"'name' must be a non-empty string"),
    ({"name": "mpl"}, r"unknown model 'mpl' \(did you mean 'mlp'\?\); known model names: cnn, gpt, mlp, modular_mlp, resnet"),
    ({"name": "mlp", "kwargs": {"width": [3, 2]}}, r"bad kwargs for model 'mlp': .*'width'.*accepted kwargs: widths, activation, bias"),
    ({"name": "mlp", "kwargs": {"activation": "swish"}}, r"model 'mlp' rejected its kwargs: unknown activation 'swish'; choose one of"),
    ({"factory": "no_colon_here"}, r"'factory' must look like 'package.module:function'"),
    ({"factory": "pkg.mod:fn:x"}, r"'factory' must look like 'package.module:function'"),
    ({"factory": "lossatlas_no_such_module_xyz:build"}, r"cannot import module 'lossatlas_no_such_module_xyz' .*ModuleNotFoundError.*sys.path"),
]


@pytest.mark.parametrize("spec, match", BAD_MODEL_SPECS, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD_MODEL_SPECS)])
def test_malformed_model_spec_raises_user_error(spec, match):
    with pytest.raises(UserError, match=match):
        build_model(spec)


BAD_FACTORY_SPECS = [
    ("missing", "model", r"module 'lossatlas_user_factories' has no attribute 'missing'"),
    ("NOT_CALLABLE", "model", r"factory 'lossatlas_user_factories:NOT_CALLABLE' is a int, not a callable"),
    ("not_a_model", "model", r"returned int; it must return a torch.nn.Module"),
    ("not_a_model", "data", r"returned int; it must return an \(inputs, targets\) pair"),
    ("buggy", "model", r"model 'lossatlas_user_factories:buggy' rejected its kwargs: .*len\(\)"),
    ("build_net", "data", r"returned Linear; it must return an \(inputs, targets\) pair"),
]


@pytest.mark.parametrize("attr, kind, match", BAD_FACTORY_SPECS, ids=[f"{a}-{k}" for a, k, _ in BAD_FACTORY_SPECS])
def test_bad_user_factory_raises_user_error(user_module, attr, kind, match):
    build = build_model if kind == "model" else build_data
    with pytest.raises(UserError, match=match):
        build({"factory": f"{user_module}:{attr}"})


def test_unknown_data_name_lists_known_names():
    with pytest.raises(UserError, match=r"unknown data 'mnist'.*known data names: digits, gaussian_mixture, modular_arithmetic, token_stream"):
        build_data({"name": "mnist"})
    with pytest.raises(UserError, match=r"data 'digits' rejected its kwargs: unknown split 'val'; choose one of train, test, all"):
        build_data({"name": "digits", "kwargs": {"split": "val"}})


# ---------------------------------------------------------------------------------------------
# Specs mean what they say: the seed only when given; a factory beside the run file is found

SEEDED_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def data(n=6, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)

    def net(seed=7):
        model = nn.Linear(3, 2)
        model.seen_seed = seed
        return model
    """
)


def _seeded_pair(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_factory_without_seed_keeps_its_own_default(tmp_path, monkeypatch):
    (tmp_path / "lossatlas_seeded_factories.py").write_text(SEEDED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {"factory": "lossatlas_seeded_factories:data"}
    x, y = build_data(spec)
    x1, y1 = _seeded_pair(1)
    assert torch.equal(x, x1) and torch.equal(y, y1)  # the factory's def data(seed=1), not seed 0
    x0, _ = build_data({**spec, "seed": 0})
    assert torch.equal(x0, _seeded_pair(0)[0]) and not torch.equal(x0, x1)
    x3, _ = build_data({**spec, "kwargs": {"seed": 3}})
    assert torch.equal(x3, _seeded_pair(3)[0])
    assert build_model({"factory": "lossatlas_seeded_factories:net"}).seen_seed == 7
    assert build_model({"factory": "lossatlas_seeded_factories:net", "seed": 2}).seen_seed == 2
    # the canonical form says which: no seed key without one, so the fingerprints of the two differ
    assert normalize_spec(spec) == {"factory": "lossatlas_seeded_factories:data", "kwargs": {}}
    assert normalize_spec(normalize_spec(spec)) == normalize_spec(spec)
    assert spec_fingerprint(spec) != spec_fingerprint({**spec, "seed": 0})
    assert spec_fingerprint({**spec, "seed": 0}) == spec_fingerprint({**spec, "kwargs": {"seed": 0}})
    # a factory without a seed still builds identically every time (global RNG seeded with 0 inside)
    a, b = build_model({"factory": "lossatlas_seeded_factories:net"}), build_model({"factory": "lossatlas_seeded_factories:net"})
    assert torch.equal(a.weight, b.weight)


def test_registered_names_keep_seed_zero_and_their_fingerprints():
    assert normalize_spec({"name": "digits"})["seed"] == 0
    assert spec_fingerprint({"name": "digits"}) == spec_fingerprint({"name": "digits", "seed": 0})
    x, _ = build_data({"name": "gaussian_mixture"})
    x0, _ = build_data({"name": "gaussian_mixture", "seed": 0})
    x1, _ = build_data({"name": "gaussian_mixture", "seed": 1})
    assert torch.equal(x, x0) and not torch.equal(x, x1)


def test_factory_beside_the_run_file_is_found_without_pythonpath(tmp_path, monkeypatch):
    from lossatlas.analysis.runner import load_data, load_model
    from lossatlas.store import RunReader, RunWriter

    project = tmp_path / "project"
    project.mkdir()
    (project / "lossatlas_beside_run.py").write_text(SEEDED_MODULE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the working directory nor sys.path holds the module
    assert not any(str(project) == p for p in __import__("sys").path)
    net = nn.Linear(3, 2)
    run = project / "run.h5"
    with RunWriter(run, model_spec={"factory": "lossatlas_beside_run:net"},
                   data_spec={"factory": "lossatlas_beside_run:data"}, loss="cross_entropy") as w:
        w.write_checkpoint(0, dict(net.named_parameters()))
    with pytest.raises(UserError, match="cannot import module 'lossatlas_beside_run'"):
        build_model({"factory": "lossatlas_beside_run:net"})  # the caller's own spec: no run file, no folder
    with RunReader(run) as reader:
        model = load_model(reader, 0, trust_factory=True)
        assert torch.equal(model.weight, net.weight) and model.seen_seed == 7
        (x, y), = load_data(reader.data_spec, trust_factory=True)[0]
    assert torch.equal(x, _seeded_pair(1)[0])  # the factory's own default seed, as the spec says
    assert str(project) not in __import__("sys").path  # the folder was only added while building
