"""The dense references of reference.py against closed forms and finite differences.

Closed forms: a quadratic ½θᵀAθ (H = GGN = A, ∇L = Aθ), linear softmax regression
(H = GGN = Fisher = (1/N) Σ (diag p − p pᵀ) ⊗ x xᵀ, empirical Fisher (1/N) Σ (p − e_y)(p − e_y)ᵀ ⊗ x xᵀ),
zero-residual MSE (H = GGN), the example-weighted mean over unequal batches equal to the mean over the
data concatenated, and central differences of the gradient for every reference case.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import (
    CASE_SIZES,
    DT,
    accuracy,
    build_case,
    close,
    eigendecomposition,
    eigenvalues,
    empirical_fisher,
    fisher,
    flat_parameters,
    ggn,
    gradient,
    hessian,
    loss_value,
    trace,
    unflatten,
)


def _split(x, y, sizes):
    out, i = [], 0
    for n in sizes:
        out.append((x[i : i + n], y[i : i + n]))
        i += n
    return out


# ------------------------------------------------------------------------------------------ closed forms
def test_quadratic_gives_A():
    """L = (1/2N) Σ_i (x_iᵀθ)² = ½θᵀAθ with A = XᵀX/N of the chosen spectrum."""
    P, N = 12, 24
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    spectrum = torch.linspace(0.1, 5.0, P, dtype=DT)
    A = Q @ torch.diag(spectrum) @ Q.T
    X = torch.cat([math.sqrt(N / 2) * spectrum.sqrt()[:, None] * Q.T] * 2)  # (N, P), XᵀX/N = A
    model = nn.Linear(P, 1, bias=False).to(DT)
    batches = _split(X, torch.zeros(N, 1, dtype=DT), (7, 12, 5))  # unequal batches
    theta = model.weight.detach().reshape(-1)
    close(hessian(model, batches, "half_sse"), A)
    close(ggn(model, batches, "half_sse"), A)
    close(gradient(model, batches, "half_sse"), A @ theta)
    assert loss_value(model, batches, "half_sse") == pytest.approx(float(0.5 * theta @ A @ theta), rel=1e-12)
    lam, U = eigendecomposition(hessian(model, batches, "half_sse"))
    close(lam, spectrum)
    close(U @ torch.diag(lam) @ U.T, A)
    close(U.T @ U, torch.eye(P, dtype=DT))
    close(eigenvalues(A, descending=True), spectrum.flip(0))
    assert trace(A) == pytest.approx(float(spectrum.sum()), rel=1e-12)


def test_linear_softmax_regression_closed_form():
    """f = Wx: H = GGN = Fisher = (1/N) Σ (diag p − ppᵀ) ⊗ xxᵀ; F_emp = (1/N) Σ (p − e_y)(p − e_y)ᵀ ⊗ xxᵀ."""
    C, d, N = 3, 4, 15
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(d, C, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, d, generator=g, dtype=DT))
    x = torch.randn(N, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    batches = _split(x, y, CASE_SIZES)
    p = (x @ model.weight.detach().T).softmax(-1)
    H = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(x[i], x[i])) for i in range(N)) / N
    r = p - F.one_hot(y, C).to(DT)
    EF = sum(torch.kron(torch.outer(r[i], r[i]), torch.outer(x[i], x[i])) for i in range(N)) / N
    close(hessian(model, batches, "cross_entropy"), H)
    close(ggn(model, batches, "cross_entropy"), H)
    close(fisher(model, batches, "cross_entropy"), H)
    close(empirical_fisher(model, batches, "cross_entropy"), EF)
    assert float((EF - H).abs().max()) > 1e-2 * float(H.abs().max())  # the two Fishers differ
    close(gradient(model, batches, "cross_entropy"), sum(torch.kron(r[i], x[i]) for i in range(N)) / N)
    ce = -float(torch.log(p[torch.arange(N), y]).mean())
    assert loss_value(model, batches, "cross_entropy") == pytest.approx(ce, rel=1e-12)


def test_accuracy_counts_argmax_hits():
    """Identity weights on one-hot inputs predict the input's class: 4 of the 6 labels agree."""
    model = nn.Linear(3, 3, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, dtype=DT))
    x = torch.eye(3, dtype=DT)[[0, 1, 2, 0, 1, 2]]
    y = torch.tensor([0, 1, 2, 0, 2, 1])
    assert accuracy(model, _split(x, y, (4, 2))) == pytest.approx(4 / 6)


# ------------------------------------------------------------------------------------------ every case
def test_hessian_matches_finite_differences(reference_case):
    c = reference_case
    H = hessian(c.model, c.batches, c.loss)
    theta = flat_parameters(c.model)
    V = torch.randn(theta.numel(), 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    eps = 1e-5

    def grad_at(t):
        return gradient(c.model, c.batches, c.loss, point=unflatten(c.model, t))

    fd = torch.stack([(grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps) for v in V.T], dim=1)
    close(H @ V, fd, rtol=1e-6)


def test_zero_residual_mse_hessian_equals_ggn(reference_case):
    c = reference_case
    with torch.no_grad():
        fit = [(x, c.model(x)) for x, _ in c.batches]  # targets := f(x; θ)
    close(hessian(c.model, fit, "mse"), ggn(c.model, fit, "mse"), rtol=1e-10)
    off = [(x, t + 0.5) for x, t in fit]  # a residual: the term Σ r ∇²f appears
    H, G = hessian(c.model, off, "mse"), ggn(c.model, off, "mse")
    assert float((H - G).abs().max()) > 1e-3 * float(G.abs().max())


def test_fisher_equals_ggn_and_is_psd(reference_case):
    """Canonical link / Gaussian likelihood: the true Fisher is the GGN; both PSD; F_emp is not F."""
    c = reference_case
    G = ggn(c.model, c.batches, c.loss)
    close(fisher(c.model, c.batches, c.loss), G)
    assert float(eigenvalues(G)[0]) >= -1e-12 * float(eigenvalues(G)[-1])
    EF = empirical_fisher(c.model, c.batches, c.loss)
    assert float((EF - G).abs().max()) > 1e-3 * float(G.abs().max())


def test_unequal_batches_weigh_by_examples(reference_case):
    """Σ_b n_b mean_b(ℓ)/N over batches of 7, 5, 3 equals the plain mean over the concatenated data."""
    c = reference_case
    x = torch.cat([b[0] for b in c.batches])
    y = torch.cat([b[1] for b in c.batches])
    whole = [(x, y)]
    with torch.no_grad():
        out = c.model.eval()(x)
    rows, labels = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    plain = F.cross_entropy(rows, labels) if c.loss == "cross_entropy" else F.mse_loss(
        rows, F.one_hot(labels, rows.shape[-1]).to(DT))
    assert loss_value(c.model, c.batches, c.loss) == pytest.approx(float(plain), rel=1e-12)
    close(gradient(c.model, c.batches, c.loss), gradient(c.model, whole, c.loss), rtol=1e-12)
    close(hessian(c.model, c.batches, c.loss), hessian(c.model, whole, c.loss), rtol=1e-10)
    # the plain mean of the three batch means weighs them equally and is a different number
    unweighted = sum(loss_value(c.model, [b], c.loss) for b in c.batches) / 3
    assert abs(unweighted - float(plain)) > 1e-6 * abs(float(plain))


# ------------------------------------------------------------------------------------ subsets, modes
def test_names_and_point_select_a_sub_block_at_another_point():
    c = build_case("mlp", "cross_entropy")
    g = torch.Generator().manual_seed(3)
    point = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in c.model.named_parameters()}
    moved = copy.deepcopy(c.model)
    moved.load_state_dict(point)
    H = hessian(moved, c.batches, c.loss)
    close(hessian(c.model, c.batches, c.loss, point=point), H)
    k = 5 * 8 + 8  # fc1 first
    close(hessian(c.model, c.batches, c.loss, names=["fc2.weight", "fc2.bias"], point=point), H[k:, k:])
    close(ggn(c.model, c.batches, c.loss, names=["fc1.weight"], point=point), ggn(moved, c.batches, c.loss)[:40, :40])


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_batchnorm_modes_and_model_untouched():
    """eval: running statistics; train: each batch's own statistics (finite differences), state kept."""
    torch.manual_seed(4)
    model = _BNNet().to(DT)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(6, generator=g, dtype=DT))
        model.bn.running_var.copy_(torch.rand(6, generator=g, dtype=DT) + 0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in (7, 5)]
    theta = flat_parameters(model)
    v = torch.randn(theta.numel(), generator=g, dtype=DT)
    for mode in ("eval", "train"):
        H = hessian(model, batches, "cross_entropy", mode=mode)
        plus, minus = (gradient(model, batches, "cross_entropy", mode=mode, point=unflatten(model, theta + s * 1e-5 * v))
                       for s in (1, -1))
        close(H @ v, (plus - minus) / 2e-5, rtol=1e-6)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()
        eval_loss = sum(F.cross_entropy(ref(x), y, reduction="sum") for x, y in batches) / 12
        ref.train()
        train_loss = sum(F.cross_entropy(ref(x), y, reduction="sum") for x, y in batches) / 12
    assert loss_value(model, batches, "cross_entropy", mode="eval") == pytest.approx(float(eval_loss), rel=1e-12)
    assert loss_value(model, batches, "cross_entropy", mode="train") == pytest.approx(float(train_loss), rel=1e-12)
    assert abs(float(eval_loss) - float(train_loss)) > 1e-3
    assert model.training
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="dropout"):
        hessian(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).to(DT), batches, "cross_entropy", mode="train")
