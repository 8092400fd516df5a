"""Activation/input curvature operators against dense float64 autograd Hessians (torch.autograd.functional.hessian)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian

from lossatlas.curvature.activations import ActivationCurvatureOperator, dense, parse_wrt
from lossatlas.errors import UserError
from lossatlas.estimators import hutchinson_trace, lanczos_eigs
from lossatlas.losses import batch_loss

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data(seed: int = 1, sizes=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _brute_inputs(model, batches, loss="cross_entropy"):
    """∇²_X of L = Σ_b (n_b/N) L_b(X_b) over the stacked inputs, by one dense autograd Hessian."""
    X = torch.cat([x for x, _ in batches])
    N = X.shape[0]
    sizes = [x.shape[0] for x, _ in batches]

    def L(Xall):
        parts = torch.split(Xall, sizes)
        return sum((n / N) * batch_loss(loss, model(xb), y) for n, xb, (_, y) in zip(sizes, parts, batches))

    return hessian(L, X).reshape(X.numel(), X.numel())


def _brute_hidden(model, batches, cut: int, loss="cross_entropy"):
    """∇²_A of L over the stacked outputs A of model[:cut] (the hidden layer), the rest of the net on top."""
    head, tail = model[:cut], model[cut:]
    with torch.no_grad():
        A = torch.cat([head(x) for x, _ in batches])
    N, sizes = A.shape[0], [x.shape[0] for x, _ in batches]

    def L(Aall):
        parts = torch.split(Aall, sizes)
        return sum((n / N) * batch_loss(loss, tail(ab), y) for n, ab, (_, y) in zip(sizes, parts, batches))

    return hessian(L, A).reshape(A.numel(), A.numel()), A, tail, sizes


def test_input_hessian_equals_dense_autograd():
    model, batches = _mlp(), _data()
    op = ActivationCurvatureOperator(model, batches, "cross_entropy", wrt="inputs")
    H = _brute_inputs(model, batches)
    assert op.shape == (21, 21)
    Hop = dense(op)
    assert torch.allclose(Hop, H, rtol=0, atol=1e-12 * float(H.abs().max()))
    # block-diagonal across examples: entries coupling two different examples vanish
    ex = torch.arange(21) // 3
    assert float(H[ex[:, None] != ex[None, :]].abs().max()) == 0.0
    assert float(H.abs().max()) > 1e-3


def test_hidden_layer_hessian_and_estimators():
    model, batches = _mlp(2), _data(3, sizes=(5, 2))
    H, A, _, _ = _brute_hidden(model, batches, cut=2)  # the output of model[1] (Tanh), the hidden activation
    op = ActivationCurvatureOperator(model, batches, "cross_entropy", wrt="activations:1")
    assert torch.allclose(op.activations(), A.reshape(-1), rtol=0, atol=1e-15)
    Hop = dense(op)
    assert torch.allclose(Hop, H, rtol=0, atol=1e-12 * float(H.abs().max()))
    ev = torch.linalg.eigvalsh(H)
    top = lanczos_eigs(op, k=2, which="LA", tol=1e-10, seed=0)
    assert np.allclose(top.eigenvalues, ev.flip(0)[:2].numpy(), rtol=1e-8, atol=1e-12)
    tr = hutchinson_trace(op, 300, seed=0)
    exact = float(torch.trace(H))
    assert abs(tr.value - exact) <= 4 * tr.stderr + 1e-12
    assert scipy_matches(op, H)


def scipy_matches(op, H) -> bool:
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    return np.allclose(op.to_scipy() @ v, (H @ torch.as_tensor(v)).numpy(), rtol=1e-11, atol=1e-13)


def test_ggn_wrt_hidden_layer_and_sum_scale():
    model, batches = _mlp(4), _data(5, sizes=(3, 3))
    H_dense, A, tail, sizes = _brute_hidden(model, batches, cut=2)  # a nonlinear tail: GGN ≠ Hessian
    N = A.shape[0]
    # dense GGN: Σ_i (1/N) J_iᵀ (diag p − p pᵀ) J_i, J_i = ∂tail(a_i)/∂a_i
    G = torch.zeros(A.numel(), A.numel(), dtype=DT)
    d = A.shape[1]
    for i in range(N):
        a = A[i]
        J = torch.autograd.functional.jacobian(tail, a)
        p = torch.softmax(tail(a), dim=-1)
        G[i * d:(i + 1) * d, i * d:(i + 1) * d] = (J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / N).detach()
    op = ActivationCurvatureOperator(model, batches, "cross_entropy", wrt="activations:1", curvature="ggn")
    assert torch.allclose(dense(op), G, rtol=0, atol=1e-12 * float(G.abs().max()))
    assert float((G - H_dense).abs().max()) > 1e-4 * float(G.abs().max())  # the test tells GGN from Hessian
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-14  # PSD
    # "sum": the Hessian of Σ_i ℓ_i is N times the mean-loss Hessian
    H = dense(ActivationCurvatureOperator(model, batches, "cross_entropy", wrt="activations:3"))
    Hs = dense(ActivationCurvatureOperator(model, batches, "cross_entropy", wrt="activations:3", scale="sum"))
    assert torch.allclose(Hs, N * H, rtol=1e-12, atol=0)
    assert sizes == [3, 3]


def test_mse_input_hessian_of_linear_model_is_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    X, Y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    op = ActivationCurvatureOperator(model, [(X, Y)], "mse", wrt="inputs")
    W = model.weight.detach()
    block = (2.0 / 2) * W.T @ W / 4  # mse = mean over C outputs of squared error; mean over N = 4 examples
    assert torch.allclose(dense(op), torch.block_diag(*[block] * 4), rtol=1e-12, atol=0)


def test_model_unchanged_and_bad_input():
    model, batches = _mlp(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    op = ActivationCurvatureOperator(model, batches, wrt="activations:0")
    op @ torch.ones(op.shape[0], dtype=DT)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="no module named"):
        ActivationCurvatureOperator(model, batches, wrt="activations:nope")
    with pytest.raises(UserError, match="not understood"):
        parse_wrt("weights")
    tokens = [(torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2,)))]
    emb = nn.Sequential(nn.Embedding(3, 3), nn.Flatten(), nn.Linear(9, 3)).to(DT)
    with pytest.raises(UserError, match="floating-point"):
        _ = ActivationCurvatureOperator(emb, tokens, wrt="inputs").shape
    assert ActivationCurvatureOperator(emb, tokens, wrt="activations:0").shape == (18, 18)


def test_hessian_probe_wrt_inputs_matches_dense():
    from lossatlas.probes.hessian import HessianProbe, hessian_spectrum

    model, batches = _mlp(6), _data(7, sizes=(3, 3))
    H = _brute_inputs(model, batches)
    ev = torch.linalg.eigvalsh(H).flip(0)
    res = hessian_spectrum(model, batches, "cross_entropy", wrt="inputs", top_k=2, tol=1e-10, trace=True,
                           trace_method="hutchinson", trace_matvecs=300, dtype="float64")
    assert np.allclose(res.values["top_eigenvalues"], ev[:2].numpy(), rtol=1e-8, atol=1e-12)
    tr, se = float(res.values["trace"]), float(res.values["trace_stderr"])
    assert abs(tr - float(torch.trace(H))) <= 4 * se + 1e-12
    assert res.meta["wrt"] == "inputs" and res.meta["num_params"] == 18
    # the default leaves the parameter probe's key unchanged; other settings change it
    assert "wrt" not in HessianProbe().config() and HessianProbe(wrt="inputs").config()["wrt"] == "inputs"
    with pytest.raises(UserError, match="parameter-space parts"):
        HessianProbe(wrt="activations:1", preconditioned=True).validate()
    with pytest.raises(UserError, match="not understood"):
        HessianProbe(wrt="bogus").validate()
