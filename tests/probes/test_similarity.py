"""CKA, SVCCA and PWCCA: invariances to 1e-10 and agreement with direct numpy implementations of the papers'
formulas (written here, independently of lossatlas.probes.similarity); the probe between two checkpoints."""

import numpy as np
import pytest
import scipy.linalg

from lossatlas.probes.similarity import cka, pwcca, svcca


def _hsic_biased(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _hsic_unbiased(k, l):
    """Song et al. 2012, Eq. (5)."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def _cka_direct(k, l, hsic):
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _rbf_direct(x, t):
    d2 = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    return np.exp(-d2 / (2 * t ** 2 * np.median(d2)))


def _cca_direct(x, y):
    """Canonical correlations as √eig(Σxx⁻¹ Σxy Σyy⁻¹ Σyx) (Hotelling 1936), and the canonical variates of x."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    vals, vecs = np.linalg.eig(m)
    order = np.argsort(-vals.real)
    rho = np.sqrt(np.clip(vals.real[order], 0, 1))
    h = x @ vecs.real[:, order]
    return rho, h / np.linalg.norm(h, axis=0)


def _svcca_direct(x, y, keep):
    def reduce(a):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= keep)) + 1
        return u[:, :k] * s[:k]
    rho, _ = _cca_direct(reduce(x), reduce(y))
    return rho[: min(reduce(x).shape[1], reduce(y).shape[1])].mean()


def _pwcca_direct(x, y):
    rho, h = _cca_direct(x, y)  # x has the fewer neurons
    alpha = np.abs(h.T @ (x - x.mean(0))).sum(1)
    return np.sum(alpha / alpha.sum() * rho)


@pytest.fixture(scope="module")
def reps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = np.tanh(x @ rng.normal(size=(7, 11))) + 0.3 * rng.normal(size=(60, 11))
    return x, y


def test_values_match_the_papers_formulas(reps):
    x, y = reps
    assert cka(x, y) == pytest.approx(_cka_direct(x @ x.T, y @ y.T, _hsic_biased), rel=1e-10)
    assert cka(x, y, unbiased=True) == pytest.approx(_cka_direct(x @ x.T, y @ y.T, _hsic_unbiased), rel=1e-10)
    for t in (0.5, 1.0):
        direct = _cka_direct(_rbf_direct(x, t), _rbf_direct(y, t), _hsic_biased)
        assert cka(x, y, kernel="rbf", rbf_threshold=t) == pytest.approx(direct, rel=1e-10)
    assert svcca(x, y, keep=0.99) == pytest.approx(_svcca_direct(x, y, 0.99), rel=1e-8)
    assert svcca(x, y, keep=0.8) == pytest.approx(_svcca_direct(x, y, 0.8), rel=1e-8)
    assert pwcca(x, y) == pytest.approx(_pwcca_direct(x, y), rel=1e-8)
    assert pwcca(y, x) == pytest.approx(pwcca(x, y), rel=1e-12)  # the view with fewer neurons gives the weights
    # identical representations: similarity 1
    for f in (lambda a, b: cka(a, b), lambda a, b: cka(a, b, kernel="rbf"), svcca, pwcca):
        assert f(y, y) == pytest.approx(1.0, abs=1e-10)


def test_invariances(reps):
    x, y = reps
    q = scipy.linalg.qr(np.random.default_rng(1).normal(size=(11, 11)))[0]
    yq, ys = y @ q, 3.7 * y
    for f in (lambda a, b: cka(a, b), lambda a, b: cka(a, b, unbiased=True),
              lambda a, b: cka(a, b, kernel="rbf"), lambda a, b: svcca(a, b, 0.99)):
        base = f(x, y)
        assert abs(f(x, yq) - base) < 1e-10 and abs(f(x, ys) - base) < 1e-10
    assert abs(pwcca(x, ys) - pwcca(x, y)) < 1e-10  # PWCCA: isotropic scaling only
    assert abs(pwcca(x @ scipy.linalg.qr(np.random.default_rng(2).normal(size=(7, 7)))[0], y) - pwcca(x, y)) > 1e-6


def test_probe_between_checkpoints(tiny_run):
    from lossatlas.analysis import runner
    from lossatlas.probes.similarity import Similarity

    report = runner.run_probe(tiny_run, Similarity(to_step=0, max_examples=80), runner.RunOptions(steps="last"))
    res = report.results[-1]
    same = runner.run_probe(tiny_run, Similarity(other=str(tiny_run), max_examples=80),
                            runner.RunOptions(steps="last")).results[-1]
    n_layers = len(res.coords["layer_a"])
    for m in ("linear_cka", "rbf_cka", "svcca", "pwcca"):
        assert res.values[m].shape == (n_layers, n_layers) and res.dims[m] == ("layer_a", "layer_b")
        assert np.all((res.values[m] > -1e-12) & (res.values[m] < 1 + 1e-9))
        np.testing.assert_allclose(np.diag(same.values[m]), 1.0, atol=1e-9)  # the same checkpoint of the same run
    assert res.meta["to_step"] == 0 and same.meta["to_step"] == res.step
    with pytest.raises(ValueError, match="to_step"):
        Similarity().run(runner.ProbeContext(model=None, data=[]))
