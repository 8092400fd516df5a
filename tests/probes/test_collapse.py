"""Neural collapse metrics, the feature stream and the ``collapse`` probe.

Closed forms: a simplex ETF (NC1–NC4 all 0), within-class deviations ±a e_k around ETF means of norm r
(NC1 = (a²/p)(C−1)²/(C r²)), W = −βMᵀ (Papyan NC3 = 4), permuted classifier rows (NC4 = affected fraction).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.base import ProbeContext, get_probe
from lossatlas.probes.collapse import (
    NeuralCollapse,
    bias_collapse,
    cdnv,
    minority_collapse,
    nc1,
    nc2_equiangularity,
    nc2_equinorm,
    nc2_etf_distance,
    nc2_max_angle,
    nc3_self_duality,
    nc3_zhu,
    nc4_ncc_mismatch,
)
from lossatlas.probes.features import ClassStatistics, classifier_weights, collect_features, stream_features

import reference

DT = torch.float64


def etf_means(c: int, p: int, r: float, seed: int = 0) -> torch.Tensor:
    """Centred simplex-ETF class means (C, p): norms r, pairwise cosine −1/(C−1)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, c, generator=g, dtype=DT))  # orthonormal columns
    m = r * math.sqrt(c / (c - 1)) * u @ (torch.eye(c, dtype=DT) - 1.0 / c)  # (p, C)
    return m.T


def stats_of(h: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> ClassStatistics:
    s = ClassStatistics()
    s.update_means(h, y)
    s.update_scatter(h, y, logits)
    return s


def brute_force(h: torch.Tensor, y: torch.Tensor):
    """Dense float64 class means, μ_G, Σ_W and Σ_B straight from the definitions."""
    classes = torch.unique(y)
    mu = torch.stack([h[y == k].mean(0) for k in classes])
    mu_g = h.mean(0)
    dev = h - mu[torch.searchsorted(classes, y)]
    sw = dev.T @ dev / h.shape[0]
    sb = (mu - mu_g).T @ (mu - mu_g) / len(classes)
    return mu, mu_g, sw, sb


# ---- simplex ETF -----------------------------------------------------------------------------------
@pytest.mark.parametrize("c,p", [(3, 3), (4, 6), (10, 12)])
def test_simplex_etf_all_metrics_vanish(c, p):
    mu_g = torch.linspace(-1, 1, p, dtype=DT)
    m = etf_means(c, p, r=2.0)
    h = (mu_g + m).repeat(5, 1)  # every sample sits on its class mean
    y = torch.arange(c).repeat(5)
    w = 0.7 * m  # W = β M*ᵀ
    b = -w @ mu_g
    s = stats_of(h, y, h @ w.T + b)
    centred = s.means - s.global_mean
    assert nc1(s.sigma_w, s.sigma_b, c) < 1e-10
    for vectors in (centred, w):
        assert nc2_equinorm(vectors) < 1e-10
        assert nc2_equiangularity(vectors) < 1e-10
        assert nc2_max_angle(vectors) < 1e-10
        assert nc2_etf_distance(vectors) < 1e-10
    assert nc3_self_duality(w, centred) < 1e-10
    assert nc3_zhu(w, centred) < 1e-10
    assert nc4_ncc_mismatch(h, w, b, s.means) == 0.0
    assert s.ncc_mismatch_rate == 0.0 and s.ncc_accuracy == 1.0
    assert bias_collapse(w, b, s.global_mean) < 1e-10


def test_non_etf_metrics_are_positive():
    m = etf_means(4, 6, r=2.0)
    skew = m * torch.tensor([1.0, 1.5, 1.0, 0.5], dtype=DT)[:, None]
    assert nc2_equinorm(skew) > 0.1
    assert nc2_etf_distance(skew) > 0.05
    rot = m.clone()
    rot[0] = m[0] + 0.5 * m[1]
    assert nc2_equiangularity(rot) > 0.05 and nc2_max_angle(rot) > 0.05


def test_nc2_closed_forms_use_population_std():
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=DT)  # norms 1, 3: population CV = 1/2 (ddof=1 would give 0.707)
    assert nc2_equinorm(v) == pytest.approx(0.5, abs=1e-15)
    # three unit vectors at 0°, 90°, 180°: cosines (0, −1, 0); std (ddof=0) = √2/3; mean |cos + 1/2| = 1/2
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    assert nc2_equiangularity(v) == pytest.approx(math.sqrt(2) / 3, abs=1e-15)
    assert nc2_max_angle(v) == pytest.approx(0.5, abs=1e-15)


# ---- NC1 closed form ---------------------------------------------------------------------------------
def nc1_dataset(c=4, p=6, r=2.0, a=0.5):
    """Deviations ±a e_k, k = 1..p, around ETF means: Σ_W = (a²/p) I exactly."""
    m = etf_means(c, p, r) + 3.0  # shift μ_G away from 0
    dev = torch.cat([a * torch.eye(p, dtype=DT), -a * torch.eye(p, dtype=DT)])  # (2p, p)
    h = torch.cat([m[k] + dev for k in range(c)])
    y = torch.arange(c).repeat_interleave(2 * p)
    return h, y, m


def test_nc1_closed_form_and_variants():
    c, p, r, a = 4, 6, 2.0, 0.5
    h, y, _ = nc1_dataset(c, p, r, a)
    s = stats_of(h, y)
    assert torch.allclose(s.sigma_w, (a**2 / p) * torch.eye(p, dtype=DT), atol=1e-14)
    expected = (a**2 / p) * (c - 1) ** 2 / (c * r**2)
    assert expected == 0.0234375
    assert nc1(s.sigma_w, s.sigma_b, c, "pinv") == pytest.approx(0.0234375, rel=1e-10)
    assert nc1(s.sigma_w, s.sigma_b, c, "svd") == pytest.approx(0.0234375, rel=1e-10)
    assert nc1(s.sigma_w, s.sigma_b, c, "quotient") == pytest.approx(a**2 / r**2, rel=1e-12)
    # CDNV: σ_c² = a², ||μ_c − μ_c'||² = 2 r² C/(C−1) for an ETF ⇒ a² (C−1) / (2 r² C)
    assert cdnv(s.means, s.class_variances) == pytest.approx(a**2 * (c - 1) / (2 * r**2 * c), rel=1e-12)


def test_nc1_pinv_threshold_and_top_variant():
    eye = torch.eye(3, dtype=DT)
    sigma_b = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=DT))
    assert nc1(eye, sigma_b, 3, "pinv") == pytest.approx((1 / 4 + 1 / 2 + 1) / 3, rel=1e-14)
    assert nc1(eye, sigma_b, 3, "svd") == pytest.approx((1 / 4 + 1 / 2) / 3, rel=1e-14)  # top C−1 = 2 pairs
    tiny = torch.diag(torch.tensor([1.0, 1e-12, 0.0], dtype=DT))  # 1e-12 < 1e-10·λ_max: dropped
    assert nc1(eye, tiny, 2, "pinv") == pytest.approx(0.5, rel=1e-14)


def test_nc1_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown nc1 variant 'inverse'; choose one of pinv, svd, quotient \(cdnv: use cdnv\(\)\)"):
        nc1(torch.eye(2, dtype=DT), torch.eye(2, dtype=DT), 2, "inverse")


# ---- NC3 max and NC4 permutation ----------------------------------------------------------------------
def test_nc3_is_four_for_opposite_classifier():
    m = etf_means(5, 7, r=1.3)
    assert nc3_self_duality(-2.5 * m, m) == pytest.approx(4.0, abs=1e-12)
    # Zhu: WMᵀ/||WMᵀ|| = −(I − 11ᵀ/C)/√(C−1), twice a unit-norm target away
    assert nc3_zhu(-2.5 * m, m) == pytest.approx(2.0, abs=1e-12)
    mu_g = torch.ones(7, dtype=DT)
    b = torch.arange(5, dtype=DT)
    assert bias_collapse(m, b, mu_g) == pytest.approx(float((m @ mu_g + b).norm()), abs=1e-14)


def test_nc4_permuted_rows_mismatch_fraction():
    c, p = 4, 6
    m = etf_means(c, p, r=2.0)
    counts = [3, 5, 7, 9]
    h = torch.cat([m[k].repeat(n, 1) for k, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    w = m.clone()
    w[[0, 1]] = m[[1, 0]]  # swap the rows of classes 0 and 1
    expected = (counts[0] + counts[1]) / sum(counts)
    assert nc4_ncc_mismatch(h, w, None, m) == pytest.approx(expected, abs=1e-15)
    s = stats_of(h, y, h @ w.T)
    assert s.ncc_mismatch_rate == pytest.approx(expected, abs=1e-15)


# ---- streaming accumulator ----------------------------------------------------------------------------
def test_streaming_statistics_equal_batch_computation():
    g = torch.Generator().manual_seed(1)
    n, p, c = 103, 5, 4
    h = torch.randn(n, p, generator=g, dtype=DT) * 3 + 10  # large offset: a naive one-pass Σ_W loses digits
    y = torch.randint(0, c, (n,), generator=g)
    cuts = [0, 1, 18, 19, 60, 103]  # unequal batches, one of size 1
    s = ClassStatistics()
    for i, j in zip(cuts[:-1], cuts[1:]):
        s.update_means(h[i:j], y[i:j])
    for i, j in zip(cuts[:-1], cuts[1:]):
        s.update_scatter(h[i:j], y[i:j])
    mu, mu_g, sw, sb = brute_force(h, y)
    assert torch.allclose(s.means, mu, rtol=0, atol=1e-12)
    assert torch.allclose(s.global_mean, mu_g, rtol=0, atol=1e-12)
    assert torch.allclose(s.sigma_w, sw, rtol=0, atol=1e-12)
    assert torch.allclose(s.sigma_b, sb, rtol=0, atol=1e-12)
    ncc = torch.cdist(h, mu).argmin(1)
    assert s.ncc_accuracy == pytest.approx(float((ncc == y).double().mean()), abs=1e-15)


def test_statistics_need_both_passes_over_same_data():
    s = ClassStatistics()
    with pytest.raises(ValueError, match="call update_means"):
        s.update_scatter(torch.zeros(2, 2, dtype=DT), torch.tensor([0, 1]))
    s.update_means(torch.randn(4, 2, dtype=DT), torch.tensor([0, 1, 0, 1]))
    s.update_scatter(torch.randn(2, 2, dtype=DT), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="stream the same data twice"):
        _ = s.sigma_w


# ---- minority collapse ------------------------------------------------------------------------------
def test_minority_collapse_view_on_imbalanced_construction():
    c, p = 6, 8
    etf = etf_means(c, p, r=1.0)
    counts = torch.tensor([50, 50, 50, 5, 5, 5], dtype=DT)
    w = etf.clone()
    direction = etf[3:].mean(0)
    w[3:] = direction + 0.01 * etf[3:]  # minority rows nearly collapsed onto one direction
    view = minority_collapse(w, counts)
    cos = torch.nn.functional.cosine_similarity
    pairs = [(3, 4), (3, 5), (4, 5)]
    expected_min = sum(float(cos(w[i], w[j], dim=0)) for i, j in pairs) / 3
    assert view["minority"] == pytest.approx(expected_min, abs=1e-12)
    assert view["minority"] > 0.99
    assert view["majority"] == pytest.approx(-1 / (c - 1), abs=1e-12)  # untouched ETF rows
    # explicit threshold: only counts < 10 are minority, the same split
    assert minority_collapse(w, counts, threshold=10)["minority"] == pytest.approx(view["minority"], abs=1e-15)


# ---- features from a model ----------------------------------------------------------------------------
def tiny_mlp(seed=0, classes=3, width=5):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, width), nn.ReLU(), nn.Linear(width, classes)
    ).to(DT)


def tiny_data(n=37, classes=3, seed=0, batch=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.arange(n) % classes
    x = x + y[:, None].to(DT)  # some class structure
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_feature_hook_sees_last_linear_input_and_model_untouched():
    model = tiny_mlp()
    model.train()
    model[1].eval()  # a mixed flag that must be restored exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    data = tiny_data()
    h, y = collect_features(model, data)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        manual = torch.relu(model[3](torch.tanh(model[0](x))))  # eval mode: dropout is the identity
    assert torch.equal(h, manual)
    assert torch.equal(y, torch.cat([b[1] for b in data]))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    w, b = classifier_weights(model)
    assert torch.equal(w, model[5].weight) and torch.equal(b, model[5].bias)


def test_hooks_removed_on_error_and_unknown_module():
    model = tiny_mlp()
    bad = [(torch.zeros(2, 3, dtype=DT), torch.tensor([0, 1]))]  # wrong input width
    with pytest.raises(RuntimeError):
        collect_features(model, bad)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert model.training
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        collect_features(model, tiny_data(), module="fc9")


def test_stream_several_modules_in_one_forward():
    model = tiny_mlp()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    data = tiny_data()
    try:
        feats = [f for f, _ in stream_features(model, data, ["0", "3", "5"])]
    finally:
        handle.remove()
    assert len(calls) == len(data)
    assert [tuple(f[n].shape[1] for n in ("0", "3", "5")) for f in feats][0] == (4, 6, 5)


# ---- the probe -----------------------------------------------------------------------------------------
def test_collapse_probe_end_to_end_matches_dense_reference():
    model = tiny_mlp()
    data = tiny_data(n=41, batch=7)
    probe = NeuralCollapse(layers="depth", batch_size=9)
    flags = [m.training for m in model.modules()]
    res = probe.run(ProbeContext(model=model, data=data, step=3))
    assert [m.training for m in model.modules()] == flags
    assert get_probe("collapse") is NeuralCollapse and res.probe == "collapse" and res.step == 3
    h, y = collect_features(model, data)
    mu, mu_g, sw, sb = brute_force(h, y)
    assert res.scalar("nc1") == pytest.approx(nc1(sw, sb, 3), rel=1e-9)
    assert res.scalar("nc1_quotient") == pytest.approx(float(torch.trace(sw) / torch.trace(sb)), rel=1e-12)
    w, b = classifier_weights(model)
    assert res.scalar("nc3_self_duality") == pytest.approx(nc3_self_duality(w, mu - mu_g), rel=1e-12)
    assert res.scalar("nc4_ncc_mismatch") == pytest.approx(nc4_ncc_mismatch(h, w, b, mu), abs=1e-15)
    logits_acc = reference.accuracy(model, data)  # argmax of the eval-mode logits
    assert res.scalar("classifier_accuracy") == pytest.approx(logits_acc, abs=1e-15)
    # dims and coords are consistent
    assert list(res.coords["class"]) == [0, 1, 2]
    assert list(res.coords["layer"]) == ["0", "3", "5"]
    for key, arr in res.values.items():
        assert len(res.dims[key]) == arr.ndim
        for axis, dim in enumerate(res.dims[key]):
            assert arr.shape[axis] == len(res.coords[dim])
    np.testing.assert_allclose(res.values["class_count"], [14, 14, 13])
    assert res.meta["num_classes"] == 3 and res.meta["global_mean"] == "sample-weighted"
    assert res.values["layer_nc1"][-1] == pytest.approx(res.scalar("nc1"), rel=1e-12)
    layer0, _ = collect_features(model, data, module="0")
    ncc0 = torch.cdist(layer0, brute_force(layer0, y)[0]).argmin(1)
    assert res.values["layer_ncc_accuracy"][0] == pytest.approx(float((ncc0 == y).double().mean()), abs=1e-15)


def test_collapse_probe_minority_view_in_result():
    model = tiny_mlp(classes=4)
    counts = [30, 30, 3, 3]
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    x = torch.randn(len(y), 4, generator=g, dtype=DT) + y[:, None].to(DT)
    res = NeuralCollapse().run(ProbeContext(model=model, data=[(x, y)]))
    np.testing.assert_array_equal(res.values["class_is_minority"], [False, False, True, True])
    w, _ = classifier_weights(model)
    cos = float(torch.nn.functional.cosine_similarity(w[2], w[3], dim=0))
    assert res.scalar("minority_weight_cosine") == pytest.approx(cos, abs=1e-12)


def test_collapse_probe_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown nc1_variant 'exact'; choose one of pinv, svd, quotient, cdnv"):
        NeuralCollapse(nc1_variant="exact")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        NeuralCollapse(batch_size=0)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        NeuralCollapse(layers=("nope",)).run(ProbeContext(model=tiny_mlp(), data=tiny_data()))
