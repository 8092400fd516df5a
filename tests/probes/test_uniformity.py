"""Alignment, uniformity, W2 uniformity, tolerance, RankMe and the ``uniformity`` probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.base import ProbeContext, get_probe
from lossatlas.probes.features import collect_features
from lossatlas.probes.uniformity import (
    NOT_NORMALIZED_WARNING,
    Uniformity,
    alignment_loss,
    gaussian_noise,
    normalize_rows,
    positive_pair_features,
    rankme,
    singular_values,
    subsample_rows,
    tolerance,
    uniformity_loss,
    w2_uniformity,
)

DT = torch.float64


def sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=DT)
    return z / z.norm(dim=1, keepdim=True)


def regular_simplex(n: int) -> torch.Tensor:
    """N unit vectors with pairwise cosine −1/(N−1): the centred standard basis, normalised."""
    z = torch.eye(n, dtype=DT) - 1.0 / n
    return z / z.norm(dim=1, keepdim=True)


# ---- Wang & Isola 2020 ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", [(2, -8.0), (3, -6.0), (4, -16.0 / 3.0)])
def test_uniformity_regular_simplex(n, expected):
    assert uniformity_loss(regular_simplex(n), t=2.0) == pytest.approx(expected, abs=1e-12)
    assert uniformity_loss(regular_simplex(n), t=1.0) == pytest.approx(-2 * n / (n - 1), abs=1e-12)


def test_uniformity_all_equal_is_zero_and_matches_reference_formula():
    u = sphere(1, 5).repeat(7, 1)
    assert uniformity_loss(u) == pytest.approx(0.0, abs=1e-15)
    z = sphere(30, 4, seed=3)
    reference = torch.pdist(z, p=2).pow(2).mul(-2).exp().mean().log()  # SsnL/align_uniform
    assert uniformity_loss(z) == pytest.approx(float(reference), abs=1e-12)


def test_uniformity_uniform_on_sphere_d3():
    # population value −4 + log(sinh 4 / 4) = −2.079777
    assert -4 + math.log(math.sinh(4) / 4) == pytest.approx(-2.079777, abs=1e-6)
    assert uniformity_loss(sphere(4000, 3, seed=0)) == pytest.approx(-2.0798, abs=0.01)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_alignment_at_angle(alpha):
    phis = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=DT)
    x = torch.stack([torch.ones_like(phis), torch.zeros_like(phis)], 1)
    y = torch.stack([phis.cos(), phis.sin()], 1)
    expected = ((2 - 2 * phis.cos()) ** (alpha / 2)).mean()
    assert alignment_loss(x, y, alpha) == pytest.approx(float(expected), abs=1e-14)
    assert alignment_loss(x, x, alpha) == 0.0


def test_normalize_rows_reports_change():
    z = sphere(5, 3)
    same, changed = normalize_rows(z)
    assert not changed and torch.equal(same, z)
    scaled, changed = normalize_rows(3 * z)
    assert changed and torch.allclose(scaled, z, atol=1e-15)
    with pytest.raises(ValueError, match="all zero"):
        normalize_rows(torch.zeros(2, 3))


# ---- W2 uniformity (Fang et al. 2024) ---------------------------------------------------------------------------
def test_w2_uniform_on_sphere_is_small():
    assert w2_uniformity(sphere(10_000, 32, seed=1)) < 0.1


def test_w2_complete_collapse_and_antipodal():
    u = sphere(1, 16, seed=2)
    assert w2_uniformity(5.0 * u.repeat(50, 1)) == pytest.approx(math.sqrt(2), abs=1e-6)  # un-normalised on purpose
    pm = torch.cat([u.repeat(20, 1), -u.repeat(20, 1)])
    # zero eigenvalues come out as ±1e-17 and √|λ| ≈ 3e-9 each (reference behaviour): tolerance 1e-7
    assert w2_uniformity(pm) == pytest.approx(math.sqrt(2 - 2 / math.sqrt(16)), abs=1e-7)


def test_w2_dimensional_collapse_to_subspace():
    m, k = 128, 32
    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=DT))
    z = sphere(10_000, k, seed=5) @ basis.T  # uniform on S^{k-1} inside R^m
    expected = math.sqrt(2 * (1 - math.sqrt(k / m)))
    assert expected == pytest.approx(1.0)
    assert w2_uniformity(z) == pytest.approx(expected, abs=0.1)


# ---- tolerance (Wang & Liu 2021) --------------------------------------------------------------------------
def test_tolerance_closed_form_and_brute_force():
    u = sphere(1, 3, seed=6)[0]
    z = torch.stack([u, u, u, u, -u])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert tolerance(3 * z, labels) == pytest.approx((6 - 2) / 8, abs=1e-14)  # 6 pairs at cos 1, 2 at cos −1
    z = torch.randn(23, 4, generator=torch.Generator().manual_seed(7), dtype=DT)
    labels = torch.randint(0, 3, (23,), generator=torch.Generator().manual_seed(8))
    cos = torch.nn.functional.cosine_similarity(z[:, None], z[None], dim=-1)
    same = (labels[:, None] == labels[None]) & ~torch.eye(23, dtype=torch.bool)
    assert tolerance(z, labels) == pytest.approx(float(cos[same].mean()), abs=1e-13)


# ---- RankMe (Garrido et al. 2023) ---------------------------------------------------------------------
def orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q


@pytest.mark.parametrize("k", [1, 5, 16])
def test_rankme_equal_singular_values(k):
    z = 3.0 * orthonormal(200, k) @ orthonormal(16, k, seed=1).T  # (200, 16) with k equal singular values
    assert rankme(z) == pytest.approx(k, rel=1e-4)
    assert torch.allclose(singular_values(z)[:k], torch.full((k,), 3.0, dtype=DT), atol=1e-12)


def test_rankme_includes_epsilon():
    z = orthonormal(200, 16)  # 16 equal singular values: p_k = 1/16 + ε
    q = 1 / 16 + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-16 * q * math.log(q)), rel=1e-10)
    assert rankme(z) == pytest.approx(16.000045, abs=1e-6)  # k = K = 16 with ε = 1e-7


def test_rankme_two_one_one():
    z = orthonormal(50, 3) * torch.tensor([2.0, 1.0, 1.0], dtype=DT)
    assert rankme(z) == pytest.approx(2 ** 1.5, rel=1e-6)
    assert 2 ** 1.5 == pytest.approx(2.828427, abs=1e-6)


def test_rankme_centring_changes_value_only_with_flag():
    z = orthonormal(100, 2) + 5.0  # a large common offset adds a direction
    assert rankme(z) != pytest.approx(rankme(z, center=True), rel=1e-3)
    assert rankme(z, center=True) == pytest.approx(rankme(z - z.mean(0)), rel=1e-12)


# ---- the probe ----------------------------------------------------------------------------------------
def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)


def tiny_data(n=60, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.arange(n) % 3
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_uniformity_probe_end_to_end():
    model, data = tiny_mlp(), tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = Uniformity(augmentation="gaussian_noise", noise_std=0.05, max_pairs_examples=40, seed=3)
    res = probe.run(ProbeContext(model=model, data=data, step=7))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_probe("uniformity") is Uniformity and res.step == 7
    z, y = collect_features(model, data)
    unit = z / z.norm(dim=1, keepdim=True)
    assert res.scalar("uniformity") == pytest.approx(uniformity_loss(subsample_rows(unit, 40, 3)), abs=1e-12)
    assert res.meta["uniformity_examples"] == 40
    assert res.scalar("w2_uniformity") == pytest.approx(w2_uniformity(z), abs=1e-12)
    assert res.scalar("tolerance") == pytest.approx(tolerance(z, y), abs=1e-12)
    assert res.scalar("rankme") == pytest.approx(rankme(z), rel=1e-12)
    z1, z2 = positive_pair_features(model, data, gaussian_noise(0.05), seed=3)
    a = alignment_loss(normalize_rows(z1)[0], normalize_rows(z2)[0])
    assert res.scalar("alignment") == pytest.approx(a, abs=1e-12) and 0 < a < 0.5
    assert NOT_NORMALIZED_WARNING in res.meta["warnings"]
    assert res.dims["singular_values"] == ("component",)
    assert len(res.coords["component"]) == res.values["singular_values"].shape[0] == 6
    for key, arr in res.values.items():
        assert len(res.dims[key]) == arr.ndim
    again = probe.run(ProbeContext(model=model, data=data, step=7))
    assert all(np.array_equal(again.values[k], res.values[k]) for k in res.values)


def test_uniformity_probe_output_capture_without_pairs():
    model, data = tiny_mlp(), tiny_data()
    res = Uniformity(capture="output", max_pairs_examples=None).run(ProbeContext(model=model, data=data))
    out, _ = collect_features(model, data, capture="output")
    assert out.shape == (60, 3) and "alignment" not in res.values
    assert res.scalar("w2_uniformity") == pytest.approx(w2_uniformity(out), abs=1e-12)


def test_uniformity_probe_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown augmentation 'crop'; choose one of "):
        Uniformity(augmentation="crop")
    with pytest.raises(ValueError, match="unknown capture 'grad'; choose one of input, output"):
        Uniformity(capture="grad")
    with pytest.raises(ValueError, match="max_pairs_examples must be a positive integer"):
        Uniformity(max_pairs_examples=1)
