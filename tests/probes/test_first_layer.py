"""The first-layer trick of PointEvaluator: f₁(x; W + Σ c_k D_k) = f₁(x; W) + Σ c_k f₁(x; D_k), served from cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.directions import random_direction
from lossatlas.probes.grid import PointEvaluator, evaluate_grid, grid_points

import reference


class CountingLinear(nn.Linear):
    """nn.Linear that counts how often its own forward runs."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


class Scale(nn.Module):
    def forward(self, x):
        return 2.0 * x


def _mlp(first: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [first] if first is not None else []
    layers += [CountingLinear(6, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double().eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).double().eval()


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 5)
        self.head = nn.Linear(5, 11)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def _data(kind: str) -> list:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return [(torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))
                for _ in range(2)]
    if kind == "cnn":
        return [(torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
                for _ in range(2)]
    seq = torch.randint(0, 11, (2, 3, 5), generator=g)
    return [(s, torch.randint(0, 11, (3, 5), generator=g)) for s in seq]


def _brute(model, dirs, data, point) -> float:
    """The loss at θ* + Σ c_k d_k from a deepcopy with the parameters written in (no trick anywhere)."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            for c, d in zip(point, dirs):
                if k in d.tensors:
                    p.add_(float(c) * d.tensors[k])
    return reference.loss_value(ref, data, "cross_entropy")


@pytest.mark.parametrize("kind, layer", [("mlp", "0"), ("cnn", "0"), ("lm", "emb")])
def test_trick_equals_brute_force_and_is_used(kind, layer):
    model = {"mlp": _mlp, "cnn": _cnn, "lm": TinyLM}[kind]()
    model = model.double() if kind == "lm" else model
    data = _data(kind)
    dirs = [random_direction(model, seed=s, norm="layer", ignore="none") for s in (3, 4)]
    pts = grid_points(np.linspace(-1, 1, 3), np.linspace(-0.5, 1, 3))
    ev = PointEvaluator(model, {}, dirs, data, "cross_entropy", vectorize=False)
    got, _ = evaluate_grid(ev, pts, chunk_size=1)
    assert ev.first_layer_name == layer
    plain, _ = evaluate_grid(PointEvaluator(model, {}, dirs, data, "cross_entropy", first_layer=False), pts, chunk_size=1)
    np.testing.assert_allclose(got["loss"], plain["loss"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got["accuracy"], plain["accuracy"])
    for i in (0, 4, 8):
        assert got["loss"][i] == pytest.approx(_brute(model, dirs, data, pts[i]), rel=1e-12)


def test_first_layer_forward_is_skipped_at_every_point():
    model, data = _mlp(), _data("mlp")
    dirs = [random_direction(model, seed=s) for s in (3, 4)]
    pts = grid_points(np.linspace(-1, 1, 3), np.linspace(-1, 1, 2))
    for use, per_point in ((True, 0), (False, len(data))):
        ev = PointEvaluator(model, {}, dirs, data, "cross_entropy", vectorize=False, first_layer=use)
        ev.evaluate(pts[:1])  # builds the cache (a fixed number of first-layer calls)
        before = CountingLinear.calls
        ev.evaluate(pts)
        assert CountingLinear.calls - before == per_point * len(pts)


def test_vmapped_chunks_with_the_trick_match_and_are_reproducible():
    model, data = _cnn(), _data("cnn")
    dirs = [random_direction(model, seed=s) for s in (3, 4)]
    pts = grid_points(np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
    loop, _ = evaluate_grid(PointEvaluator(model, {}, dirs, data, "cross_entropy", vectorize=False), pts, chunk_size=1)
    for c in (3, 5):
        ev = PointEvaluator(model, {}, dirs, data, "cross_entropy")
        vm, _ = evaluate_grid(ev, pts, chunk_size=c)
        assert ev.vectorized_ok and ev.first_layer_name == "0"
        np.testing.assert_allclose(vm["loss"], loop["loss"], rtol=1e-12, atol=0)
        again, _ = evaluate_grid(PointEvaluator(model, {}, dirs, data, "cross_entropy"), pts, chunk_size=c)
        assert np.array_equal(again["loss"], vm["loss"])


def test_not_applied_when_the_first_layer_does_not_read_the_input():
    model, data = _mlp(first=Scale()), _data("mlp")  # the Linear reads 2x, not x
    dirs = [random_direction(model, seed=3)]
    pts = np.array([[0.3], [-0.7]])
    ev = PointEvaluator(model, {}, dirs, data, "cross_entropy")
    got = ev.evaluate(pts)["loss"]
    assert ev.first_layer_name is None
    for i in range(2):
        assert got[i] == pytest.approx(_brute(model, dirs, data, pts[i]), rel=1e-12)
