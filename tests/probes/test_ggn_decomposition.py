"""ggn_decomposition against dense float64 brute force on a tiny MLP (explicit per-example Jacobians)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from lossatlas.curvature import GGNOperator
from lossatlas.probes import ProbeContext
from lossatlas.probes.ggn_decomposition import GGNDecomposition, class_pair_sums, decompose, gram_eigenvalues

C, N, D = 3, 24, 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    x = torch.randn(N, D, dtype=torch.float64)
    y = torch.arange(N) % C
    x += 1.5 * nn.functional.one_hot(y, D).double()  # class structure
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def logits(th, xi):
        return functional_call(model, th, (xi[None],))[0]

    J = []
    for i in range(N):  # J_i (C, P) by dense reverse mode
        jac = jacrev(logits)(params, x[i])
        J.append(torch.cat([jac[n].reshape(C, -1) for n in names], 1))
    J = torch.stack(J)
    p = torch.softmax(model(x).detach(), 1)
    eye = torch.eye(C, dtype=torch.float64)
    g = torch.einsum("icp,ikc->ikp", J, eye[None] - p[:, None, :])  # g_{i,k} = J_iᵀ(e_k − p_i)
    w = p / N
    G = sum(J[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ J[i] for i in range(N)) / N
    # brute-force parts
    Wcc = torch.stack([w[y == c].sum(0) for c in range(C)])
    delta = torch.stack([(w[y == c][:, :, None] * g[y == c]).sum(0) / Wcc[c][:, None] for c in range(C)])
    G_within = sum(w[i, k] * torch.outer(g[i, k] - delta[y[i], k], g[i, k] - delta[y[i], k])
                   for i in range(N) for k in range(C))
    U = Wcc.sum(0)
    nu = (Wcc[:, :, None] * delta).sum(0) / U[:, None]  # ν_k: weighted mean of g_{i,k} over every example
    G_class = sum(U[k] * torch.outer(nu[k], nu[k]) for k in range(C))
    G_cross = sum(Wcc[c, k] * torch.outer(delta[c, k] - nu[k], delta[c, k] - nu[k]) for c in range(C) for k in range(C))
    return model, x, y, G, G_class, G_cross, G_within, Wcc, delta


def test_parts_sum_to_the_ggn_and_match_brute_force(setup):
    model, x, y, G, G_class, G_cross, G_within, Wcc, delta = setup
    torch.testing.assert_close(G_class + G_cross + G_within, G, rtol=1e-10, atol=1e-13)
    op = GGNOperator(model, [(x, y)], "cross_entropy", dtype=torch.float64)
    P = op.num_params
    torch.testing.assert_close(op @ torch.eye(P, dtype=torch.float64), G, rtol=1e-9, atol=1e-12)
    S, W, nc = class_pair_sums(op)
    assert nc == C
    torch.testing.assert_close(W, Wcc, rtol=1e-12, atol=1e-15)
    dec = decompose(S, W)
    torch.testing.assert_close(dec.R_class.T @ dec.R_class, G_class, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dec.R_cross.T @ dec.R_cross, G_cross, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(G - dec.M.T @ dec.M, G_within, rtol=1e-9, atol=1e-12)
    # the class-pair means' Gram form (C²×C²) has the eigenvalues of G_class + G_cross
    dense = np.sort(np.linalg.eigvalsh((G_class + G_cross).numpy()))[::-1][: C * C]
    np.testing.assert_allclose(gram_eigenvalues(dec.M), np.clip(dense, 0, None), rtol=1e-8, atol=1e-12)
    # the softmax's rank C − 1 per example: every class's weighted row of means sums to zero
    rows = (Wcc[:, :, None] * delta).sum(1)
    assert float(rows.abs().max()) < 1e-12 * float(delta.abs().max())


def test_probe_eigenvalues_and_ranks(setup):
    model, x, y, G, G_class, G_cross, G_within, *_ = setup
    res = GGNDecomposition(top_k=4, block_size=3, tol=1e-10).run(
        ProbeContext(model=model, data=[(x, y)]))
    ev = lambda A, k: np.sort(np.linalg.eigvalsh(A.numpy()))[::-1][:k]  # noqa: E731
    np.testing.assert_allclose(res.values["ggn_top"], ev(G, 4), rtol=1e-7)
    np.testing.assert_allclose(res.values["within_top"], ev(G_within, 4), rtol=1e-7)
    np.testing.assert_allclose(res.values["class_eigenvalues"], ev(G_class, C), rtol=1e-7, atol=1e-14)
    np.testing.assert_allclose(res.values["cross_eigenvalues"][:3], ev(G_cross, 3), rtol=1e-7)
    # derived ranks (softmax rank C − 1): class part exactly C − 1 here, means ≤ C(C − 1)
    assert int(res.scalar("class_rank")) == C - 1 == np.linalg.matrix_rank(G_class.numpy(), tol=1e-10 * ev(G_class, 1)[0])
    assert res.scalar("class_smallest_ratio") < 1e-12 and res.scalar("constraint_residual") < 1e-12
    assert int(res.scalar("means_rank")) <= C * (C - 1)
    assert int(res.scalar("means_rank")) == np.linalg.matrix_rank((G_class + G_cross).numpy(),
                                                                  tol=1e-8 * ev(G_class + G_cross, 1)[0])
    # the attribution splits each top eigenvalue exactly: u_kᵀ G_part u_k, summing to λ_k
    att = res.values["attribution"]
    np.testing.assert_allclose(att.sum(1), res.values["ggn_top"], rtol=1e-10)
    w, U = np.linalg.eigh(G.numpy())
    u = U[:, -1]
    np.testing.assert_allclose(att[0], [u @ G_class.numpy() @ u, u @ G_cross.numpy() @ u, u @ G_within.numpy() @ u],
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("same_input", [True, False])
def test_closed_form_linear_softmax_at_zero(same_input):
    """Linear softmax regression at W = 0 (p = 1/C), class c's examples all equal to x_c: g_{i,k} = (e_k − 1/C)⊗x_c,
    W_{c,k} = 1/C², ν_k = (e_k − 1/C)⊗x̄, so G_within = 0, G_class = (1/C)(I − 11ᵀ/C)⊗x̄x̄ᵀ (eigenvalue ‖x̄‖²/C, C − 1
    times) and G_cross = (1/C)(I − 11ᵀ/C)⊗Σ_x, Σ_x = (1/C)Σ_c (x_c − x̄)(x_c − x̄)ᵀ (each eigenvalue of Σ_x/C, C − 1
    times); with x_c = x₀ for every class G = G_class (Sagun's T2.1 Hessian)."""
    model = nn.Linear(C + 1, C, bias=False).double()
    nn.init.zeros_(model.weight)
    xs = torch.ones(C, C + 1, dtype=torch.float64) if same_input else torch.eye(C + 1, dtype=torch.float64)[:C] + 0.3
    y = torch.arange(3 * C) % C
    res = GGNDecomposition(top_k=C, tol=1e-10).run(ProbeContext(model=model, data=[(xs[y], y)]))
    xbar = xs.mean(0)
    lam = float(xbar @ xbar) / C
    assert int(res.scalar("class_rank")) == C - 1
    np.testing.assert_allclose(res.values["class_eigenvalues"][: C - 1], lam, rtol=1e-10)
    assert res.values["class_eigenvalues"][C - 1] < 1e-12 * lam
    np.testing.assert_allclose(res.values["within_top"], 0.0, atol=1e-9 * lam)
    sx = np.linalg.eigvalsh(((xs - xbar).T @ (xs - xbar) / C).numpy())[::-1] / C
    cross = np.sort(np.repeat(sx, C - 1))[::-1]
    np.testing.assert_allclose(res.values["cross_eigenvalues"][: cross.size], cross, rtol=1e-9, atol=1e-12 * lam)
    if same_input:
        np.testing.assert_allclose(res.values["ggn_top"][: C - 1], lam, rtol=1e-9)
        np.testing.assert_allclose(res.values["attribution"][: C - 1, 0], lam, rtol=1e-8)  # all of it: class means


def test_bad_settings():
    with pytest.raises(ValueError):
        GGNDecomposition(top_k=0)
    with pytest.raises(ValueError):
        GGNDecomposition(dtype="float16")
