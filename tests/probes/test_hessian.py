"""The ``hessian`` probe and eigenspace tracking against dense float64 references.

References (reference.py): the full Hessian of the example-weighted mean loss, the dense GGN
J ᵀ H_out J / N, dense diagonal blocks, the subset loss's Hessian, and λ_max(P^{-1/2} H P^{-1/2})
solved as the generalized problem H u = λ P u (Adam's preconditioned sharpness, λ_max(P⁻¹H)).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lossatlas.losses import batch_loss
from lossatlas.models import build_data, build_model
from lossatlas.probes.base import ProbeContext
from lossatlas.probes.hessian import (
    HessianProbe,
    adam_preconditioner,
    class_subset,
    head_hessian_distance,
    hessian_spectrum,
    last_linear_parameters,
    parse_subset,
)

from reference import ggn as dense_ggn
from reference import hessian as dense_hessian

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ dense references
def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def eig_check(res, H, top_k=5, bottom_k=3, rtol=1e-6):
    """Top/bottom eigenvalues ≤ rtol relative error; eigenvectors |cos| ≥ 0.999 where the gap allows."""
    lam, U = torch.linalg.eigh(H)
    lam = lam.numpy()
    top = lam[::-1][:top_k]
    scale = np.abs(lam).max()
    np.testing.assert_allclose(res.values["top_eigenvalues"], top, rtol=rtol, atol=rtol * scale)
    if bottom_k:
        np.testing.assert_allclose(res.values["bottom_eigenvalues"], lam[:bottom_k], rtol=rtol, atol=rtol * scale)
    if "eigenvectors" in res.values:
        V = res.values["eigenvectors"]  # (k, P)
        desc = lam[::-1]
        for i in range(top_k):
            gap = min(abs(desc[i] - desc[i - 1]) if i else np.inf, abs(desc[i] - desc[i + 1]))
            if gap > 1e-3 * scale:
                u = U[:, len(lam) - 1 - i].numpy()
                cos = abs(V[i] @ u) / np.linalg.norm(V[i])
                assert cos >= 0.999, (i, cos, gap)


def _digits(n=120, dtype=F64):
    x, y = build_data({"name": "digits"})
    return x[:n].to(dtype), y[:n]


def _mlp(widths=(64, 8, 10), seed=0, activation="tanh"):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "kwargs": {"widths": list(widths), "activation": activation}}).double()


EXACT = dict(top_k=5, bottom_k=3, tol=1e-12, store_eigenvectors=True)


# ------------------------------------------------------------------------------------------------ eigenvalues
def test_mlp_cross_entropy_matches_dense_hessian():
    model = _mlp()
    x, y = _digits()
    batches = [(x[:50], y[:50]), (x[50:], y[50:])]  # unequal batches: weights n_b/N
    res = HessianProbe(**EXACT).run(ProbeContext(model=model, data=batches, loss="cross_entropy"))
    eig_check(res, dense_hessian(model, batches, "cross_entropy"))
    assert all(res.meta["top_converged"]) and res.meta["num_params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert res.dims["eigenvectors"] == ("k", "param")


def test_mse_regression_matches_dense_hessian():
    model = _mlp((5, 12, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=F64)
    y = torch.randn(40, 3, generator=g, dtype=F64)
    res = hessian_spectrum(model, (x, y), "mse", **EXACT)
    eig_check(res, dense_hessian(model, [(x, y)], "mse"))
    assert res.meta["loss"] == "mse"


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_batchnorm_model_eval_mode_matches_dense_and_is_untouched():
    torch.manual_seed(2)
    model = _BNNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()  # the user's flag must survive the probe
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 6, generator=g, dtype=F64), torch.randint(0, 3, (30,), generator=g)
    res = hessian_spectrum(model, (x, y), "cross_entropy", **EXACT)
    eig_check(res, dense_hessian(model, [(x, y)], "cross_entropy"))
    assert model.training and res.meta["mode"] == "eval"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_small_transformer_block_matches_dense_hessian():
    torch.manual_seed(4)
    spec = {"name": "gpt", "kwargs": {"vocab_size": 6, "block_size": 4, "n_layer": 1, "n_head": 2, "n_embd": 4}}
    model = build_model(spec).double()
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 6, (6, 5), generator=g)
    batches = [(idx[:, :4], idx[:, 1:])]  # next-token targets (B, T)
    res = HessianProbe(**EXACT).run(ProbeContext(model=model, data=batches, loss="cross_entropy"))
    eig_check(res, dense_hessian(model, batches, "cross_entropy"))


def test_ggn_curvature_matches_dense_ggn():
    model = _mlp((64, 6, 10), seed=6)
    x, y = _digits(60)
    res = hessian_spectrum(model, (x, y), "cross_entropy", curvature="ggn", top_k=5, bottom_k=0, tol=1e-12)
    G = dense_ggn(model, [(x, y)], "cross_entropy")
    top = torch.linalg.eigvalsh(G).numpy()[::-1][:5]
    np.testing.assert_allclose(res.values["top_eigenvalues"], top, rtol=1e-6)
    # the GGN differs from the Hessian of a nonlinear net (the residual term Σ r ∇²f): not a vacuous check
    H = dense_hessian(model, [(x, y)], "cross_entropy")
    assert not np.allclose(torch.linalg.eigvalsh(H).numpy()[::-1][:5], top, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ trace, density
@pytest.mark.parametrize("method, budget", [("hutchinson", 300), ("hutchpp", 150)])
def test_trace_converges_to_exact_within_stderr(method, budget):
    model = _mlp((64, 6, 10), seed=7)
    x, y = _digits(80)
    exact = float(torch.trace(dense_hessian(model, [(x, y)], "cross_entropy")))
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=0, trace=True, trace_method=method,
                           trace_matvecs=budget, seed=3)
    est, se = res.scalar("trace"), res.scalar("trace_stderr")
    assert 0 < se < 0.2 * abs(exact)
    assert abs(est - exact) <= 4 * se, (est, exact, se)


def test_density_integrates_to_one_and_counts_outliers():
    model = _mlp((64, 6, 10), seed=8)
    x, y = _digits(80)
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=3, density=True, num_probes=2, num_steps=40)
    grid, dens = res.coords["grid"], res.values["density"]
    assert res.dims["density"] == ("grid",) and res.dims["density_nodes"] == ("probe", "node")
    assert abs(dens.sum() * (grid[1] - grid[0]) - 1) < 1e-6  # the density integrates to 1
    np.testing.assert_allclose(res.values["density_weights"].sum(axis=1), 1.0, atol=1e-10)
    assert np.all(res.values["outliers"] > res.meta["bulk_edge"])
    assert res.meta["num_outliers"] >= 0 and grid[0] <= res.values["top_eigenvalues"][0] + 0.05


# ------------------------------------------------------------------------------------------------ parts
def test_block_spectra_equal_dense_diagonal_blocks():
    model = _mlp((64, 6, 10), seed=9)
    x, y = _digits(60)
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=1, blocks="layers", block_k=3, tol=1e-12)
    H = dense_hessian(model, [(x, y)], "cross_entropy")
    names = _names(model)
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    layers = {}
    for n, a, b in zip(names, offsets[:-1], offsets[1:]):
        layers.setdefault(n.rsplit(".", 1)[0], []).extend(range(a, b))
    assert list(res.coords["block"]) == list(layers)
    assert res.dims["block_top_eigenvalues"] == ("block", "k")
    for row, idx in zip(res.values["block_top_eigenvalues"], layers.values()):
        block = H[np.ix_(idx, idx)]
        np.testing.assert_allclose(row, torch.linalg.eigvalsh(block).numpy()[::-1][:3], rtol=1e-6)
    # a regex keeps only the matching layers
    last = list(layers)[-1]
    res2 = hessian_spectrum(model, (x, y), "cross_entropy", top_k=1, blocks=f"^{last}$", block_k=2, tol=1e-12)
    assert list(res2.coords["block"]) == [last]


def test_class_subset_equals_hessian_of_subset_loss():
    model = _mlp((64, 6, 10), seed=10)
    x, y = _digits(150)
    res = hessian_spectrum(model, (x, y), "cross_entropy", subset="class=0,3", top_k=3, tol=1e-12)
    keep = (y == 0) | (y == 3)
    H = dense_hessian(model, [(x[keep], y[keep])], "cross_entropy")
    np.testing.assert_allclose(res.values["top_eigenvalues"], torch.linalg.eigvalsh(H).numpy()[::-1][:3], rtol=1e-6)
    assert res.meta["num_examples"] == int(keep.sum()) and res.meta["subset"] == "class=0,3"
    assert parse_subset("class=3,1") == (1, 3)
    with pytest.raises(ValueError, match="no example has a label"):
        class_subset([(x, y)], [42])


def test_head_hessian_distance_equals_dense_spectral_norm():
    model = _mlp((64, 6, 10), seed=11)
    x, y = _digits(160)
    a, b = (x[y < 5], y[y < 5]), (x[y >= 5], y[y >= 5])
    head = last_linear_parameters(model)
    assert head == ["layers.2.weight", "layers.2.bias"] or head[-1].endswith("bias")
    dist = head_hessian_distance(model, a, b, "cross_entropy", tol=1e-12)
    D = dense_hessian(model, [a], "cross_entropy", names=head) - dense_hessian(model, [b], "cross_entropy", names=head)
    assert dist == pytest.approx(float(torch.linalg.matrix_norm(D, ord=2)), rel=1e-6)


def test_batch_size_scan_full_batch_and_minibatch():
    model = _mlp((64, 6, 10), seed=12)
    x, y = _digits(64)
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=1, tol=1e-10, batch_size_scan=(64, 16),
                           scan_batches=3)
    full = float(torch.linalg.eigvalsh(dense_hessian(model, [(x, y)], "cross_entropy"))[-1])
    mean, std = res.values["batch_lambda_max_mean"], res.values["batch_lambda_max_std"]
    assert res.dims["batch_lambda_max_mean"] == ("batch_size",) and list(res.values["batch_sizes"]) == [64, 16]
    assert mean[0] == pytest.approx(full, rel=1e-6)  # one batch of all 64 examples is the full batch
    assert std[1] > 0 and mean[1] > 0
    np.testing.assert_allclose(res.values["batch_max_stable_lr"], 2 / mean)


def test_data_ci_brackets_resampled_estimates():
    model = _mlp((64, 6, 10), seed=13)
    x, y = _digits(80)
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=1, trace=True, trace_matvecs=30,
                           data_ci=True, data_resamples=5, tol=1e-8)
    lo, hi = res.values["lambda_max_ci"]
    lams = res.values["lambda_max_resamples"]
    assert lams.min() <= lo < hi <= lams.max() and np.unique(lams).size == 5
    assert res.values["trace_ci"].shape == (2,) and res.dims["lambda_max_ci"] == ("bound",)


# ------------------------------------------------------------------------------------------------ Adam
def test_preconditioned_sharpness_equals_dense_generalized_eigenvalue():
    model = _mlp((64, 6, 10), seed=14)
    x, y = _digits(60)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        batch_loss("cross_entropy", model(x), y).backward()
        opt.step()
    state = {n: dict(opt.state[p]) for n, p in model.named_parameters()}
    spec = {"name": "Adam", "defaults": {"betas": [0.9, 0.99], "eps": 1e-6}}
    ctx = ProbeContext(model=model, data=[(x, y)], loss="cross_entropy", lr=0.01, optimizer_state=state, optimizer=spec)
    probe = HessianProbe(top_k=1, tol=1e-12, preconditioned=True)
    # the part that reads the optimizer state asks the runner for it; the spectrum itself does not
    assert [p.needs_optimizer_state for p in probe.parts()] == [True] and not HessianProbe.needs_optimizer_state
    res = probe.run(ctx)
    H = dense_hessian(model, [(x, y)], "cross_entropy").numpy()
    t = 3
    P = np.concatenate([((1 - 0.9**t) * (np.sqrt(s["exp_avg_sq"].numpy() / (1 - 0.99**t)) + 1e-6)).ravel()
                        for s in state.values()])
    ref = scipy.linalg.eigh(H, np.diag(P), eigvals_only=True)[-1]  # λ_max(P⁻¹H)
    assert res.scalar("preconditioned_lambda_max") == pytest.approx(ref, rel=1e-6)
    assert res.meta["adam_threshold"] == pytest.approx(38 / 0.01 * (1.9 / 1.9))
    P2 = adam_preconditioner(state, list(state), betas=(0.9, 0.99), eps=1e-6)
    np.testing.assert_allclose(torch.cat([p.reshape(-1) for p in P2.values()]).numpy(), P)
    with pytest.raises(ValueError, match="optimizer state"):
        HessianProbe(top_k=1, preconditioned=True).run(ProbeContext(model=model, data=[(x, y)]))


# ------------------------------------------------------------------------------------------------ peers
def test_agrees_with_pyhessian_within_its_tolerance():
    hessian_mod = pytest.importorskip("pyhessian")
    from pyhessian import hessian as PyHessian

    model = _mlp((64, 8, 10), seed=15, activation="relu")
    x, y = _digits(100)
    res = hessian_spectrum(model, (x, y), "cross_entropy", top_k=1, tol=1e-10)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # PyHessian draws its vectors in the default dtype
    try:
        torch.manual_seed(0)
        peer = PyHessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        top, _ = peer.eigenvalues(top_n=1, maxIter=200, tol=1e-3)
    finally:
        torch.set_default_dtype(old)
    assert hessian_mod is not None
    # PyHessian stops on a 1e-3 relative change of the Rayleigh quotient, which underestimates λ_max
    assert top[0] == pytest.approx(res.values["top_eigenvalues"][0], rel=1e-2)


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"curvature": "hess"}, "unknown curvature"),
        ({"top_k": -1}, "top_k must be"),
        ({"tol": 0}, "tol must be"),
        ({"trace_method": "hutchpp", "trace_matvecs": 100}, "divisible by 3"),
        ({"trace_matvecs": 99}, "must be even"),
        ({"trace_method": "hutch"}, "unknown trace_method"),
        ({"subset": "classes=1"}, "subset must look like"),
        ({"blocks": "("}, "not a valid regex"),
        ({"mode": "training"}, "unknown mode"),
        ({"dtype": "float16"}, "unknown dtype"),
        ({"path": "fast"}, "unknown path"),
        ({"batch_size_scan": (0,)}, "batch_size_scan"),
        ({"data_ci": True, "top_k": 0}, "data_ci needs"),
    ],
)
def test_bad_settings_raise_fixable_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        HessianProbe(**kw)


def test_deterministic_under_seed_and_config_hash():
    model = _mlp((64, 6, 10), seed=16)
    x, y = _digits(60)
    a = hessian_spectrum(model, (x, y), "cross_entropy", top_k=2, trace=True, trace_matvecs=12, seed=5)
    b = hessian_spectrum(model, (x, y), "cross_entropy", top_k=2, trace=True, trace_matvecs=12, seed=5)
    assert a.scalar("trace") == b.scalar("trace")
    np.testing.assert_array_equal(a.values["top_eigenvalues"], b.values["top_eigenvalues"])
    assert HessianProbe(top_k=3).config_hash() != HessianProbe(top_k=4).config_hash()


# ------------------------------------------------------------------------------------------------ runs
def test_runner_end_to_end_and_store_round_trip(tiny_run):
    from lossatlas.analysis.parts import with_parts
    from lossatlas.analysis.reporting import latest_results, results_by_config
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.store import ResultsStore

    probe = HessianProbe(top_k=3, bottom_k=1, trace=True, trace_matvecs=30, density=True, num_probes=2,
                         num_steps=20, blocks="layers", block_k=2, store_eigenvectors=True)
    report = run_probe(tiny_run, probe, RunOptions(steps="last", max_examples=256, dtype="float64"))
    (out,) = report.outcomes
    assert out.status == "computed" and out.result.meta["two_over_lr"] == pytest.approx(2 / 0.05)
    assert out.statuses == {"hessian": "computed", "hessian_blocks": "computed"}
    # the spectrum and the per-layer spectra are stored apart, each under its own key
    with ResultsStore(report.results_path, mode="r") as rs:
        back, info = rs.read("hessian", report.key, out.step)
        blocks, _ = rs.read("hessian_blocks", report.keys["hessian_blocks"], out.step)
        shown = latest_results(rs, "hessian")  # what `plot hessian` draws: the two merged again
        items = list(with_parts(results_by_config(rs)))  # the report's items: the part folded into the hessian's
    assert items == [("hessian", report.key)]
    assert info["status"] == "complete" and "block_top_eigenvalues" not in back.values
    assert set(blocks.values) == {"block_top_eigenvalues"}
    (drawn,) = shown
    for merged in (HessianProbe.merge(back, [blocks]), drawn):
        assert merged.values.keys() == out.result.values.keys() and merged.config == out.result.config
        for name, arr in out.result.values.items():
            np.testing.assert_array_equal(merged.values[name], arr)
            assert merged.dims[name] == out.result.dims[name]
        np.testing.assert_array_equal(merged.coords["grid"], out.result.coords["grid"])
        assert list(merged.coords["block"]) == list(out.result.coords["block"])
        assert merged.meta["path"] == out.result.meta["path"] and merged.meta["matvecs"] == out.result.meta["matvecs"]
    again = run_probe(tiny_run, probe, RunOptions(steps="last", max_examples=256, dtype="float64"))
    assert again.outcomes[0].status == "cached" and set(again.outcomes[0].statuses.values()) == {"cached"}


def test_a_changed_part_setting_recomputes_that_part_only(tiny_run, tmp_path, monkeypatch, capsys):
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.cli import main

    results = tmp_path / "r.results.h5"
    options = RunOptions(steps="last", max_examples=128, dtype="float64", results_path=results)
    first = run_probe(tiny_run, HessianProbe(top_k=2, batch_size_scan=(16, 32), scan_batches=2), options)
    assert first.outcomes[0].statuses == {"hessian": "computed", "batch_scan": "computed"}

    def recomputed(self, ctx):
        raise AssertionError("the cached top-k was recomputed")

    monkeypatch.setattr(HessianProbe, "run_own", recomputed)
    second = run_probe(tiny_run, HessianProbe(top_k=2, batch_size_scan=(16, 64), scan_batches=2), options)
    (out,) = second.outcomes
    assert out.statuses == {"hessian": "cached", "batch_scan": "computed"} and out.status == "computed"
    assert second.key == first.key and second.keys["batch_scan"] != first.keys["batch_scan"]
    np.testing.assert_array_equal(out.result.values["top_eigenvalues"], first.results[0].values["top_eigenvalues"])
    assert list(out.result.values["batch_sizes"]) == [16, 64] and out.result.config["batch_size_scan"] == [16, 64]
    # the plain spectrum, and the part on its own subcommand, find what the composite stored
    assert run_probe(tiny_run, HessianProbe(top_k=2), options).outcomes[0].status == "cached"
    argv = ["batch_scan", str(tiny_run), "--steps", "last", "--max-examples", "128", "--dtype", "float64",
            "--batch-size-scan", "16", "64", "--scan-batches", "2", "--results", str(results), "--json"]
    assert main(argv) == 0
    (step,) = json.loads(capsys.readouterr().out)["steps"]
    assert step["status"] == "cached" and step["values"]["batch_lambda_max_mean"]["shape"] == [2]


def test_tracking_warm_start_saves_matvecs_and_overlaps_in_unit_interval(tiny_run):
    from lossatlas.analysis.tracking import PROBE_NAME, track_eigenspaces
    from lossatlas.store import ResultsStore

    res = track_eigenspaces(tiny_run, steps="all", k=3, tol=1e-6, compare_cold=True, dtype="float64",
                            max_examples=512)
    steps = res.values["steps"]
    assert res.values["top_eigenvalues"].shape == (len(steps), 3) and len(steps) >= 4
    ov = res.values["overlap"]
    assert math.isnan(ov[0]) and np.all((ov[1:] >= 0) & (ov[1:] <= 1 + 1e-9))
    warm, cold = res.values["matvecs"], res.values["cold_matvecs"]
    assert warm[0] == cold[0]  # the first checkpoint has nothing to start from
    assert warm[1:].sum() < cold[1:].sum() and res.meta["matvecs_saved"] > 0
    np.testing.assert_allclose(res.values["two_over_lr"], 2 / 0.05)
    with ResultsStore(tiny_run.with_name("run.results.h5"), mode="r") as rs:
        back, _ = rs.read(PROBE_NAME, res.meta["key"], None)
    np.testing.assert_array_equal(back.values["top_eigenvalues"], res.values["top_eigenvalues"])
    assert back.dims["top_eigenvalues"] == ("step", "k")
    # warm and cold runs find the same eigenvalues
    cold_only = track_eigenspaces(tiny_run, steps="all", k=3, tol=1e-6, warm_start="none", dtype="float64",
                                  max_examples=512, save=False)
    np.testing.assert_allclose(cold_only.values["top_eigenvalues"], res.values["top_eigenvalues"], rtol=1e-5)


@pytest.mark.slow
def test_hessian_outliers_experiment_runs_and_reports_counts(tmp_path, monkeypatch):
    """experiments/hessian_outliers.py end to end (a few minutes): counts next to the claim ≈ C
    (Sagun et al. 2017; Papyan 2020)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "experiments" / "hessian_outliers.py"
    spec = importlib.util.spec_from_file_location("hessian_outliers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    summary = mod.main()
    assert (tmp_path / "hessian_outliers.json").exists() and (tmp_path / "hessian_outliers.png").exists()
    assert [c["C"] for c in summary["cases"]] == [3, 5, 8, 10, 10]
    for case in summary["cases"]:
        assert case["final_loss"] < 0.5 and case["top_eigenvalues"][0] > case["bulk_edge"]
        assert 0 <= case["num_outliers"] <= 2 * case["C"]


def test_eigenvalue_criterion_matches_dense_with_fewer_products():
    model = _mlp()
    x, y = _digits()
    batches = [(x, y)]
    dense = torch.linalg.eigvalsh(dense_hessian(model, batches, "cross_entropy")).flip(0)[:3].numpy()
    ctx = ProbeContext(model=model, data=batches, loss="cross_entropy")
    by_res = HessianProbe(top_k=3, tol=1e-8).run(ctx)
    by_eig = HessianProbe(top_k=3, tol=1e-8, criterion="eigenvalue").run(ctx)
    assert by_eig.meta["matvecs"] <= by_res.meta["matvecs"]
    np.testing.assert_allclose(by_eig.values["top_eigenvalues"], dense, rtol=1e-7)
    with pytest.raises(ValueError, match="criterion"):
        HessianProbe(criterion="gut feeling")
