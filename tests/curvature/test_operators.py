"""Curvature operators against dense float64 brute force.

Ground truths: a quadratic (Hv = Av), linear softmax regression (H = GGN = Fisher ≠ empirical
Fisher), zero-residual MSE (H = GGN), and aggregation over unequal batches (7, 13, 5) equal to the
HVP on the 25 examples concatenated.

References come from reference.py, independent of the operators: the Hessian row by row of a
flat-parameter loss, the GGN from output Jacobians and the loss's Hessian in the outputs, the true
Fisher as the explicit expectation over labels, the empirical Fisher from the Jacobian of the
per-example losses. BatchNorm in train mode is referenced on a copy whose layers use batch
statistics without running stats.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.curvature import (
    AUTO_BATCHED_MIN_K,
    CURVATURES,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    make_operator,
    parameter_blocks,
)
from lossatlas.errors import UserError

import reference

DT = torch.float64
PATHS = ("double_backward", "forward_over_reverse")


close = reference.close


# ---------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, d_in=4, hidden=6, d_out=3, bn=False, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class TinyBlock(nn.Module):
    """Embedding, one causal attention head written out, LayerNorm, MLP, unembedding."""

    def __init__(self, vocab=5, d=4, T=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, d))
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, idx):  # idx (B, T)
        h = self.emb(idx)  # (B, T, d)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = q @ k.transpose(-2, -1) / math.sqrt(h.shape[-1])  # (B, T, T)
        T = idx.shape[1]
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        h = h + att @ v
        h = h + self.mlp(self.ln(h))
        return self.out(h)  # (B, T, vocab)


def _labels(n, c, g):
    return torch.randint(0, c, (n,), generator=g)


def make_case(name):
    """(model, batches, loss, mode) for a named case; batch sizes 7, 13, 5 (unequal on purpose)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sizes = (7, 13, 5)
    if name == "transformer-ce":
        model = TinyBlock().to(DT)
        batches = []
        for n in (3, 2):
            tok = torch.randint(0, 5, (n, 6), generator=g)
            batches.append((tok[:, :5], tok[:, 1:]))
        return model, batches, "cross_entropy", "eval"
    bn = name.startswith("bn")
    model = MLP(bn=bn).to(DT)
    if bn:  # non-trivial running statistics for eval mode
        model.bn.running_mean.copy_(torch.randn(6, generator=g, dtype=DT))
        model.bn.running_var.copy_(torch.rand(6, generator=g, dtype=DT) + 0.5)
        with torch.no_grad():
            model.bn.weight.copy_(1 + 0.3 * torch.randn(6, generator=g, dtype=DT))
            model.bn.bias.copy_(0.3 * torch.randn(6, generator=g, dtype=DT))
    batches = [(torch.randn(n, 4, generator=g, dtype=DT), _labels(n, 3, g)) for n in sizes]
    loss = {"mlp-ce": "cross_entropy", "mlp-mse": "mse", "mlp-half_sse": "half_sse"}.get(name, "cross_entropy")
    if loss == "half_sse":  # float targets
        batches = [(x, torch.randn(x.shape[0], 3, generator=g, dtype=DT)) for x, _ in batches]
    mode = "train" if name == "bn-train" else "eval"
    return model, batches, loss, mode


CASES = ("mlp-ce", "mlp-mse", "mlp-half_sse", "bn-eval", "bn-train", "transformer-ce")


# ---------------------------------------------------------------------------- dense references
DENSE = {"hessian": reference.hessian, "ggn": reference.ggn, "fisher": reference.fisher,
         "empirical_fisher": reference.empirical_fisher}


def dense(kind, model, batches, loss, mode, names=None, point=None):
    """The dense P×P matrix of ``kind`` by brute force (reference.py)."""
    return DENSE[kind](model, batches, loss, mode, names=names, point=point)


@functools.lru_cache(maxsize=None)
def dense_case(case, kind):
    model, batches, loss, mode = make_case(case)
    ref_kind = "ggn" if kind == "fisher" else kind  # Fisher = GGN (canonical link); checked below
    return dense(ref_kind, model, batches, loss, mode)


@pytest.mark.parametrize("case", ["bn-train", "transformer-ce"])
def test_hessian_reference_matches_finite_differences(case):
    """The dense reference itself against central differences of the gradient."""
    model, batches, loss, mode = make_case(case)
    total, theta = reference.loss_function(model, batches, loss, mode)
    grad_total = torch.func.grad(total)
    V, eps = vectors(theta.numel(), K=3), 1e-5
    Hv_fd = torch.stack([(grad_total(theta + eps * v) - grad_total(theta - eps * v)) / (2 * eps) for v in V.T], dim=1)
    close(dense_case(case, "hessian") @ V, Hv_fd, rtol=1e-6)


def vectors(P, K=4, seed=1):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------ products equal dense matrices
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", CURVATURES)
@pytest.mark.parametrize("case", CASES)
def test_matvec_and_matmat_equal_dense(case, kind, path):
    model, batches, loss, mode = make_case(case)
    op = make_operator(kind, model, batches, loss, mode=mode, path=path)
    M = dense_case(case, kind)
    V = vectors(op.num_params)
    close(op @ V, M @ V)
    close(op @ V[:, 0], M @ V[:, 0])
    assert (op @ V[:, 0]).shape == (op.num_params,)
    assert op.matvecs == 4 + 1 + 1
    assert op.shape == M.shape and op.dtype == DT
    if kind in ("hessian", "ggn", "fisher"):
        assert op.path == path  # no fallback needed for these plain-op models


@pytest.mark.parametrize("case", ["mlp-ce", "bn-eval", "transformer-ce"])
def test_fisher_is_the_expectation_over_model_labels(case):
    """Softmax CE: the explicit E_{y~p}[∇ℓ∇ℓᵀ] equals the Fisher operator (canonical link)."""
    model, batches, loss, mode = make_case(case)
    F_dense = dense("fisher", model, batches, loss, mode)
    op = FisherOperator(model, batches, loss, mode=mode)
    V = vectors(op.num_params)
    close(op @ V, F_dense @ V)
    EF = dense_case(case, "empirical_fisher")
    assert float((EF - F_dense).abs().max()) > 1e-3 * float(F_dense.abs().max())


def test_paths_agree_and_auto_runs():
    model, batches, loss, mode = make_case("mlp-mse")  # MSE through forward-over-reverse
    V = vectors(51, K=3)
    outs = {}
    for path in ("double_backward", "forward_over_reverse", "auto"):
        op = HessianOperator(model, batches, loss, path=path)
        outs[path] = op @ V
        assert op.path in PATHS
    close(outs["double_backward"], outs["forward_over_reverse"], rtol=1e-12)
    close(outs["auto"], outs["forward_over_reverse"], rtol=1e-12)
    auto = HessianOperator(model, batches, loss)
    auto @ V[:, 0]
    assert auto.path == "double_backward"  # a new bucket tries double backward first (tests/curvature/test_paths.py)
    auto @ vectors(51, K=AUTO_BATCHED_MIN_K)
    assert auto.path in ("double_backward", "forward_over_reverse")


def test_graph_cache_off_gives_the_same_products():
    model, batches, loss, mode = make_case("mlp-ce")
    V = vectors(51, K=2)
    cached = HessianOperator(model, batches, loss, path="double_backward", coalesce_examples=0)
    rebuilt = HessianOperator(model, batches, loss, path="double_backward", graph_cache_bytes=0, coalesce_examples=0)
    merged = HessianOperator(model, batches, loss, path="double_backward")  # eval mode: one batch of 25
    for _ in range(2):  # second round reuses the cached graphs
        close(cached @ V, dense_case("mlp-ce", "hessian") @ V)
        close(rebuilt @ V, dense_case("mlp-ce", "hessian") @ V)
        close(merged @ V, dense_case("mlp-ce", "hessian") @ V)
    assert len(cached._graphs) == 3 and len(rebuilt._graphs) == 0 and len(merged._graphs) == 1


# ------------------------------------------------------------------------------ ground truths
def test_quadratic_hvp_is_Av_and_matches_finite_differences():
    """L = (1/2N)||Xθ − y||² = ½θᵀAθ + bᵀθ + c with A = XᵀX/N of a chosen spectrum."""
    P = 20
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.linspace(0.1, 5.0, P, dtype=DT)) @ Q.T
    X = math.sqrt(P) * Q @ torch.diag(torch.linspace(0.1, 5.0, P, dtype=DT).sqrt()) @ Q.T  # XᵀX/N = A
    y = torch.randn(P, 1, generator=g, dtype=DT)
    model = nn.Linear(P, 1, bias=False).to(DT)
    V = vectors(P)
    for path in PATHS:
        op = HessianOperator(model, [(X[:8], y[:8]), (X[8:], y[8:])], "half_sse", path=path)
        close(op @ V, A @ V)
    # central finite difference of the gradient (cross-check)
    v = V[:, 0]
    theta = model.weight.detach()
    eps = 1e-5
    grads = []
    for s in (1, -1):
        pt = {"weight": theta + s * eps * v.reshape(1, P)}
        grads.append(HessianOperator(model, [(X, y)], "half_sse", params=pt).loss_and_gradient()[1])
    close((grads[0] - grads[1]) / (2 * eps), A @ v, rtol=1e-6)


def test_linear_softmax_regression_closed_form():
    """f = Wx: H = (1/N) Σ (diag p − p pᵀ) ⊗ x xᵀ = GGN = Fisher ≠ empirical Fisher."""
    g = torch.Generator().manual_seed(4)
    C, d, N = 3, 5, 12
    model = nn.Linear(d, C, bias=False).to(DT)
    x = torch.randn(N, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    p = (x @ model.weight.detach().T).softmax(-1)
    H = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(x[i], x[i])) for i in range(N)) / N
    V = vectors(C * d)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    for kind in ("hessian", "ggn", "fisher"):
        for path in PATHS:
            close(make_operator(kind, model, data, "cross_entropy", path=path) @ V, H @ V)
    EF = EmpiricalFisherOperator(model, data, "cross_entropy") @ V
    assert float((EF - H @ V).abs().max()) > 1e-2 * float((H @ V).abs().max())


def test_zero_residual_mse_hessian_equals_ggn():
    model, batches, _, _ = make_case("mlp-ce")
    with torch.no_grad():
        fit = [(x, model(x)) for x, _ in batches]  # targets := f(x; θ)
        off = [(x, model(x) + 0.5) for x, _ in batches]
    V = vectors(51)
    for path in PATHS:
        H = HessianOperator(model, fit, "mse", path=path) @ V
        G = GGNOperator(model, fit, "mse", path=path) @ V
        close(H, G)
        close(H, dense("hessian", model, fit, "mse", "eval") @ V)
    H_off = HessianOperator(model, off, "mse") @ V
    G_off = GGNOperator(model, off, "mse") @ V
    assert float((H_off - G_off).abs().max()) > 1e-3 * float(G_off.abs().max())


@pytest.mark.parametrize("kind", CURVATURES)
def test_aggregation_over_unequal_batches_equals_concatenated_data(kind):
    model, batches, loss, mode = make_case("mlp-ce")
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    assert whole[0][0].shape[0] == 25
    V = vectors(51)
    for path in PATHS:
        # coalesce_examples=0 keeps the three batches apart, so the n_b/N weighting itself is tested
        split = make_operator(kind, model, batches, loss, path=path, coalesce_examples=0)
        close(split @ V, make_operator(kind, model, whole, loss, path=path) @ V)


# ------------------------------------------------------------------------- API surface
def test_to_scipy_matvec_and_matmat():
    model, batches, loss, _ = make_case("mlp-ce")
    op = HessianOperator(model, batches, loss)
    A = op.to_scipy()
    V = vectors(51)
    assert A.shape == (51, 51) and A.dtype == np.float64
    np.testing.assert_allclose(A.matmat(V.numpy()), (op @ V).numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(A.matvec(V[:, 0].numpy()), (op @ V[:, 0]).numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(A @ V[:, 1].numpy(), (dense_case("mlp-ce", "hessian") @ V[:, 1]).numpy(), rtol=1e-10)


def test_flatten_unflatten_point_and_loss_and_gradient():
    model, batches, loss, _ = make_case("mlp-ce")
    op = HessianOperator(model, batches, loss)
    v = vectors(51)[:, 0]
    parts = op.unflatten(v)
    assert list(parts) == op.param_names and [t.shape for t in parts.values()] == op.param_shapes
    assert torch.equal(op.flatten(parts), v) and torch.equal(op.flatten(list(parts.values())), v)
    pt = op.point()
    assert all(torch.equal(pt[n], p.detach()) for n, p in model.named_parameters())
    L, gvec = op.loss_and_gradient()
    assert abs(L - reference.loss_value(model, batches, loss)) <= 1e-12 * abs(L)
    close(gvec, reference.gradient(model, batches, loss), rtol=1e-12)


@pytest.mark.parametrize("how", ["list", "regex", "block"])
def test_parameter_selection_gives_the_dense_sub_block(how):
    model, batches, loss, _ = make_case("mlp-ce")
    blocks = parameter_blocks(model)
    assert blocks == {"fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight", "fc2.bias"]}
    params = {"list": ["fc2.bias", "fc2.weight"], "regex": r"^fc2\.", "block": blocks["fc2"]}[how]
    op = HessianOperator(model, batches, loss, params=params)
    assert op.param_names == ["fc2.weight", "fc2.bias"] and op.num_params == 21
    H = dense_case("mlp-ce", "hessian")
    sub = H[30:, 30:]  # fc1 has 24 + 6 = 30 entries, fc2 follows
    V = vectors(21)
    close(op @ V, sub @ V)


def test_params_dict_is_another_point():
    model, batches, loss, mode = make_case("mlp-ce")
    g = torch.Generator().manual_seed(7)
    point = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    V = vectors(51)
    for path in PATHS:
        close(HessianOperator(model, batches, loss, params=point, path=path) @ V, dense("hessian", model, batches, loss, mode, point=point) @ V)
    partial = {"fc1.weight": point["fc1.weight"]}  # fc1.bias, fc2 stay at the model's values
    op = GGNOperator(model, batches, loss, params=partial)
    ref = dense("ggn", model, batches, loss, mode, names=["fc1.weight"], point=partial)
    close(op @ vectors(24), ref @ vectors(24))


def test_float64_copies_of_a_float32_model():
    model32, batches, loss, _ = make_case("mlp-ce")
    model32 = model32.float()
    b32 = [(x.float(), y) for x, y in batches]
    op = HessianOperator(model32, b32, loss, dtype=torch.float64)
    out = op @ vectors(51).float()
    assert out.dtype == torch.float64 and next(model32.parameters()).dtype == torch.float32
    ref = dense("hessian", model32.double(), [(x.double(), y) for x, y in b32], loss, "eval")
    close(out, ref @ vectors(51), rtol=1e-6)  # the inputs/params were rounded to float32 once


# -------------------------------------------------------------------- the user's model untouched
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_untouched(mode):
    model, batches, loss, _ = make_case("bn-eval")
    model.train()
    model.fc2.eval()  # a mixed set of flags must come back as it was
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in CURVATURES:
        for path in PATHS:
            op = make_operator(kind, model, batches, loss, mode=mode, path=path)
            op @ vectors(op.num_params, K=2)
            op.loss_and_gradient()
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # params and BN running stats, bitwise
    assert all(p.grad is None for p in model.parameters())


def test_dropout_in_train_mode_is_rejected():
    model = MLP(dropout=0.5).to(DT)
    data = [(torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="dropout"):
        HessianOperator(model, data, mode="train") @ vectors(51)
    # eval mode turns dropout off; the user's flag stays as it was
    model.train()
    close(HessianOperator(model, data, mode="eval") @ vectors(51), dense("hessian", model, data, "cross_entropy", "eval") @ vectors(51))
    assert model.training and model.drop.training


def test_construction_does_no_work():
    calls = []

    class Counting(MLP):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    model = Counting().to(DT)
    op = HessianOperator(model, [(torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,)))])
    assert calls == [] and op.shape == (51, 51)
    op @ vectors(51, K=1)
    assert len(calls) >= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="hinge"), "unknown loss"),
        (dict(mode="training"), "unknown mode"),
        (dict(path="reverse"), "unknown path"),
        (dict(params=["fc3.weight"]), "unknown parameter"),
        (dict(params="^nothing"), "matches no trainable parameter"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model, batches, _, _ = make_case("mlp-ce")
    kw = {"loss": "cross_entropy", **kwargs}
    with pytest.raises(ValueError, match=match):
        HessianOperator(model, batches, **kw)


def test_bad_vector_and_kind_raise():
    model, batches, loss, _ = make_case("mlp-ce")
    with pytest.raises(ValueError, match=r"shape \(51,\) or \(51, K\)"):
        HessianOperator(model, batches, loss) @ torch.ones(50, dtype=DT)
    with pytest.raises(ValueError, match="unknown curvature"):
        make_operator("kfac", model, batches, loss)
    with pytest.raises(ValueError, match="unknown blocking"):
        parameter_blocks(model, by="module")


# --------------------------------------------------------------------------- path fallbacks
class _CubeNoForwardAD(torch.autograd.Function):
    """x³ without a jvp: forward-mode AD raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class _CubeDeriv(torch.autograd.Function):
    """(x, g) ↦ 3x²g with a jvp but a backward that refuses: no double backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g):
        return 3 * x**2 * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for _CubeDeriv is not implemented")

    @staticmethod
    def jvp(ctx, x_t, g_t):
        x, g = ctx.saved_tensors
        return 6 * x * g * x_t + 3 * x**2 * g_t


class _CubeNoDoubleBackward(_CubeNoForwardAD):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeDeriv.apply(x, g)

    @staticmethod
    def jvp(ctx, x_t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * x_t


class _CubeNet(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h**3 if self.fn is None else self.fn.apply(h))


@pytest.mark.parametrize(
    "fn, requested, ran",
    [(_CubeNoForwardAD, "forward_over_reverse", "double_backward"), (_CubeNoDoubleBackward, "double_backward", "forward_over_reverse")],
)
def test_fallback_to_the_other_path(fn, requested, ran):
    torch.manual_seed(5)
    model = _CubeNet(fn).to(DT)
    plain = copy.deepcopy(model)
    plain.fn = None
    data = [(0.5 * torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,)))]
    op = HessianOperator(model, data, path=requested)
    V = vectors(op.num_params)
    close(op @ V, dense("hessian", plain, data, "cross_entropy", "eval") @ V)
    assert op.path == ran


def test_no_working_path_raises():
    class Broken(_CubeNoForwardAD):
        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return _CubeDeriv.apply(x, g)  # no double backward, and the outer op has no jvp

    torch.manual_seed(5)
    model = _CubeNet(Broken).to(DT)
    data = [(torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,)))]
    with pytest.raises(UserError, match="neither double backward nor forward-over-reverse"):
        HessianOperator(model, data) @ vectors(26)
