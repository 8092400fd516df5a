"""Eigensolvers and stochastic estimators against dense float64 references.

Inputs are dense matrices with known spectra, Q diag(λ) Qᵀ for a random orthogonal Q, so every
expected number is computed here from λ, never hard-coded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossatlas.estimators import (
    Density,
    bootstrap_ci,
    count_outliers,
    extreme_eigs,
    find_bulk_edge,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigs,
    lanczos_tridiagonal,
    power_iteration,
    slq_density,
    tridiag_quadrature,
)
from lossatlas.estimators._checks import probe_vectors

F64 = torch.float64


def rotated(evals, seed: int = 0, dtype=F64) -> torch.Tensor:
    """Q diag(evals) Qᵀ with a seeded random orthogonal Q."""
    evals = torch.as_tensor(np.asarray(evals), dtype=F64)
    P = evals.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return ((Q * evals) @ Q.T).to(dtype)


def spiked500_spectrum() -> np.ndarray:
    """{20,15,10,8,6,5,4,3,2,1.5} ∪ 40 × U(−0.1, 0.1) ∪ 450 zeros (P = 500): ten outliers over a bulk."""
    rng = np.random.default_rng(15)
    return np.concatenate([[20, 15, 10, 8, 6, 5, 4, 3, 2, 1.5], rng.uniform(-0.1, 0.1, 40), np.zeros(450)])


class CountingOperator:
    """A non-tensor operator: counts `@` calls and products, like the curvature operators."""

    def __init__(self, M: torch.Tensor):
        self.M, self.shape, self.dtype, self.device = M, tuple(M.shape), M.dtype, M.device
        self.calls = 0
        self.matvecs = 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.matvecs += 1 if V.ndim == 1 else V.shape[1]
        return self.M @ V


@pytest.fixture(scope="module")
def spiked500():
    ev = spiked500_spectrum()
    return rotated(ev), ev


# ---- Lanczos ----------------------------------------------------------------------------------
def test_lanczos_top5_within_30_steps_to_1e_8(spiked500):
    A, ev = spiked500
    res = lanczos_eigs(A, 5, max_iter=30, tol=1e-12)
    assert res.matvecs <= 30
    np.testing.assert_allclose(res.eigenvalues, np.sort(ev)[::-1][:5], rtol=0, atol=1e-8)
    assert res.converged.all()


def test_block_lanczos_top5_matches_spectrum(spiked500):
    A, ev = spiked500
    res = lanczos_eigs(A, 5, block_size=4, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, np.sort(ev)[::-1][:5], rtol=0, atol=1e-8)


def test_bottom3_of_indefinite_matrix():
    rng = np.random.default_rng(3)
    ev = np.concatenate([[-7.0, -4.0, -2.5], rng.uniform(-1, 6, 197)])
    res = lanczos_eigs(rotated(ev, 1), 3, which="SA", tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, np.sort(ev)[:3], rtol=0, atol=1e-8)  # ascending for SA


def test_gauss_quadrature_exact_to_degree_2m_minus_1():
    rng = np.random.default_rng(16)
    A = rotated(rng.uniform(-2, 3, 60), 2)
    v = torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=F64)
    v = v / v.norm()
    m = 3
    alpha, beta = lanczos_tridiagonal(A, v, m)
    nodes, weights = tridiag_quadrature(alpha, beta)
    assert abs(weights.sum() - 1) < 1e-12
    moments = [float(v @ torch.linalg.matrix_power(A, j) @ v) for j in range(2 * m + 1)]
    for j in range(2 * m):  # j ≤ 5 = 2m − 1: exact
        assert abs(np.sum(weights * nodes**j) - moments[j]) < 1e-12 * max(1.0, abs(moments[j]))
    assert abs(np.sum(weights * nodes ** (2 * m)) - moments[2 * m]) > 1e-6  # degree 2m: not exact


def test_single_vector_lanczos_sees_repeated_5_once_without_nan():
    A = torch.diag(torch.tensor([5.0, 5, 5] + [1.0] * 47, dtype=F64))
    res = lanczos_eigs(A, 1)
    assert res.eigenvalues.tolist() == pytest.approx([5.0], abs=1e-12)
    assert res.matvecs == 2  # Krylov space {5, 1} is invariant after 2 steps: breakdown, stop
    assert np.isfinite(res.residuals).all() and res.converged.all()
    assert torch.isfinite(res.eigenvectors).all()


def test_block_lanczos_sees_multiplicity_3():
    A = torch.diag(torch.tensor([5.0, 5, 5] + [1.0] * 47, dtype=F64))
    res = lanczos_eigs(A, 4, block_size=3)
    np.testing.assert_allclose(res.eigenvalues, [5, 5, 5, 1], atol=1e-10)
    assert np.isfinite(res.residuals).all()


def test_multiplicity_pitfall_with_bulk():
    rng = np.random.default_rng(7)
    A = rotated(np.concatenate([[5.0, 5, 5], rng.uniform(0, 1, 197)]), 3)
    single = lanczos_eigs(A, 3, max_iter=10)
    assert np.sum(np.abs(single.eigenvalues - 5) < 1e-6) == 1  # one Krylov space: one copy
    block = lanczos_eigs(A, 3, block_size=3, tol=1e-8)
    np.testing.assert_allclose(block.eigenvalues, [5, 5, 5], atol=1e-8)


def test_la_returns_largest_algebraic_lm_largest_magnitude():
    rng = np.random.default_rng(18)
    A = rotated(np.concatenate([[20.0, -30.0], rng.uniform(-1, 1, 98)]), 4)
    assert lanczos_eigs(A, 1, which="LA").eigenvalues[0] == pytest.approx(20, abs=1e-8)
    assert lanczos_eigs(A, 1, which="LM").eigenvalues[0] == pytest.approx(-30, abs=1e-8)
    assert power_iteration(A, tol=1e-10).eigenvalues[0] == pytest.approx(-30, abs=1e-6)
    top, bottom = extreme_eigs(A, 1, 2, tol=1e-10)
    assert top.eigenvalues[0] == pytest.approx(20, abs=1e-8) and bottom.eigenvalues[0] == pytest.approx(-30, abs=1e-8)


def test_reported_residuals_and_eigenvectors_are_true(spiked500):
    A, ev = spiked500
    res = lanczos_eigs(A, 5, tol=1e-4)
    Y, theta = res.eigenvectors, torch.as_tensor(res.eigenvalues)
    true_res = torch.linalg.vector_norm(A @ Y - Y * theta, dim=0).numpy()
    np.testing.assert_allclose(res.residuals, true_res, rtol=0, atol=1e-8)
    evals, evecs = torch.linalg.eigh(A)
    cos = (evecs[:, -5:].flip(1) * Y).sum(0).abs()
    assert (cos >= 0.999).all()
    np.testing.assert_allclose(Y.T @ Y, np.eye(5), atol=1e-10)


def test_warm_start_needs_fewer_matvecs(spiked500):
    A, _ = spiked500
    cold = lanczos_eigs(A, 5, tol=1e-8)
    noise = 1e-7 * torch.randn(500, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    v0 = cold.eigenvectors + noise
    v0_before = v0.clone()
    warm = lanczos_eigs(A, 5, tol=1e-8, v0=v0)
    assert torch.equal(v0, v0_before)  # the caller's tensor is not modified
    assert warm.matvecs < cold.matvecs
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, atol=1e-8)
    warm1 = lanczos_eigs(A, 5, tol=1e-8, v0=cold.eigenvectors.sum(1))
    assert warm1.matvecs < cold.matvecs


def test_float32_matrix_reaches_1e_5(spiked500):
    A, ev = spiked500
    res = lanczos_eigs(A.float(), 5, tol=1e-5)
    top = np.sort(ev)[::-1][:5]
    assert np.max(np.abs(res.eigenvalues - top) / top) < 1e-5
    assert res.eigenvectors.dtype == torch.float32


def test_block_products_and_matvec_count(spiked500):
    A, _ = spiked500
    op = CountingOperator(A)
    res = lanczos_eigs(op, 5, block_size=3, tol=1e-8)
    assert op.matvecs == res.matvecs == 3 * res.iterations
    assert op.calls == res.iterations  # one `A @ (P, 3)` per step


def test_seeded_and_progress(spiked500):
    A, _ = spiked500
    calls = []
    r1 = lanczos_eigs(A, 3, seed=5, progress=lambda i, n: calls.append((i, n)))
    r2 = lanczos_eigs(A, 3, seed=5)
    np.testing.assert_array_equal(r1.eigenvalues, r2.eigenvalues)
    assert [c[0] for c in calls] == list(range(1, r1.iterations + 1))


def test_reorth_none_shows_ghosts_full_does_not():
    # Without reorthogonalization, converged outliers reappear as spurious copies.
    rng = np.random.default_rng(9)
    ev = np.concatenate([[10.0, 8.0], rng.uniform(0, 1, 298)])
    A = rotated(ev, 5)
    ghost = lanczos_eigs(A, 3, reorth="none", max_iter=120, tol=1e-14)
    full = lanczos_eigs(A, 3, reorth="full", max_iter=120, tol=1e-14)
    assert np.sum(np.abs(ghost.eigenvalues - 10) < 1e-6) >= 2
    np.testing.assert_allclose(full.eigenvalues[:2], [10, 8], atol=1e-10)
    assert full.eigenvalues[2] < 1


def test_batched_tridiagonal_equals_separate_runs():
    A = rotated(np.linspace(-1, 2, 80), 6)
    V = torch.randn(80, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    alpha, beta = lanczos_tridiagonal(A, V, 12)
    for i in range(3):
        a_i, b_i = lanczos_tridiagonal(A, V[:, i], 12)
        np.testing.assert_allclose(alpha[i], a_i, atol=1e-12)
        np.testing.assert_allclose(beta[i], b_i, atol=1e-12)


# ---- SLQ --------------------------------------------------------------------------------------
def smoothed_density(grid: np.ndarray, evals: np.ndarray, var: float) -> np.ndarray:
    """Exact (1/P) Σ_i g_σ(t − λ_i)."""
    d = np.exp(-((grid[:, None] - evals[None, :]) ** 2) / (2 * var)).sum(1)
    return d / (evals.size * np.sqrt(2 * np.pi * var))


def test_full_lanczos_slq_nodes_are_the_eigenvalues():
    ev = np.linspace(-1, 3, 40) + np.random.default_rng(0).uniform(0, 0.01, 40)
    d = slq_density(rotated(ev, 7), num_probes=2, num_steps=40, grid_len=500)
    for l in range(2):
        np.testing.assert_allclose(np.sort(d.nodes[l]), np.sort(ev), atol=1e-8)
        assert d.weights[l].min() >= 0 and abs(d.weights[l].sum() - 1) < 1e-12


@pytest.fixture(scope="module")
def slq_case():
    rng = np.random.default_rng(19)
    ev = np.concatenate([rng.uniform(0, 1, 995), [3.0, 4.0, 5.0, 6.0, 8.0]])
    A = rotated(ev, 8)
    return A, ev, slq_density(A, num_probes=20, num_steps=80, sigma_squared=1e-4, grid_len=4000)


def test_slq_converges_to_smoothed_density(slq_case):
    A, ev, d = slq_case
    exact = smoothed_density(d.grid, ev, d.sigma_squared_abs)
    dx = d.grid[1] - d.grid[0]
    assert np.abs(d.density - exact).sum() * dx < 0.05
    assert d.sigma_squared_abs == pytest.approx(1e-4 * (d.grid[-1] - d.grid[0]))
    assert d.matvecs == 20 * 80


def test_slq_moments_match_traces(slq_case):
    A, ev, d = slq_case
    m1 = (d.weights * d.nodes).sum(1)  # each run: vᵀAv
    m2 = (d.weights * d.nodes**2).sum(1)  # vᵀA²v
    for per_run, truth in ((m1, ev.mean()), (m2, (ev**2).mean())):
        se = per_run.std(ddof=1) / np.sqrt(per_run.size)
        assert abs(per_run.mean() - truth) < 4 * se + 1e-12


def test_slq_quadrature_mean_is_hutchinson_on_diagonal():
    # Diagonal A with Rademacher starts: vᵀAv = tr(A)/P exactly, so Σ_k w θ = tr(A)/P per run.
    ev = np.random.default_rng(10).uniform(-1, 4, 200)
    d = slq_density(torch.diag(torch.as_tensor(ev)), num_probes=3, num_steps=20, grid_len=200)
    np.testing.assert_allclose((d.weights * d.nodes).sum(1), ev.mean(), atol=1e-12)


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_slq_density_integrates_to_one(slq_case, scale):
    A, ev, _ = slq_case
    d = slq_density(A, num_probes=2, num_steps=30, scale=scale, grid_len=3000)
    x = d.grid if scale == "linear" else np.log(d.grid)
    dx = np.diff(x)
    np.testing.assert_allclose(dx, dx[0], rtol=1e-8)  # evenly spaced in λ or in ln|λ|
    assert abs(d.density.sum() * dx[0] - 1) < 1e-6
    assert (d.density >= 0).all()


def test_slq_batched_equals_separate_probes():
    A = rotated(np.linspace(0, 1, 60) ** 2, 9)
    op = CountingOperator(A)
    d = slq_density(op, num_probes=3, num_steps=10, grid_len=100)
    assert op.calls == 10 and op.matvecs == 30  # one A @ (P, 3) per step
    V0 = probe_vectors(60, range(3), "rademacher", 0, F64, torch.device("cpu"))  # probe l from its own (seed, l)
    for l in range(3):
        nodes, weights = tridiag_quadrature(*lanczos_tridiagonal(A, V0[:, l], 10))
        np.testing.assert_allclose(d.nodes[l], nodes, atol=1e-10)
        np.testing.assert_allclose(d.weights[l], weights, atol=1e-10)


# ---- bulk + outliers ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["linear", "log"])
def test_outlier_count_is_10_for_10_outliers_over_bulk(scale):
    rng = np.random.default_rng(22)
    ev = np.concatenate([rng.uniform(0, 0.5, 290), rng.uniform(5, 10, 10)])
    d = slq_density(torch.diag(torch.as_tensor(ev)), num_probes=3, num_steps=60, scale=scale, grid_len=4000)
    assert count_outliers(d) == 10
    edge = d.bulk_edge if scale == "linear" else d.bulk_edge - d.log_epsilon
    assert 0.5 <= edge < 5
    np.testing.assert_allclose(d.outliers, np.sort(ev)[::-1][:10], atol=1e-6)


def test_outliers_with_multiplicity_need_a_block_method():
    # Linear softmax at W = 0, all inputs x₀: H = (1/C)(I − 11ᵀ/C) ⊗ x₀x₀ᵀ, eigenvalue ‖x₀‖²/C × (C−1).
    C, d = 10, 30
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(21), dtype=F64)
    H = torch.kron((torch.eye(C, dtype=F64) - 1.0 / C) / C, torch.outer(x0, x0))
    lam = float(x0 @ x0) / C
    single = lanczos_eigs(H, 1)
    assert single.matvecs == 2 and single.eigenvalues[0] == pytest.approx(lam, rel=1e-12)  # seen once
    block = lanczos_eigs(H, 2 * C, block_size=C)
    np.testing.assert_allclose(block.eigenvalues[: C - 1], lam, rtol=1e-10)
    dens = slq_density(H, num_probes=4, num_steps=20)
    assert count_outliers(dens, eigenvalues=block.eigenvalues) == C - 1
    assert count_outliers(dens, eigenvalues=single.eigenvalues) == 1


def test_find_bulk_edge_on_a_known_density():
    grid = np.linspace(-1, 10, 11001)
    dens = np.where((grid >= 0) & (grid <= 2), 0.5, 0.0) + 1e-3 * np.exp(-((grid - 7) ** 2) / 0.02)
    assert find_bulk_edge(grid, dens) == pytest.approx(2.0, abs=2e-3)


# ---- trace ------------------------------------------------------------------------------------
def test_rademacher_hutchinson_exact_on_diagonal():
    ev = np.random.default_rng(12).uniform(-3, 5, 100)
    est = hutchinson_trace(torch.diag(torch.as_tensor(ev)), 20)
    np.testing.assert_allclose(est.samples, ev.sum(), rtol=1e-12)
    assert est.stderr == pytest.approx(0, abs=1e-10) and est.matvecs == 20


def test_hutchpp_exact_on_rank10_psd():
    Z = torch.randn(300, 10, generator=torch.Generator().manual_seed(13), dtype=F64)
    A = Z @ Z.T
    est = hutchpp_trace(A, 33)
    assert abs(est.value - float(torch.trace(A))) < 1e-10 * float(torch.trace(A))
    assert est.matvecs == 33 and est.samples.shape == (11,)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_per_sample_variance_matches_formula(distribution):
    A = rotated(np.random.default_rng(14).uniform(-1, 2, 40), 10)
    est = hutchinson_trace(A, 60000, distribution=distribution, block=20000, seed=1)
    fro2 = float((A**2).sum())
    want = 2 * (fro2 - float((torch.diagonal(A) ** 2).sum())) if distribution == "rademacher" else 2 * fro2
    assert abs(est.samples.var(ddof=1) / want - 1) < 0.03


def test_hutchinson_mean_within_3_stderr_over_seeds():
    A = rotated(np.random.default_rng(1).uniform(0, 1, 200), 11)
    truth = float(torch.trace(A))
    z = []
    for seed in range(8):
        est = hutchinson_trace(A, 64, seed=seed)
        z.append((est.value - truth) / est.stderr)
    assert np.max(np.abs(z)) < 3
    assert np.std(z) > 0.3  # the stderr is not wildly overstated


def test_hutchinson_stops_on_target_stderr():
    A = rotated(np.random.default_rng(2).uniform(0, 1, 100), 12)
    est = hutchinson_trace(A, 10000, block=8, target_stderr=0.5)
    assert 8 <= est.matvecs < 10000 and est.stderr <= 0.5
    assert est.samples.size == est.matvecs


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    ev = 1.0 / np.arange(1, 301) ** 2
    A = rotated(ev, 13)
    truth = ev.sum()
    err_pp = np.median([abs(hutchpp_trace(A, 30, seed=s).value - truth) / truth for s in range(15)])
    err_h = np.median([abs(hutchinson_trace(A, 99, seed=s).value - truth) / truth for s in range(15)])
    assert err_pp < err_h / 3  # Hutch++ with 30 products beats Hutchinson with 99


def test_bootstrap_ci_covers_the_mean():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(100):
        x = rng.normal(3.0, 2.0, 40)
        lo, hi = bootstrap_ci(x, num_resamples=400, seed=rep)
        assert lo < x.mean() < hi
        hits += lo <= 3.0 <= hi
    assert 85 <= hits <= 99
    lo, hi = bootstrap_ci(rng.normal(0, 1, 50), stat=lambda v: float(np.median(v)), num_resamples=200)
    assert lo < hi


# ---- errors a user can fix ---------------------------------------------------------------------
def test_errors_say_how_to_fix():
    A = torch.eye(10, dtype=F64)
    with pytest.raises(ValueError, match="exceeds the operator size"):
        lanczos_eigs(A, 11)
    with pytest.raises(ValueError, match="unknown which 'BE'"):
        lanczos_eigs(A, 1, which="BE")
    with pytest.raises(ValueError, match="unknown reorth"):
        lanczos_eigs(A, 1, reorth="partial")
    with pytest.raises(ValueError, match="tol must be a positive"):
        lanczos_eigs(A, 1, tol=0)
    with pytest.raises(ValueError, match="block size 11 exceeds"):
        lanczos_eigs(A, 1, block_size=11)
    with pytest.raises(ValueError, match="raise max_iter"):
        lanczos_eigs(A, 5, max_iter=2)
    with pytest.raises(ValueError, match="v0 must have shape"):
        lanczos_eigs(A, 1, v0=torch.ones(9))
    with pytest.raises(ValueError, match="must be square"):
        lanczos_eigs(torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="no `shape`"):
        hutchinson_trace(object(), 4)
    with pytest.raises(ValueError, match="divisible by 3"):
        hutchpp_trace(A, 10)
    with pytest.raises(ValueError, match="unknown distribution"):
        hutchinson_trace(A, 4, distribution="gaussian")
    with pytest.raises(ValueError, match="num_steps=11 exceeds"):
        slq_density(A, num_steps=11)
    with pytest.raises(ValueError, match="unknown scale"):
        slq_density(A, num_steps=5, scale="semilog")
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="needs a Density"):
        count_outliers(np.zeros(3))
    with pytest.raises(ValueError, match="sets `which`"):
        extreme_eigs(A, which="LA")


def test_density_is_frozen(slq_case):
    _, _, d = slq_case
    assert isinstance(d, Density)
    with pytest.raises(AttributeError):
        d.bulk_edge = 0.0  # type: ignore[misc]


def test_eigenvalue_criterion_meets_its_tolerance_with_fewer_matvecs():
    """criterion="eigenvalue" stops on min(r, r²/gap) ≤ tol·|θ|: the eigenvalues still meet tol, sooner."""
    g = torch.Generator().manual_seed(11)
    P = 400
    lam = torch.cat([torch.tensor([10.0, 9.3, 8.7, 8.2, 7.9]), torch.rand(P - 5, generator=g, dtype=torch.float64) * 6])
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    A = (Q * lam.double()) @ Q.T
    exact = np.sort(lam.numpy())[::-1][:5]
    res = lanczos_eigs(A, k=5, tol=1e-6, criterion="residual", seed=1)
    eig = lanczos_eigs(A, k=5, tol=1e-6, criterion="eigenvalue", seed=1)
    assert eig.matvecs < res.matvecs
    assert np.all(np.abs(eig.eigenvalues - exact) <= 1e-6 * np.abs(exact))
    assert np.all(eig.error_bounds <= eig.residuals) and eig.converged.all()
    with pytest.raises(ValueError, match="criterion"):
        lanczos_eigs(A, k=1, criterion="vibes")


def test_eigenvalue_criterion_bounds_a_tight_cluster_of_wanted_eigenvalues():
    """Five close top eigenvalues far from the bulk: the cluster bound ‖R‖²/δ holds and stops early."""
    gen = torch.Generator().manual_seed(3)
    top = torch.tensor([10.0, 9.99, 9.98, 9.97, 9.96], dtype=torch.float64)
    spectrum = torch.cat([top, 5 * torch.rand(395, generator=gen, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=torch.float64))
    A = (Q * spectrum) @ Q.T
    res = lanczos_eigs(A, 5, tol=1e-8, criterion="eigenvalue", return_eigenvectors=False)
    err = np.abs(res.eigenvalues - top.numpy())
    assert np.all(err <= res.error_bounds + 1e-12), (err, res.error_bounds)
    assert np.all(err <= 1e-8 * top.numpy()) and res.converged.all()
    resid = lanczos_eigs(A, 5, tol=1e-8, criterion="residual", return_eigenvectors=False)
    assert res.matvecs < resid.matvecs  # the quadratic bound stops before the residual does


def test_single_vector_recurrence_equals_the_block_code(spiked500, monkeypatch):
    """The lean b = 1 recurrence (scalars on the host) builds the same T and basis as the block code,
    breakdown restarts included (A = diag(5, 5, 5, 1, …) breaks down after two steps)."""
    from lossatlas.estimators import _recurrence

    degenerate = torch.diag(torch.tensor([5.0, 5.0, 5.0] + [1.0] * 17, dtype=F64))
    for A in (spiked500[0], degenerate):
        P = A.shape[0]
        start = torch.randn(1, 1, P, dtype=F64, generator=torch.Generator().manual_seed(3))
        runs = []
        for lean in (True, False):
            if not lean:
                monkeypatch.setattr(_recurrence.BlockLanczos, "_step_single",
                                    lambda self, need_next: _recurrence.BlockLanczos._step_block(self, need_next))
            run = _recurrence.BlockLanczos(A, start, 12, "full", torch.Generator().manual_seed(0))
            for _ in range(12):
                run.step(need_next=True)
            runs.append(run)
        (a1, b1), (a2, b2) = runs[0].tridiagonal(0), runs[1].tridiagonal(0)
        np.testing.assert_allclose(a1, a2, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b1, b2, rtol=0, atol=1e-12)
        V = runs[0].basis(0)
        torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0], dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(V, runs[1].basis(0), rtol=0, atol=1e-10)
        assert runs[0].matvecs == runs[1].matvecs == 12
