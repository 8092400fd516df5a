"""The data-free weight spectra: the Clauset–Shalizi–Newman fit against a brute force, a planted power-law tail,
the Marchenko–Pastur trap check, WeightWatcher's own numbers, and a run with no data set."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes import ProbeContext
from lossatlas.probes.weight_spectra import WeightSpectra, mp_bulk_edge, power_law_fit


def _brute_fit(x):
    """Clauset et al. 2009 written out: every x_min but the largest, MLE α, KS against the tail's empirical CDF."""
    x = sorted(float(v) for v in x)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / sum(math.log(t / x[i]) for t in tail)
        d = max(abs(1 - (t / x[i]) ** (1 - alpha) - j / n) for j, t in enumerate(tail))
        if best is None or d < best[2]:
            best = (alpha, x[i], d)
    return best


def _ctx(model):
    return ProbeContext(model=model, data=[])


def _with_spectrum(evals, n, seed=0):
    """An nn.Linear whose N × M weight (N = n ≥ M = len(evals)) has σ_i² = evals exactly."""
    g = torch.Generator().manual_seed(seed)
    m = len(evals)
    u, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    w = u @ torch.diag(torch.as_tensor(np.sqrt(evals))) @ v.T
    layer = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w.T)  # (out = M, in = N)
    return nn.Sequential(layer)


def test_fit_equals_the_brute_force_definition():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(0.1, 1.0, 40), (1 - rng.uniform(size=30)) ** (-1 / 1.7)])
    got = power_law_fit(x)
    alpha, xmin, d = _brute_fit(x)
    assert got["alpha"] == pytest.approx(alpha, rel=1e-12)
    assert got["xmin"] == xmin and got["D"] == pytest.approx(d, rel=1e-12)
    assert got["sigma"] == pytest.approx((alpha - 1) / math.sqrt(got["num_tail"]), rel=1e-12)


def test_planted_power_law_tail_is_recovered():
    # bulk below 1, then a power-law tail ρ(λ) ∝ λ^(−2.5) on λ ≥ 1 at its exact quantiles
    alpha_true, k = 2.5, 300
    tail = (1 - (np.arange(k) + 0.5) / k) ** (-1 / (alpha_true - 1))
    bulk = np.linspace(0.05, 0.6, 200)
    model = _with_spectrum(np.concatenate([bulk, tail]), n=700)
    res = WeightSpectra(normalize=False).run(_ctx(model))
    assert abs(res.values["alpha"][0] - alpha_true) < 0.1
    assert res.values["xmin"][0] == pytest.approx(1.0, rel=0.1)
    np.testing.assert_allclose(np.sort(res.values["esd"][0]), np.sort(np.concatenate([bulk, tail])), rtol=1e-9)
    # a random Pareto sample (seeded): within 0.1 of the truth as well, about 3 standard errors
    sample = (1 - np.random.default_rng(0).uniform(size=3000)) ** (-1 / (alpha_true - 1))
    assert abs(power_law_fit(sample)["alpha"] - alpha_true) < 0.1
    # normalize divides the eigenvalues (and x_min) by N and leaves α unchanged
    norm = WeightSpectra().run(_ctx(model))
    assert norm.values["alpha"][0] == pytest.approx(res.values["alpha"][0], rel=1e-12)
    assert norm.values["xmin"][0] * 700 == pytest.approx(res.values["xmin"][0], rel=1e-12)
    assert norm.values["alpha_weighted"][0] == pytest.approx(
        norm.values["alpha"][0] * math.log10(tail.max() / 700), rel=1e-9)


def test_norms_and_correlation_trap():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(200, 400, bias=False).double())
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(400, 200, generator=g, dtype=torch.float64))
    res = WeightSpectra(normalize=False).run(_ctx(model))
    w = model[0].weight.detach().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    assert res.values["spectral_norm"][0] == pytest.approx(s[0], rel=1e-12)
    assert res.values["stable_rank"][0] == pytest.approx((w ** 2).sum() / s[0] ** 2, rel=1e-12)
    assert res.values["log_norm"][0] == pytest.approx(np.log10((w ** 2).sum()), rel=1e-12)
    assert res.values["log_spectral_norm"][0] == pytest.approx(2 * np.log10(s[0]), rel=1e-12)
    edge, _ = mp_bulk_edge(float(w.var()), 400, 200)
    assert res.values["mp_edge"][0] == pytest.approx(edge, rel=1e-12)
    assert res.values["lambda_max"][0] == pytest.approx(edge, rel=0.05)  # Gaussian W: at the MP edge
    assert not res.values["correlation_trap"][0]
    with torch.no_grad():
        model[0].weight[3, 7] = 60.0  # one huge entry: a trap that survives the shuffle
    trapped = WeightSpectra(normalize=False).run(_ctx(model))
    assert trapped.values["correlation_trap"][0] and trapped.values["num_traps"][0] >= 1
    assert trapped.values["rand_lambda_max"][0] > 60.0 ** 2 * 0.9


def test_matches_weightwatcher():
    ww = pytest.importorskip("weightwatcher", reason="weightwatcher is not installed (pip install --no-deps "
                                                    "weightwatcher powerlaw)")
    logging.disable(logging.WARNING)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 24, 3), nn.Flatten(), nn.Linear(24 * 4, 40), nn.Linear(40, 30))
        df = ww.WeightWatcher(model=model).analyze(randomize=False)
    finally:
        logging.disable(logging.NOTSET)
    res = WeightSpectra(normalize=False).run(_ctx(model))
    assert list(res.coords["layer"]) == ["0", "2", "3"] and len(df) == 3
    for ours, theirs in (("alpha", "alpha"), ("xmin", "xmin"), ("alpha_weighted", "alpha_weighted"),
                         ("log_norm", "log_norm"), ("log_spectral_norm", "log_spectral_norm"),
                         ("stable_rank", "stable_rank"), ("lambda_max", "lambda_max"), ("num_evals", "num_evals")):
        np.testing.assert_allclose(res.values[ours], df[theirs].to_numpy(dtype=float), rtol=1e-6, err_msg=ours)
    # WeightWatcher's own tolerance on α is its standard error σ = (α − 1)/√n; we agree far inside it
    assert np.all(np.abs(res.values["alpha"] - df["alpha"].to_numpy(dtype=float)) < df["sigma"].to_numpy(dtype=float))


def test_runs_without_data(tiny_run, monkeypatch):
    from lossatlas.analysis import runner

    def no_data(*args, **kwargs):
        raise AssertionError("a data-free probe must not build the data set")

    monkeypatch.setattr(runner, "load_data", no_data)
    report = runner.run_probe(tiny_run, WeightSpectra(), runner.RunOptions(steps="all"))
    assert [o.status for o in report.outcomes] == ["computed"] * len(report.outcomes) and len(report.outcomes) > 1
    again = runner.run_probe(tiny_run, WeightSpectra(), runner.RunOptions(steps="all"))
    assert all(o.status == "cached" for o in again.outcomes)
    first, last = report.results[0], report.results[-1]
    assert np.isfinite(last.values["log_norm"]).all() and not np.array_equal(first.values["log_norm"], last.values["log_norm"])


def test_gpt2_conv1d_layers_are_measured_as_their_matrices():
    """transformers' Conv1D (GPT-2's linear layers, weight stored (in, out)) counts as a layer, its norms the SVD's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=48, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    res = WeightSpectra(normalize=False).run(_ctx(model))
    layers = list(res.coords["layer"])
    assert layers == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                      "transformer.h.0.mlp.c_proj", "lm_head"]
    modules = dict(model.named_modules())
    for i, name in enumerate(layers):
        s = np.linalg.svd(modules[name].weight.detach().numpy(), compute_uv=False)
        assert res.values["spectral_norm"][i] == pytest.approx(s[0], rel=1e-12), name
        assert res.values["num_evals"][i] == min(modules[name].weight.shape), name
