"""Landscape topology: basins, persistence and merge tree on analytic surfaces and against a brute-force reference."""

import heapq
import itertools

import numpy as np
import pytest
import torch

from lossatlas import models
from lossatlas.batches import as_batches
from lossatlas.probes import ProbeContext
from lossatlas.probes.surface import Surface
from lossatlas.probes.topology import Topology, merge_tree, persistence_diagram, surface_topology, topology_of

pytest.importorskip("gudhi")


def _neighbours(idx, shape):
    coord = np.unravel_index(idx, shape)
    for axis in range(len(shape)):
        for step in (-1, 1):
            c = list(coord)
            c[axis] += step
            if 0 <= c[axis] < shape[axis]:
                yield int(np.ravel_multi_index(tuple(c), shape))


def brute_force_pairs(z):
    """Elder-rule pairs by definition: a minimum dies at the lowest level c at which a path with max ≤ c reaches an
    older vertex (lower (value, index)); found by a bottleneck (minimax) Dijkstra from every local minimum."""
    flat, shape = z.ravel(), z.shape
    key = lambda v: (flat[v], v)  # noqa: E731
    pairs = []
    for v in range(flat.size):
        if any(key(u) < key(v) for u in _neighbours(v, shape)):
            continue  # not a local minimum
        best = {v: flat[v]}
        heap = [(flat[v], v)]
        death = np.inf
        while heap:
            level, u = heapq.heappop(heap)
            if level > best.get(u, np.inf):
                continue
            if key(u) < key(v):
                death = level
                break
            for w in _neighbours(u, shape):
                lw = max(level, flat[w])
                if lw < best.get(w, np.inf):
                    best[w] = lw
                    heapq.heappush(heap, (lw, w))
        if death > flat[v]:
            pairs.append((flat[v], death))
    return sorted(pairs)


def test_cosine_product_has_four_basins_of_depth_one():
    # f(x, y) = cos x cos y on [−π/2, 5π/2]²: minima −1 at (π, 0), (0, π), (2π, π), (π, 2π), all joined at the
    # saddles (π/2 + mπ, π/2 + nπ) of value 0; maxima +1, so the global basin's depth is the range 2
    x = np.linspace(-np.pi / 2, 5 * np.pi / 2, 61)  # spacing π/20: every minimum and saddle is a grid point
    y = x.copy()
    z = np.cos(x)[None, :] * np.cos(y)[:, None]
    topo = surface_topology(z, [y, x], min_persistence=1e-9)  # cos(π/2) = 6e-17: float noise, not basins
    assert topo["num_basins"] == 4
    np.testing.assert_allclose(topo["basin_depth"], [2.0, 1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(topo["basin_min"], -1.0, atol=1e-12)
    np.testing.assert_allclose(topo["basin_saddle"][1:], 0.0, atol=1e-12)
    assert np.isnan(topo["basin_saddle"][0]) and np.isinf(topo["death"][0])
    minima = {(round(a / np.pi, 9), round(b / np.pi, 9)) for a, b in zip(topo["basin_min_at"][1], topo["basin_min_at"][0])}
    assert minima == {(1.0, 0.0), (0.0, 1.0), (2.0, 1.0), (1.0, 2.0)}
    for sx, sy in zip(topo["basin_saddle_at"][1][1:], topo["basin_saddle_at"][0][1:]):
        assert abs(np.cos(sx) * np.cos(sy)) < 1e-12  # each saddle lies on a zero line through a saddle point
    # the merge tree, pruned of the float-noise basins, keeps exactly these four minima
    tree = merge_tree(np.round(z, 12))
    leaves = tree["kind"] == 0
    assert leaves.sum() == 4 and np.allclose(tree["value"][leaves], -1.0)
    assert (tree["parent"] < 0).sum() == 1


def test_tilted_double_well_is_exact_to_grid_precision():
    # f(x, y) = g(x) + y², g(x) = (x² − 1)² + 0.3x: two minima on y = 0, the saddle at g's local maximum
    g = lambda u: (u**2 - 1) ** 2 + 0.3 * u  # noqa: E731
    x, y = np.linspace(-2, 2, 161), np.linspace(-1, 1, 41)
    z = g(x)[None, :] + y[:, None] ** 2
    topo = surface_topology(z, [y, x])
    assert topo["num_basins"] == 2
    # the grid's exact answer: a path between the wells crosses every column between them, at best on y = 0
    gx = g(x)
    left, right = np.argmin(np.where(x < 0, gx, np.inf)), np.argmin(np.where(x > 0, gx, np.inf))
    saddle = gx[left:right + 1].max()
    assert topo["basin_min"][0] == pytest.approx(gx[left], abs=1e-12)
    assert topo["basin_min"][1] == pytest.approx(gx[right], abs=1e-12)
    assert topo["basin_saddle"][1] == pytest.approx(saddle, abs=1e-12)
    assert topo["basin_depth"][1] == pytest.approx(saddle - gx[right], abs=1e-12)
    assert topo["basin_depth"][0] == pytest.approx(z.max() - z.min(), abs=1e-12)
    assert topo["basin_saddle_at"][0][1] == 0.0  # on y = 0
    # against the continuum: critical points of g from its cubic g'(u) = 4u³ − 4u + 0.3, to O(h²)
    crit = np.sort(np.roots([4.0, 0.0, -4.0, 0.3]).real)
    h = x[1] - x[0]
    assert topo["basin_saddle"][1] == pytest.approx(g(crit[1]), abs=4 * h**2)
    assert topo["basin_min"][1] == pytest.approx(g(crit[2]), abs=4 * h**2)
    assert topo["basin_min"][0] == pytest.approx(g(crit[0]), abs=4 * h**2)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7), (40,)])
def test_gudhi_pairs_merge_tree_and_brute_force_agree(shape):
    rng = np.random.default_rng(sum(shape))
    z = rng.normal(size=shape)
    z.ravel()[3] = z.ravel()[4]  # a tie
    diag = persistence_diagram(z)
    gudhi_pairs = sorted(zip(diag["birth"], diag["death"]))
    ref = brute_force_pairs(z)
    assert len(gudhi_pairs) == len(ref) > 3
    np.testing.assert_array_equal(np.array(gudhi_pairs), np.array(ref))
    tree = merge_tree(z)
    leaves = tree["kind"] == 0
    np.testing.assert_array_equal(np.array(sorted(zip(tree["value"][leaves], tree["death"][leaves]))), np.array(ref))
    # a tree: every join has two or more children, one root, leaves sit at their pair's minimum index
    parent = tree["parent"]
    assert (parent < 0).sum() == 1
    for node in np.flatnonzero(tree["kind"] == 1):
        kids = np.flatnonzero(parent == node)
        assert len(kids) >= 2 and (tree["value"][kids] <= tree["value"][node]).all()
    # leaves sit at minima of the same values (under a tie, gudhi may pick the other of two equal vertices)
    np.testing.assert_array_equal(np.sort(z.ravel()[tree["index"][leaves]]), np.sort(z.ravel()[diag["birth_index"]]))
    np.testing.assert_array_equal(np.sort(z.ravel()[tree["index"][leaves]]), np.sort(diag["birth"]))


def test_min_persistence_counts_only_deep_basins():
    x = np.linspace(-3, 3, 121)
    z = -np.exp(-(x[None, :] - 1.5) ** 2 - x[:, None] ** 2) - 0.05 * np.exp(-(x[None, :] + 1.5) ** 2 - x[:, None] ** 2)
    assert surface_topology(z, [x, x])["num_basins"] == 2
    assert surface_topology(z, [x, x], min_persistence=0.1)["num_basins"] == 1
    with pytest.raises(ValueError):
        surface_topology(z, [x, x], min_persistence=-1.0)
    with pytest.raises(ValueError):
        surface_topology(z, [x[:-1], x])


@pytest.fixture(scope="module")
def ctx():
    torch.manual_seed(0)
    model = models.build_model({"name": "mlp", "kwargs": {"widths": [64, 8, 10]}})
    xs, ys = models.build_data({"name": "digits"})
    return ProbeContext(model=model, data=as_batches((xs[:60], ys[:60]), 30), loss="cross_entropy", step=3)


def test_probe_equals_the_analysis_of_its_surface(ctx):
    settings = {"xrange": (-1.0, 1.0, 7), "yrange": (-0.5, 0.5, 5), "seed": 5}
    got = Topology(**settings, min_persistence=0.01).run(ctx)
    surf = Surface(dims=2, quadratic_check=False, **settings).run(ctx)
    want = topology_of(surf, min_persistence=0.01)
    np.testing.assert_array_equal(got.values["loss"], surf.values["loss"])
    for k in ("persistence_birth", "persistence_death", "basin_depth", "tree_value", "tree_parent", "num_basins"):
        np.testing.assert_array_equal(got.values[k], want.values[k], err_msg=k)
    assert got.dims["loss"] == ("y", "x") and got.dims["basin_depth"] == ("basin",)
    assert int(got.values["num_basins"]) == len(got.values["basin_depth"]) >= 1
    with pytest.raises(ValueError):
        topology_of(Surface(dims=1, xrange=(-1.0, 1.0, 3), quadratic_check=False).run(ctx))


def test_figures_draw():
    from lossatlas.probes.base import Result
    from lossatlas.viz.figures import interactive_figures, paper_figure

    x = np.linspace(-np.pi / 2, 5 * np.pi / 2, 25)
    z = np.cos(x)[None, :] * np.cos(x)[:, None]
    surf = Result(probe="surface", config={}, step=1, values={"loss": z}, dims={"loss": ("y", "x")},
                  coords={"x": x, "y": x}, meta={"status": "complete"})
    res = topology_of(surf, min_persistence=1e-9)
    fig = paper_figure("topology", [res])
    assert len(fig.axes) >= 3
    figs = interactive_figures("topology", [res])
    assert sum(f is not None for f in figs) == 2


def test_every_pair_is_a_basin_in_small_exhaustive_grids():
    # every 2×3 grid of the values 0..5 (a permutation): the diagram equals the brute-force reference
    for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 7):
        z = np.array(perm, dtype=float).reshape(2, 3)
        ref = brute_force_pairs(z)
        diag = persistence_diagram(z)
        assert sorted(zip(diag["birth"], diag["death"])) == ref
