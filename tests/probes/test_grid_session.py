"""Point sessions of PointEvaluator: in-place θ* + Σ c_k d_k, the module swapped once, values read back per chunk.

Every session result must carry the bits of the per-point path (``linear_combination`` + ``functional_call``),
and its loss must match a deepcopy brute force.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas import losses as L
from lossatlas.probes import grid as G
from lossatlas.probes.directions import model_state, random_direction
from lossatlas.probes.grid import PointEvaluator, evaluate_grid, grid_points
from lossatlas.probes.paramdicts import linear_combination

import reference


def _cnn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).to(dtype).eval()


def _data(dtype=torch.float32) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)) for n in (6, 3)]


def _dirs(model, k: int = 2, seed: int = 0):
    base = model_state(model, "weights")
    g = torch.Generator().manual_seed(seed)
    return base, [random_direction(model, base, generator=g, ignore="none") for _ in range(k)]


def _old_path(monkeypatch) -> None:
    monkeypatch.setattr(PointEvaluator, "_session_ok", lambda self: False)


@pytest.mark.parametrize("k, partial", [(1, None), (2, -1), (2, 0), (3, -1), (3, 1)])
def test_fill_is_bitwise_linear_combination(k, partial):
    """fill() = linear_combination bit for bit: -0.0 vs 0.0, partial directions, full and empty column caches."""
    model = _cnn()
    base, dirs = _dirs(model, k)
    if partial is not None:  # that direction lacks the conv bias and the last layer's weight: added nowhere there
        del dirs[partial].tensors["0.bias"], dirs[partial].tensors["4.weight"]
    ev = PointEvaluator(model, base, dirs, _data(), "cross_entropy")
    grid = np.array([[a] + [b] * (k - 1) for b in (-0.75, -0.0, 0.0, 0.3) for a in (0.5, -0.0, 0.0, -1.0, 0.5)])
    for max_columns in (None, 1):  # the session's own column budget, then a cache that is nearly always full
        with ev.session():
            live = ev._live
            if max_columns is not None:
                live.max_columns, live.columns = min(live.max_columns, max_columns), {}
            for c in grid:
                live.fill(c)
                want = linear_combination(ev.state, c, ev.dirs, ev.moving)
                for name in ev.moving:
                    got = live.views[name]
                    assert torch.equal(got, want[name]), (c, name)
                    # bitwise: the sign of zero too
                    assert torch.equal(torch.signbit(got), torch.signbit(want[name])), (c, name)
            assert max_columns is None or len(live.columns) <= 1
            assert (len(live.columns) > 0) == (k >= 2 and partial != 0)  # columns only when d_1 spans every tensor


@pytest.mark.parametrize("first_layer", [True, False])
def test_session_grid_bitwise_equals_per_point_path_and_brute_force(first_layer, monkeypatch):
    """Loss, accuracy and an extra metric over a 2-D grid: identical bits to functional_call per point."""
    model = _cnn()
    data = _data()
    base, dirs = _dirs(model)
    pts = grid_points(np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3))
    metrics = {"mse": G.METRICS["mse"]}
    ev = PointEvaluator(model, base, dirs, data, "cross_entropy", metrics=metrics, first_layer=first_layer)
    assert ev._session_ok()
    new, _ = evaluate_grid(ev, pts, chunk_size=1)
    assert (ev.first_layer_name == "0") == first_layer
    with monkeypatch.context() as m:
        _old_path(m)
        old_ev = PointEvaluator(model, base, dirs, data, "cross_entropy", metrics=metrics, first_layer=first_layer)
        old, _ = evaluate_grid(old_ev, pts, chunk_size=1)
    for name in ("loss", "accuracy", "mse"):
        assert np.array_equal(new[name], old[name]), name
    for i in (0, 7, 14):  # brute force: a deepcopy with the point's weights written in, float64 loss
        ref = copy.deepcopy(model).double()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(base[n].double() + pts[i, 0] * dirs[0].tensors[n].double() + pts[i, 1] * dirs[1].tensors[n].double())
        dd = [(x.double(), y) for x, y in data]
        assert abs(new["loss"][i] - reference.loss_value(ref, dd, "cross_entropy")) < 1e-5 * max(1.0, new["loss"][i])
        assert new["accuracy"][i] == pytest.approx(reference.accuracy(ref, dd), abs=1e-12)


def test_session_restores_the_module_and_tolerates_other_calls():
    """After (and during an error in) a session the module holds its own Parameters and forward again."""
    model = _cnn()
    data = _data()
    base, dirs = _dirs(model)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ev = PointEvaluator(model, base, dirs, data, "cross_entropy")
    with pytest.raises(RuntimeError, match="boom"):
        with ev.session():
            ev.evaluate(np.array([[0.5, -0.5]]))
            with torch.no_grad():  # a direct call inside the session: the first layer computes itself
                direct = model(data[0][0])
            fresh = torch.func.functional_call(copy.deepcopy(model), dict(ev._live.views), (data[0][0],))
            assert torch.allclose(direct, fresh, rtol=1e-5, atol=1e-6)
            raise RuntimeError("boom")
    assert dict(model.named_parameters()) == params and all(isinstance(p, nn.Parameter) for p in params.values())
    assert "forward" not in vars(model[0]) and model.training is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_session_off_where_it_cannot_keep_the_bits():
    """bn=recompute, a direction in another dtype, or too many bytes: the per-point path."""
    model = _cnn()
    base, dirs = _dirs(model)
    assert not PointEvaluator(model, base, dirs, _data(), "cross_entropy", bn="recompute")._session_ok()
    mixed = [{k: v.double() for k, v in dirs[0].tensors.items()}, dirs[1]]
    assert not PointEvaluator(model, base, mixed, _data(), "cross_entropy")._session_ok()
    ev = PointEvaluator(model, base, dirs, _data(), "cross_entropy")
    assert ev._session_ok()
    saved = G.SESSION_BYTES
    try:
        G.SESSION_BYTES = 16
        assert not ev._session_ok()
    finally:
        G.SESSION_BYTES = saved


@pytest.mark.parametrize("shape", [(40, 7), (3, 5, 7)])
def test_correct_count_equals_argmax_with_ties_nans_and_ignored_labels(shape):
    """The amax shortcut counts exactly what argmax counts: first maximum on ties, NaN as the maximum."""
    g = torch.Generator().manual_seed(3)
    out = torch.randint(0, 3, shape, generator=g).float()  # few values: many ties
    flat = out.view(-1, shape[-1])
    flat[1, 2] = float("nan")
    flat[4, :] = float("nan")
    flat[5, 0] = -0.0
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    yf = y.view(-1)
    yf[1], yf[4], yf[6] = 2, 0, -100  # a NaN at the label, an all-NaN row, an ignored label
    got = G._correct_count(out, y, "cross_entropy")
    want = L.correct_count(out, y, "cross_entropy")
    # the brute force: the first index of the row's maximum (NaN counts as the maximum)
    brute = 0
    for row, lab in zip(flat.tolist(), yf.tolist()):
        nan = [i for i, v in enumerate(row) if v != v]
        best = nan[0] if nan else row.index(max(row))
        brute += int(best == lab)
    assert int(got) == want == brute
    assert 0 < brute < flat.shape[0]
