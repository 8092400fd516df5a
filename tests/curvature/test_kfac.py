"""KFAC / EKFAC operators against curvlinops, closed forms and the dense exact GGN (float64).

References: curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` with ``fisher_type="type-2"`` (the
exact-GGN Kronecker factors) on the same model and data, densified by products with the identity; the
dense GGN of ``tests.reference``; eigenvalues of the densified matrices by ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossatlas.curvature import GGNOperator
from lossatlas.curvature.kfac import EKFACOperator, KFACOperator, kfac_operator, relative_distance
from lossatlas.errors import UserError
from lossatlas.probes.base import ProbeContext
from lossatlas.probes.hessian import HessianProbe

from reference import DT, build_case, close, ggn

OURS = {"kfac": KFACOperator, "ekfac": EKFACOperator}
PEERS = {"kfac": "KFACLinearOperator", "ekfac": "EKFACLinearOperator"}


def dense(op, P: int) -> torch.Tensor:
    return op @ torch.eye(P, dtype=DT)


def peer_dense(kind, model, loss_fn, data, kfac_approx="expand", params=None):
    # only the comparisons skip without the peer; the closed-form and dense-GGN tests always run
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed (a test "
                                     "dependency: pip install --no-deps curvlinops-for-pytorch einconv einops "
                                     "linear_operator opt-einsum)")
    cls = getattr(curvlinops, PEERS[kind])
    params = list(model.parameters()) if params is None else params
    op = cls(model, loss_fn, params, data, fisher_type="type-2", kfac_approx=kfac_approx, check_deterministic=False)
    return dense(op, sum(p.numel() for p in params))


class SeqMLP(nn.Module):
    """(B, T, 3) → Linear 3→4, tanh, Linear 4→2 per position: Linear layers on sequences (weight sharing over T)."""

    def __init__(self, pool: bool = False):
        super().__init__()
        self.pool = pool
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h.mean(dim=1) if self.pool else h)


class ClassDim1(nn.Module):
    """curvlinops' CrossEntropyLoss wants the classes in dim 1: (B, T, V) → (B, V, T); the same parameters."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).transpose(1, 2)


class ConvNet(nn.Module):
    """1×6×6 images: conv 3×3 stride 1 pad 1 (1 → 2, ReLU in place), conv 2×2 stride 2 (2 → 2), linear 18 → 3."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 2, stride=2), nn.Linear(18, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.relu_(self.c1(x)))).flatten(1))


def _seq_data(pool: bool, loss: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in (3, 2):
        x = torch.randn(n, 5, 3, generator=g, dtype=DT)
        if loss == "mse":
            y = torch.randn(*((n, 2) if pool else (n, 5, 2)), generator=g, dtype=DT)
        else:
            y = torch.randint(0, 2, (n,) if pool else (n, 5), generator=g)
        batches.append((x, y))
    return batches


# ------------------------------------------------------------------------------------- against curvlinops
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_matches_curvlinops_mlp_cnn(kind, arch):
    case = build_case(arch, "cross_entropy")
    P = sum(p.numel() for p in case.model.parameters())
    ours = dense(OURS[kind](case.model, case.batches, "cross_entropy"), P)
    close(ours, peer_dense(kind, case.model, nn.CrossEntropyLoss(), case.batches))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
def test_matches_curvlinops_conv_weight_sharing(kind, kfac_type):
    torch.manual_seed(3)
    model = ConvNet().to(DT)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in (12, 10)]
    # 22 examples > 18 inputs of any layer: A is invertible, so EKFAC's eigenbasis (and E) is unique
    P = sum(p.numel() for p in model.parameters())
    ours = dense(OURS[kind](model, data, "cross_entropy", kfac_type=kfac_type), P)
    close(ours, peer_dense(kind, model, nn.CrossEntropyLoss(), data, kfac_type))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
@pytest.mark.parametrize("pool,loss", [(False, "cross_entropy"), (False, "mse"), (True, "cross_entropy")])
def test_matches_curvlinops_linear_on_sequences(kind, kfac_type, pool, loss):
    if kind == "ekfac" and not pool:
        pytest.skip("curvlinops' EKFAC refuses outputs with several loss terms per example (see the test below)")
    torch.manual_seed(5)
    model = SeqMLP(pool).to(DT)
    data = _seq_data(pool, loss)
    P = sum(p.numel() for p in model.parameters())
    ours = dense(OURS[kind](model, data, loss, kfac_type=kfac_type), P)
    peer_model = ClassDim1(model) if loss == "cross_entropy" and not pool else model
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    ref = peer_dense(kind, peer_model, loss_fn, data, kfac_type, params=list(model.parameters()))
    close(ours, ref)


def test_expand_and_reduce_differ_with_sharing_and_agree_without():
    torch.manual_seed(5)
    model = SeqMLP(pool=True).to(DT)
    data = _seq_data(True, "cross_entropy")
    P = sum(p.numel() for p in model.parameters())
    e, r = (dense(KFACOperator(model, data, "cross_entropy", kfac_type=t), P) for t in ("expand", "reduce"))
    assert float((e - r).abs().max()) > 1e-3 * float(e.abs().max())  # fc1 shares its weight over T = 5
    case = build_case("mlp", "cross_entropy")  # no weight sharing: the two are the same matrix
    P = sum(p.numel() for p in case.model.parameters())
    e, r = (dense(KFACOperator(case.model, case.batches, "cross_entropy", kfac_type=t), P)
            for t in ("expand", "reduce"))
    close(r, e)


@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ekfac_on_sequence_outputs_is_the_exact_diagonal(kfac_type, loss):
    """Per-token loss terms: E = diag((Q_B ⊗ Q_A)ᵀ G (Q_B ⊗ Q_A)) with G the dense exact GGN, per block."""
    torch.manual_seed(5)
    model = SeqMLP().to(DT)
    data = _seq_data(False, loss)
    check_ekfac_diagonal(EKFACOperator(model, data, loss, kfac_type=kfac_type), ggn(model, data, loss))


def check_ekfac_diagonal(op, G):
    f, start = op.factors(), 0
    for name in op.layers:
        Q = torch.kron(f[name]["Q_B"], f[name]["Q_A"])
        k = Q.shape[0]
        close(f[name]["E"].reshape(-1), torch.diagonal(Q.T @ G[start:start + k, start:start + k] @ Q))
        b = f[name]["Q_B"].shape[0]
        Gb = G[start + k:start + k + b, start + k:start + k + b]
        close(f[name]["E_bias"], torch.diagonal(f[name]["Q_B"].T @ Gb @ f[name]["Q_B"]))
        start += k + b
    assert start == G.shape[0]


# --------------------------------------------------------------------------------------------- closed forms
def test_single_linear_layer_mse_is_exact():
    """z = W x (no bias), mse over C outputs: ∂z/∂W is x for every output and H_out = (2/C) I for every example,
    so G = (1/N) Σ_n (2/C) I ⊗ x_n x_nᵀ = (2/C) I ⊗ XᵀX/N exactly, for any N: KFAC = EKFAC = GGN."""
    torch.manual_seed(0)
    C, D, N = 3, 4, 9
    model = nn.Linear(D, C, bias=False).to(DT)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, C, generator=g, dtype=DT)
    data = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    expected = torch.kron((2.0 / C) * torch.eye(C, dtype=DT), X.T @ X / N)
    for cls in (KFACOperator, EKFACOperator):
        op = cls(model, data, "mse")
        close(dense(op, C * D), expected)
        close(op.dense(), expected)
    close(expected, ggn(model, data, "mse"))  # the closed form is the GGN (the reference)
    assert relative_distance(KFACOperator(model, data, "mse"), GGNOperator(model, data, "mse"), num_vectors=None) < 1e-12


def test_single_linear_layer_one_example_cross_entropy_is_exact():
    """One example through z = W x + b: G = Jᵀ H J with J = [I ⊗ xᵀ, I], so the weight block is H ⊗ x xᵀ and
    the bias block H (H = diag(p) − p pᵀ): KFAC's blocks exactly; the weight-bias cross block H ⊗ x is dropped."""
    torch.manual_seed(2)
    model = nn.Linear(3, 4).to(DT)
    x = torch.randn(1, 3, dtype=DT)
    data = [(x, torch.tensor([2]))]
    p = torch.softmax(model(x)[0], -1).detach()
    H = torch.diag(p) - torch.outer(p, p)
    K = dense(KFACOperator(model, data, "cross_entropy"), 16)
    close(K[:12, :12], torch.kron(H, torch.outer(x[0], x[0])))
    close(K[12:, 12:], H)
    assert float(K[:12, 12:].abs().max()) == 0.0
    exact = ggn(model, data, "cross_entropy")
    close(K[:12, :12], exact[:12, :12])
    close(K[12:, 12:], exact[12:, 12:])


def test_ekfac_is_the_exact_diagonal_in_the_kfac_eigenbasis():
    """Without weight sharing E_ij = (Q_B ⊗ Q_A)ᵀ G (Q_B ⊗ Q_A) diagonal, G the exact GGN block (George et al. 2018)."""
    case = build_case("mlp", "cross_entropy")
    G = ggn(case.model, case.batches, "cross_entropy")
    op = EKFACOperator(case.model, case.batches, "cross_entropy")
    check_ekfac_diagonal(op, G)
    # a change of basis keeps each block's trace, so EKFAC's trace is the GGN's (KFAC's is not)
    assert abs(op.trace() - float(torch.trace(G))) <= 1e-10 * float(torch.trace(G))
    kfac_trace = KFACOperator(case.model, case.batches, "cross_entropy").trace()
    assert abs(kfac_trace - float(torch.trace(G))) > 1e-4 * float(torch.trace(G))


# ------------------------------------------------------------------------------ eigenvalues, trace, distance
@pytest.mark.parametrize("name", ["kfac", "ekfac", "kfac_reduce"])
def test_eigenvalues_and_trace_from_factors(name):
    case = build_case("cnn", "cross_entropy")
    op = kfac_operator(name, case.model, case.batches, "cross_entropy")
    D = dense(op, op.shape[0])
    close(op.dense(), D)
    ev = torch.linalg.eigvalsh(D).flip(0)
    close(op.eigenvalues(), ev)
    assert abs(op.trace() - float(torch.trace(D))) <= 1e-10 * float(torch.trace(D))
    assert abs(op.frobenius_norm() - float(D.norm())) <= 1e-10 * float(D.norm())


def test_relative_distance_dense_and_estimated():
    case = build_case("mlp", "cross_entropy")
    K = KFACOperator(case.model, case.batches, "cross_entropy")
    G = GGNOperator(case.model, case.batches, "cross_entropy")
    Gd = ggn(case.model, case.batches, "cross_entropy")
    exact = float((K.dense() - Gd).norm() / Gd.norm())
    assert 1e-3 < exact < 1.5  # KFAC is an approximation here (two layers, 15 examples)
    assert abs(relative_distance(K, G, num_vectors=None) - exact) <= 1e-10 * exact
    est = relative_distance(K, G, num_vectors=256, seed=1)
    assert abs(est - exact) < 0.25 * exact  # Hutchinson ratio from 256 Gaussian vectors
    # a rerun on fresh operators is bit-identical (the same G's second 8-vector product may try another HVP path)
    again = [relative_distance(K, GGNOperator(case.model, case.batches, "cross_entropy"), num_vectors=8, seed=3)
             for _ in range(2)]
    assert again[0] == again[1]


# ------------------------------------------------------------------------------------------------ the probe
def test_hessian_probe_kfac_choice():
    case = build_case("mlp", "cross_entropy")
    ctx = ProbeContext(model=case.model, data=case.batches, loss="cross_entropy")
    res = HessianProbe(curvature="ekfac", top_k=3, tol=1e-10, trace=True, trace_method="hutchinson",
                       trace_matvecs=8, dtype="float64").run(ctx)
    op = EKFACOperator(case.model, case.batches, "cross_entropy")
    ev = op.eigenvalues()
    close(torch.as_tensor(res.values["top_eigenvalues"], dtype=DT), ev[:3])
    close(torch.as_tensor(res.meta["kfac_top_eigenvalues"], dtype=DT), ev[:5])
    assert abs(res.meta["kfac_trace"] - op.trace()) <= 1e-12 * op.trace() and res.meta["kfac_type"] == "expand"
    with pytest.raises(ValueError, match="curvature"):
        HessianProbe(curvature="kfac_sideways").validate()


# --------------------------------------------------------------------------------------------------- errors
def test_unsupported_layers_and_settings():
    case = build_case("transformer", "cross_entropy")  # Embedding and LayerNorm parameters
    with pytest.raises(UserError, match="Embedding"):
        KFACOperator(case.model, case.batches, "cross_entropy")
    op = KFACOperator(case.model, case.batches, "cross_entropy", params=r"^mlp\.")  # Linear layers only: fine
    assert op.shape == (4 * 6 + 6 + 6 * 4 + 4,) * 2 and float(op.trace()) > 0
    with pytest.raises(UserError, match="groups"):
        KFACOperator(nn.Conv2d(2, 2, 3, groups=2), [(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2))], "mse")
    with pytest.raises(ValueError, match="kfac_type"):
        KFACOperator(nn.Linear(2, 2), [(torch.randn(1, 2), torch.tensor([0]))], kfac_type="sum")
    with pytest.raises(UserError, match="closure"):
        KFACOperator(nn.Linear(2, 2), [(torch.randn(1, 2), torch.tensor([0]))], lambda model, batch: model(batch[0]).sum())
    lin = nn.Linear(2, 2)
    shared = nn.Sequential(lin, nn.Tanh(), lin)
    with pytest.raises(UserError, match="more than once"):
        KFACOperator(shared, [(torch.randn(3, 2), torch.tensor([0, 1, 0]))]) @ torch.ones(6)
