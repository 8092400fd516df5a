"""Landscape topology: the merge tree and 0-dimensional sublevel-set persistence of a loss surface.

Geniesse, Chen, Xie, Mahoney, Dong 2024, "Visualizing, Analyzing and Constructing Loss Landscapes with
Topology" (after Edelsbrunner, Letscher, Zomorodian 2002, "Topological Persistence and Simplification"). The
surface Z, sampled on a grid (any number of axes), is a cubical complex whose vertices carry the values and
whose edges join axis neighbours (4-connectivity in 2-D), an edge entering at the larger of its two values. As
the level c rises, the sublevel set {Z ≤ c} gains components at local minima and loses them where two
components meet (a saddle of the grid). Elder rule: the younger component (the higher minimum) dies there, so
each basin is a pair (birth b = its minimum, death d = the saddle value where it merges into an older basin)
with persistence, its depth, d − b; the global basin never dies (d = ∞).

- Persistence diagram: computed by ``gudhi.CubicalComplex(vertices=Z)`` (the ``topology`` extra:
  ``pip install lossatlas[topology]``); pairs of zero persistence (plateaus, ties) are dropped.
- Basins: the pairs with persistence > ``min_persistence``·(max Z − min Z) (default 0: every basin of positive
  depth), the global one included; the depth of the global basin is reported as max Z − min Z.
- Merge tree (the join tree of the sublevel sets): one union-find pass over the vertices in increasing value
  (ties by flat index): leaves at the minima, an internal node where components meet; nodes of zero persistence
  are pruned. Its pairs equal gudhi's diagram (the test checks both).

The ``topology`` probe evaluates the 2-D surface (the ``surface`` probe's settings and defaults) and analyses it;
``topology_of`` analyses a stored ``surface`` Result or an array passed in Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.directions import DEFAULT_SEED
from lossatlas.probes.settings import check_finite_number

DEFINITION = ("0-dimensional sublevel-set persistence of the surface on its grid (vertices carry the values, "
              "edges join axis neighbours); a basin's depth is its persistence, saddle value − minimum value "
              "(Geniesse et al. 2024)")


def _gudhi():
    try:
        import gudhi
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError("landscape topology needs gudhi: pip install 'lossatlas[topology]' (or pip install gudhi)") from exc
    return gudhi


def _finite_grid(values: np.ndarray) -> np.ndarray:
    z = np.asarray(values, dtype=np.float64)
    if z.ndim < 1 or z.size < 1:
        raise ValueError(f"the surface must be a non-empty grid of values, got shape {z.shape}")
    if not np.isfinite(z).any():
        raise ValueError("the surface holds no finite value; evaluate it on a narrower range")
    return np.where(np.isfinite(z), z, np.inf)  # NaN/overflow: the top of the landscape, entering last


def persistence_diagram(values: np.ndarray) -> dict[str, np.ndarray]:
    """The 0-dimensional sublevel-set persistence pairs of a grid of values, by ``gudhi.CubicalComplex``.

    Returns "birth", "death" (∞ for the global basin) and "birth_index"/"death_index" (the flat C-order indices
    of the minimum and of the saddle vertex, −1 for none), sorted by persistence, deepest first; pairs of zero
    persistence are dropped.
    """
    z = _finite_grid(values)
    cc = _gudhi().CubicalComplex(vertices=z)
    cc.compute_persistence(homology_coeff_field=2, min_persistence=-1.0)  # keep every pair; filtered below
    regular, essential = cc.vertices_of_persistence_pairs()

    def c_order(idx: np.ndarray) -> np.ndarray:  # gudhi numbers vertices in Fortran order
        return np.ravel_multi_index(np.unravel_index(np.asarray(idx, dtype=np.int64), z.shape, order="F"), z.shape)

    pairs = np.asarray(regular[0], dtype=np.int64).reshape(-1, 2) if len(regular) else np.zeros((0, 2), np.int64)
    born = c_order(pairs[:, 0])
    died = c_order(pairs[:, 1])
    flat = z.ravel()
    keep = flat[died] > flat[born]
    ess = c_order(np.asarray(essential[0], dtype=np.int64)) if len(essential) else np.zeros(0, np.int64)
    birth = np.concatenate([flat[ess], flat[born[keep]]])
    death = np.concatenate([np.full(len(ess), np.inf), flat[died[keep]]])
    b_idx = np.concatenate([ess, born[keep]])
    d_idx = np.concatenate([np.full(len(ess), -1), died[keep]])
    order = np.lexsort((b_idx, -(death - birth)))  # deepest first; ties by the minimum's index
    return {"birth": birth[order], "death": death[order], "birth_index": b_idx[order], "death_index": d_idx[order]}


def merge_tree(values: np.ndarray) -> dict[str, np.ndarray]:
    """The merge (join) tree of the sublevel sets of a grid, by union-find over axis neighbours.

    Vertices enter in increasing value (ties by flat C-order index). A vertex with no lower neighbour opens a
    component (a leaf: a minimum); one that touches k ≥ 2 components joins them (a node: a saddle), whose children
    are each component's latest node; the oldest component (lowest minimum) lives on, the others die there.
    Leaves whose persistence is 0 are pruned and nodes left with one child are spliced out. Returns, per node,
    "value", "index" (flat C-order vertex), "parent" (node number, −1 at the root), "kind" (0 minimum,
    1 saddle), and "death" (per leaf: the saddle value where its basin dies, ∞ for the global one).
    """
    z = _finite_grid(values)
    flat = z.ravel()
    shape = z.shape
    order = np.lexsort((np.arange(flat.size), flat))
    parent = np.full(flat.size, -1, dtype=np.int64)  # union-find over entered vertices; -1: not entered yet
    comp_min: dict[int, int] = {}  # root -> the vertex of its minimum
    comp_node: dict[int, int] = {}  # root -> its latest tree node
    vertex: list[int] = []
    kind: list[int] = []
    up: list[int] = []
    death: list[float] = []  # per node: for a leaf, the value where its basin dies (∞: never)
    leaf_of: dict[int, int] = {}  # minimum vertex -> its leaf node

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]  # path halving
            v = int(parent[v])
        return v

    def new_node(v: int, k: int) -> int:
        vertex.append(v), kind.append(k), up.append(-1), death.append(np.inf)
        return len(vertex) - 1

    strides = [int(np.prod(shape[a + 1:])) for a in range(len(shape))]  # C-order stride of each axis
    for v in (int(i) for i in order):
        coord = np.unravel_index(v, shape)
        roots = {find(v + step * stride) for axis, stride in enumerate(strides) for step in (-1, 1)
                 if 0 <= coord[axis] + step < shape[axis] and parent[v + step * stride] >= 0}
        parent[v] = v
        if not roots:  # a new basin: a leaf
            comp_min[v] = v
            comp_node[v] = leaf_of[v] = new_node(v, 0)
            continue
        ranked = sorted(roots, key=lambda r: (flat[comp_min[r]], comp_min[r]))  # the elder first
        elder = ranked[0]
        parent[v] = elder
        if len(ranked) == 1:
            continue
        node = new_node(v, 1)
        for r in ranked:
            up[comp_node[r]] = node
            parent[r] = elder
        for r in ranked[1:]:  # the younger basins die at this saddle (elder rule)
            death[leaf_of[comp_min.pop(r)]] = flat[v]
            comp_node.pop(r)
        comp_node[elder] = node
    return _prune(flat, np.array(vertex, np.int64), np.array(kind, np.int64), np.array(up, np.int64),
                  np.array(death, np.float64))


def _prune(flat: np.ndarray, vertex: np.ndarray, kind: np.ndarray, up: np.ndarray,
           death: np.ndarray) -> dict[str, np.ndarray]:
    """The tree without leaves of zero persistence and without saddles left with one child (renumbered)."""
    alive = ~((kind == 0) & (death <= flat[vertex]))  # a basin of depth 0 is no basin
    up = up.copy()
    for i in np.flatnonzero(kind == 1):  # in creation order: a node's children were created before it
        live = [c for c in np.flatnonzero(up == i) if alive[c]]
        if len(live) <= 1:
            alive[i] = False
            for c in live:
                up[c] = up[i]  # splice the node out: its one child hangs from its parent
    keep = np.flatnonzero(alive)
    renum = {int(old): new for new, old in enumerate(keep)}
    return {"value": flat[vertex[keep]], "index": vertex[keep], "kind": kind[keep],
            "parent": np.array([renum.get(int(up[i]), -1) for i in keep], dtype=np.int64),
            "death": np.where(kind[keep] == 0, death[keep], np.nan)}


def surface_topology(values: np.ndarray, axes: Sequence[np.ndarray] | None = None, *,
                     min_persistence: float = 0.0) -> dict:
    """Persistence diagram, basins and merge tree of a grid ``values`` whose axis k has coordinates ``axes[k]``.

    ``axes`` default to the indices. Basins: pairs with persistence > ``min_persistence``·(max − min) over
    the finite values (the global basin always counts); ``basin_depth`` is d − b, max − min for the global one.
    Returns the diagram (``persistence_diagram``), "basin_*" arrays (depth, minimum value and location per axis,
    saddle value and location, NaN for the global one), the tree (``merge_tree``, node locations per axis),
    "num_basins", "total_persistence" (Σ depth of the finite pairs counted) and "value_range".
    """
    z = _finite_grid(values)
    axes = [np.arange(n, dtype=np.float64) for n in z.shape] if axes is None else [np.asarray(a, np.float64) for a in axes]
    if [len(a) for a in axes] != list(z.shape):
        raise ValueError(f"axes of lengths {[len(a) for a in axes]} do not match the grid's shape {z.shape}")
    check_finite_number("min_persistence", min_persistence, minimum=0.0)
    finite = z[np.isfinite(z)]
    span = float(finite.max() - finite.min())
    diag = persistence_diagram(z)
    depth = np.where(np.isfinite(diag["death"]), diag["death"] - diag["birth"], span)
    counted = (depth > min_persistence * span) | ~np.isfinite(diag["death"])
    tree = merge_tree(z)

    def where(idx: np.ndarray) -> list[np.ndarray]:  # coordinates per axis, NaN for index −1
        sub = np.unravel_index(np.maximum(idx, 0), z.shape)
        return [np.where(idx >= 0, a[s], np.nan) for a, s in zip(axes, sub)]

    out = {**diag, "basin_depth": depth[counted], "basin_min": diag["birth"][counted],
           "basin_saddle": np.where(np.isfinite(diag["death"][counted]), diag["death"][counted], np.nan),
           "basin_min_at": where(diag["birth_index"][counted]), "basin_saddle_at": where(diag["death_index"][counted]),
           "tree": tree, "tree_at": where(tree["index"]), "num_basins": int(counted.sum()),
           "total_persistence": float(depth[counted][np.isfinite(diag["death"][counted])].sum()), "value_range": span}
    return out


def add_topology(res: Result, values: np.ndarray, x: np.ndarray, y: np.ndarray, min_persistence: float) -> Result:
    """Add the topology of the (ny, nx) grid ``values`` (``Z[i, j]`` at (x_j, y_i)) to ``res``; returns it."""
    topo = surface_topology(values, [y, x], min_persistence=min_persistence)
    pair = {"pair": np.arange(len(topo["birth"]))}
    res.add("persistence_birth", topo["birth"], ("pair",), pair)
    res.add("persistence_death", topo["death"], ("pair",), pair)
    basin = {"basin": np.arange(topo["num_basins"])}
    res.add("basin_depth", topo["basin_depth"], ("basin",), basin)
    res.add("basin_min", topo["basin_min"], ("basin",))
    res.add("basin_saddle", topo["basin_saddle"], ("basin",))
    for axis, name in ((1, "x"), (0, "y")):  # axes of the grid: y first, x second
        res.add(f"basin_min_{name}", topo["basin_min_at"][axis], ("basin",))
        res.add(f"basin_saddle_{name}", topo["basin_saddle_at"][axis], ("basin",))
        res.add(f"tree_{name}", topo["tree_at"][axis], ("node",))
    tree = topo["tree"]
    res.add("tree_value", tree["value"], ("node",), {"node": np.arange(len(tree["value"]))})
    res.add("tree_parent", tree["parent"], ("node",))
    res.add("tree_kind", tree["kind"], ("node",))
    res.add("num_basins", np.int64(topo["num_basins"]))
    res.add("total_persistence", np.float64(topo["total_persistence"]))
    res.add("value_range", np.float64(topo["value_range"]))
    res.meta["topology"] = DEFINITION
    return res


def topology_of(surface: Result, *, min_persistence: float = 0.0, value: str = "loss") -> Result:
    """The topology Result of a computed 2-D ``surface`` Result (e.g. read from the results file).

    Its config is the surface's with ``min_persistence``; the grid ``value`` ("loss" by default) and the
    axes x, y are copied in. ValueError for a 1-D or partial surface.
    """
    if value not in surface.values or tuple(surface.dims[value]) != ("y", "x"):
        raise ValueError(f"topology needs a 2-D surface with {value!r} over (y, x); compute one with `lossatlas surface`")
    if surface.meta.get("status", "complete") != "complete":
        raise ValueError("the surface is partial; finish it (rerun `lossatlas surface`) before its topology")
    x, y = np.asarray(surface.coords["x"]), np.asarray(surface.coords["y"])
    config = {**surface.config, "min_persistence": float(min_persistence), "value": value}
    res = Result(probe="topology", config=config, step=surface.step, values={},
                 meta={"status": "complete", "from": "surface", "loss": surface.meta.get("loss")})
    res.add("loss", np.asarray(surface.values[value], dtype=np.float64), ("y", "x"), {"x": x, "y": y})
    return add_topology(res, res.values["loss"], x, y, min_persistence)


@register_probe
@dataclass(frozen=True, kw_only=True)
class Topology(Probe):
    """Basins of the 2-D loss surface: merge tree and 0-dim sublevel-set persistence (Geniesse et al. 2024).

    Evaluates the surface θ* + α d_x + β d_y as the ``surface`` probe does (same settings and defaults), then
    its persistence diagram (gudhi), basins (minimum, saddle, depth = saddle − minimum) and merge tree.

    Attributes:
        xrange / yrange: the grid (min, max, num) of α and β (default (−1, 1, 51); yrange None: as xrange).
        directions: "random" (default), "pca", "eigenvectors" or "checkpoints", as for ``surface``.
        norm / ignore / dir_type / seed: the random directions' normalisation, as for ``surface``.
        x_step / y_step: the checkpoints of directions="checkpoints".
        bn: "keep" (default) or "recompute" BN statistics at every point; bn_batches: the batches that do it.
        chunk_size: points per vectorized forward (None: automatic).
        min_persistence: a basin counts when its depth exceeds this fraction of the surface's value range
            (default 0: every basin of positive depth).
    """

    name: ClassVar[str] = "topology"
    summary: ClassVar[str] = "basins of the 2-D loss surface: merge tree and persistence diagram"
    section: ClassVar[str] = "landscape"
    title: ClassVar[str] = "Landscape topology"
    figure: ClassVar[str | None] = "topology"
    usage: ClassVar[str] = "--step last"
    xrange: tuple[float, float, int] = (-1.0, 1.0, 51)
    yrange: tuple[float, float, int] | None = None
    directions: str = "random"
    norm: str = "filter"
    ignore: str = "biasbn"
    dir_type: str = "weights"
    seed: int = DEFAULT_SEED
    x_step: int | None = None
    y_step: int | None = None
    bn: str = "keep"
    bn_batches: int | None = None
    chunk_size: int | None = None
    min_persistence: float = 0.0

    def _surface(self):
        from lossatlas.probes.surface import Surface

        return Surface(dims=2, xrange=self.xrange, yrange=self.yrange, directions=self.directions, norm=self.norm,
                       ignore=self.ignore, dir_type=self.dir_type, seed=self.seed, x_step=self.x_step,
                       y_step=self.y_step, bn=self.bn, bn_batches=self.bn_batches, chunk_size=self.chunk_size,
                       quadratic_check=False)

    def validate(self) -> None:
        """ValueError for a surface setting out of range (as ``surface`` refuses it) or a negative ``min_persistence``."""
        self._surface()  # the surface's own checks
        check_finite_number("min_persistence", self.min_persistence, minimum=0.0)

    def run(self, ctx: ProbeContext) -> Result:
        """Evaluate the 2-D surface, then add its persistence diagram, basins and merge tree.

        Values: "loss" and "accuracy" over ("y", "x"); "persistence_birth"/"persistence_death" over ("pair",)
        (death ∞ for the global basin); "basin_depth", "basin_min", "basin_saddle", "basin_min_x/y",
        "basin_saddle_x/y" over ("basin",); "tree_value", "tree_parent", "tree_kind", "tree_x/y" over ("node",);
        "num_basins", "total_persistence", "value_range".
        """
        import dataclasses

        t0 = time.perf_counter()
        _gudhi()  # fail before the surface's forward passes when gudhi is missing
        surface = self._surface().run(dataclasses.replace(ctx, partial=None, save_partial=None))
        x, y = surface.coords["x"], surface.coords["y"]
        res = self.new_result(ctx.step, {"status": "complete", "loss": ctx.loss, "bn": self.bn, "seed": int(self.seed),
                                         "indexing": "xy"})
        for k in ("loss", "accuracy"):
            res.add(k, surface.values[k], ("y", "x"), {"x": x, "y": y})
        add_topology(res, surface.values["loss"], x, y, self.min_persistence)
        res.meta["elapsed_s"] = time.perf_counter() - t0
        return res


__all__ = ["Topology", "add_topology", "merge_tree", "persistence_diagram", "surface_topology", "topology_of"]
