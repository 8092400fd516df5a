"""The ``block_heterogeneity`` probe: SLQ spectra of the Hessian's diagonal blocks and their JS⁰.

Zhang, Chen, Ding, Li, Sun & Luo 2024, "Why Transformers Need Adam: A Hessian Perspective" (NeurIPS): the
Hessian restricted to each parameter block B, H_BB = ∂²L/∂θ_B², has a spectral density ρ_B; in transformers the
blocks' spectra differ widely ("block heterogeneity"), in CNNs they are alike, and the average pairwise
Jensen–Shannon divergence between them,

    JS⁰ = (2 / (n(n − 1))) Σ_{i<j} JS(ρ_i ‖ ρ_j),   JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½(p + q),

predicts when SGD falls behind Adam.

Blocks (``partition="parameters"``, the paper's): one per parameter tensor (embedding, each attention Q/K/V/O
weight and bias, each MLP weight and bias, each norm, the head), with a fused QKV projection split into its
Q, K and V parts as the paper does: Hugging Face's GPT-2 ``c_attn`` (a Conv1D whose weight is (d, 3d): split by
columns), ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` and a Linear named ``qkv``,
``qkv_proj`` or ``Wqkv`` ((3d, d): split by rows); a layout interleaved by head (GPT-NeoX's ``query_key_value``)
stays one block. ``partition="layers"`` takes one block per module instead
(``lossatlas.curvature.parameter_blocks``, as the ``hessian_blocks`` probe). ``select`` keeps the blocks whose
name matches a regex.

Each block's density is estimated by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): ``num_probes``
runs of ``num_steps`` Lanczos steps (at most the block's size) give Ritz values θ_k and weights τ_k²; all
blocks' densities are smoothed on one common grid spanning every block's Ritz values, with one Gaussian
kernel of variance σ² = ``sigma_squared``·W² (W: the grid's width before padding, so JS⁰ does not change when
the loss is scaled), then normalized to probability masses p_i on the grid, between which JS is computed in
nats (JS ∈ [0, ln 2]). ``js0_distance`` is the average of the Jensen–Shannon distance √JS.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.curvature import parameter_blocks
from lossatlas.estimators import slq_density
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.settings import check_choice

PARTITIONS: tuple[str, ...] = ("parameters", "layers")
_FUSED_ROWS = re.compile(r"(^|\.)(qkv|qkv_proj|Wqkv)$")  # Linear modules whose weight stacks Q, K, V by rows
_KERNEL_HALF_WIDTH = 12.0  # kernel terms beyond 12σ (< 1e-31 of the peak) are skipped


@dataclass(frozen=True)
class HessianBlock:
    """One block of the partition: parameter tensors, or a slice of one tensor (a fused Q, K or V part).

    ``params`` are the parameter names the block lives in; ``index`` is None (the whole tensors) or the flat
    indices of the block's coordinates within the single tensor ``params[0]``.
    """

    name: str
    params: tuple[str, ...]
    index: Tensor | None = None

    def size(self, model: nn.Module) -> int:
        """The number of coordinates of the block."""
        if self.index is not None:
            return int(self.index.numel())
        named = dict(model.named_parameters())
        return int(sum(named[p].numel() for p in self.params))


def _fused_split(module: nn.Module, module_name: str, pname: str, p: Tensor) -> tuple[int, int] | None:
    """(axis, parts) along which ``module``'s parameter ``pname`` stacks Q, K and V, or None if it is not fused."""
    short = module_name.rsplit(".", 1)[-1]
    if type(module).__name__ == "Conv1D" and short == "c_attn":  # HF GPT-2: weight (d, 3d), bias (3d,)
        axis = p.ndim - 1
    elif isinstance(module, nn.MultiheadAttention) and pname in ("in_proj_weight", "in_proj_bias"):
        axis = 0  # (3d, d) and (3d,): rows q, k, v
    elif isinstance(module, nn.Linear) and _FUSED_ROWS.search(module_name):
        axis = 0
    else:
        return None
    return (axis, 3) if p.shape[axis] % 3 == 0 else None


def heterogeneity_blocks(model: nn.Module, partition: str = "parameters", *, split_qkv: bool = True,
                         select: str | None = None) -> list[HessianBlock]:
    """The blocks of ``model``'s trainable parameters, in model order (see the module docstring).

    ``partition``: "parameters" (one block per tensor, fused QKV split when ``split_qkv``) or "layers" (one per
    module). ``select``: a regex that a block's name must match. ValueError when no block is left.
    """
    check_choice("partition", partition, PARTITIONS)
    if partition == "layers":
        blocks = [HessianBlock(name or "(root)", tuple(ps)) for name, ps in parameter_blocks(model, "layer").items()]
    else:
        blocks = []
        seen: set[int] = set()  # a tied tensor (GPT-2's lm_head.weight is wte.weight) is one block, named once
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{mname}.{pname}" if mname else pname
                split = _fused_split(module, mname, pname, p) if split_qkv else None
                if split is None:
                    blocks.append(HessianBlock(full, (full,)))
                    continue
                axis, parts = split
                flat = torch.arange(p.numel()).reshape(p.shape)
                for label, chunk in zip("qkv", torch.chunk(flat, parts, dim=axis)):
                    blocks.append(HessianBlock(f"{full}[{label}]", (full,), chunk.reshape(-1).clone()))
    if select is not None:
        rx = re.compile(select)
        kept = [b for b in blocks if rx.search(b.name)]
        if not kept:
            raise ValueError(f"select={select!r} matches no block; blocks are "
                             f"{', '.join(b.name for b in blocks[:8])}{' …' if len(blocks) > 8 else ''}")
        blocks = kept
    if not blocks:
        raise ValueError("the model has no trainable parameter; nothing to partition")
    return blocks


class SliceOperator:
    """v ↦ (A·pad(v))[index]: an operator A on one parameter tensor restricted to some of its coordinates.

    ``A`` acts on the flattened tensor (size P); ``index`` holds the K coordinates kept, so this is the
    principal K×K submatrix of A (the Hessian restricted to a Q, K or V part of a fused projection).
    """

    def __init__(self, A: Any, index: Tensor) -> None:
        self.A, self.index = A, index.to(device=A.device, dtype=torch.long)
        self.shape = (int(index.numel()), int(index.numel()))
        self.dtype, self.device = A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        single = V.ndim == 1
        V = V.reshape(-1, 1) if single else V
        full = V.new_zeros((self.A.shape[0], V.shape[1]))
        full[self.index] = V  # zero outside the block
        out = (self.A @ full)[self.index]
        return out[:, 0] if single else out


def common_grid_densities(nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], *, grid_len: int = 1000,
                          sigma_squared: float = 1e-4, grid_expand: float = 0.05) -> tuple[np.ndarray, np.ndarray, float]:
    """Every block's smoothed SLQ density on one grid: (grid (G,), densities (n, G), kernel variance σ²).

    Block i's density is (1/n_v) Σ_l Σ_k τ_lk² g_σ(t − θ_lk) from its (n_v, m_i) ``nodes`` θ and ``weights``
    τ²; the grid spans [min θ − pad, max θ + pad] over all blocks with pad = grid_expand·W + 4σ and
    σ² = sigma_squared·W², W = max θ − min θ (1 when every node is equal); each density integrates to 1
    (Σ ρ Δt = 1).
    """
    lo = min(float(np.min(n)) for n in nodes)
    hi = max(float(np.max(n)) for n in nodes)
    width = hi - lo if hi > lo else 1.0
    var = float(sigma_squared) * width ** 2
    pad = grid_expand * width + 4.0 * var ** 0.5
    grid = np.linspace(lo - pad, hi + pad, int(grid_len))
    dens = np.zeros((len(nodes), grid.size))
    for i, (x, w) in enumerate(zip(nodes, weights)):
        x, w = np.asarray(x, dtype=np.float64).ravel(), np.asarray(w, dtype=np.float64).ravel()
        for c, wc in zip(x, w):
            near = np.abs(grid - c) <= _KERNEL_HALF_WIDTH * var ** 0.5
            dens[i, near] += wc * np.exp(-((grid[near] - c) ** 2) / (2 * var))
        total = dens[i].sum() * (grid[1] - grid[0])
        if total > 0:
            dens[i] /= total
    return grid, dens, var


def js_divergence_matrix(densities: np.ndarray) -> np.ndarray:
    """JS(p_i ‖ p_j) in nats for every pair of rows of ``densities`` (each normalized to sum 1 first)."""
    p = np.asarray(densities, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    n = p.shape[0]
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        m = 0.5 * (p[i] + p[j])
        # rounding can leave a tiny negative value for (nearly) equal rows: JS ≥ 0, so clip it
        out[i, j] = out[j, i] = max(0.5 * _kl(p[i], m) + 0.5 * _kl(p[j], m), 0.0)
    return out


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) = Σ p ln(p/q) with 0·ln 0 = 0 (q > 0 wherever p > 0: q is a mixture containing p)."""
    pos = p > 0
    return float(np.sum(p[pos] * np.log(p[pos] / q[pos])))


def js0(js: np.ndarray) -> float:
    """The average of the off-diagonal entries of a symmetric JS matrix over all unordered pairs (0 for one block)."""
    n = js.shape[0]
    if n < 2:
        return 0.0
    return float(js[np.triu_indices(n, 1)].mean())


@register_probe
@dataclass(frozen=True, kw_only=True)
class BlockHeterogeneity(CurvatureProbe):
    """Block heterogeneity of the Hessian: SLQ spectra of its diagonal blocks and their JS⁰ (Zhang et al. 2024).

    JS⁰ = the average Jensen–Shannon divergence between the blocks' smoothed spectral densities over all pairs of
    blocks (see the module docstring for the blocks, the grid and the kernel).

    Attributes:
        partition: "parameters" (default: one block per parameter tensor, the paper's) or "layers".
        split_qkv: split a fused QKV projection into Q, K and V blocks (default True).
        select: None or a regex over block names (e.g. "weight" to leave out biases and norms).
        num_probes / num_steps: SLQ runs per block and Lanczos steps per run (capped at the block's size).
        sigma_squared: the kernel variance relative to the squared width of the common grid (1e-4: σ = 0.01 of the width).
        grid_len: points of the common grid.
        curvature / subset / mode / path / dtype / seed: the operator (``lossatlas.probes.operators``).
    Values: "js0", "js0_distance", "js_matrix" ("block", "other_block"), "block_density" ("block", "grid"),
        "block_size" ("block",), "block_nodes" / "block_weights" ("block", "probe", "node"; NaN-padded),
        "block_top_ritz" ("block",), with the coordinates "block", "other_block" (block names) and "grid".
    """

    name: ClassVar[str] = "block_heterogeneity"
    summary: ClassVar[str] = "block heterogeneity: SLQ spectra of the Hessian's parameter blocks and their JS⁰"
    section: ClassVar[str] = "curvature"
    title: ClassVar[str] = "block heterogeneity of the Hessian"
    figure: ClassVar[str | None] = "block_heterogeneity"
    usage: ClassVar[str] = "--steps first"

    partition: str = "parameters"
    split_qkv: bool = True
    select: str | None = None
    num_probes: int = 2
    num_steps: int = 30
    sigma_squared: float = 1e-4
    grid_len: int = 1000

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        prefix = f"{self.name}: "
        self.check_curvature_settings()
        check_choice("partition", self.partition, PARTITIONS, prefix=prefix)
        if not isinstance(self.split_qkv, bool):
            raise ValueError(f"{prefix}split_qkv must be True or False, got {self.split_qkv!r}")
        if self.select is not None:
            if not self.select:
                raise ValueError(f"{prefix}select must be a non-empty regex (e.g. 'attn'), or left out for every block")
            try:
                re.compile(self.select)
            except (re.error, TypeError) as exc:
                raise ValueError(f"{prefix}select={self.select!r} is not a valid regex ({exc}); e.g. 'weight'") from None
        self.check_int("num_probes", self.num_probes, 1)
        self.check_int("num_steps", self.num_steps, 1)
        self.check_positive("sigma_squared", self.sigma_squared)
        self.check_int("grid_len", self.grid_len, 16)

    def block_operator(self, ctx: ProbeContext, batches: list, block: HessianBlock, first: bool) -> Any:
        """The curvature operator restricted to ``block`` (a parameter block, or a slice of one tensor)."""
        op = self.curvature_operator(ctx, batches, params=list(block.params), check_deterministic=first)
        return op if block.index is None else SliceOperator(op, block.index)

    def run(self, ctx: ProbeContext) -> Result:
        """Every block's SLQ spectrum on the common grid, the pairwise JS matrix and JS⁰."""
        t0 = time.perf_counter()
        batches = self.curvature_batches(ctx)
        blocks = heterogeneity_blocks(ctx.model, self.partition, split_qkv=self.split_qkv, select=self.select)
        nodes, weights, sizes, matvecs, path = [], [], [], 0, None
        for i, block in enumerate(blocks):
            if ctx.progress is not None:
                ctx.progress(i, len(blocks))
            op = self.block_operator(ctx, batches, block, first=i == 0)
            n = op.shape[0]
            dens = slq_density(op, num_probes=self.num_probes, num_steps=min(self.num_steps, n), grid_len=16,
                               seed=self.seed, dist=ctx.dist)
            nodes.append(dens.nodes)
            weights.append(dens.weights)
            sizes.append(n)
            base = op.A if isinstance(op, SliceOperator) else op
            matvecs += int(base.matvecs)
            path = path or base.path
        grid, density, var = common_grid_densities(nodes, weights, grid_len=self.grid_len,
                                                   sigma_squared=self.sigma_squared)
        js = js_divergence_matrix(density)
        names = np.asarray([b.name for b in blocks], dtype=str)
        m = max(x.shape[1] for x in nodes)
        padded_nodes = np.full((len(blocks), self.num_probes, m), np.nan)
        padded_weights = np.full_like(padded_nodes, np.nan)
        for i, (x, w) in enumerate(zip(nodes, weights)):
            padded_nodes[i, :, : x.shape[1]] = x
            padded_weights[i, :, : w.shape[1]] = w
        full = self.curvature_operator(ctx, batches)
        res = self.new_result(ctx.step, self.operator_meta(ctx, full, batches))
        res.add("js0", np.float64(js0(js)))
        res.add("js0_distance", np.float64(js0(np.sqrt(js))))
        res.add("js_matrix", js, ("block", "other_block"), {"block": names, "other_block": names})
        res.add("block_density", density, ("block", "grid"), {"grid": grid})
        res.add("block_size", np.asarray(sizes, dtype=np.int64), ("block",))
        res.add("block_nodes", padded_nodes, ("block", "probe", "node"))
        res.add("block_weights", padded_weights, ("block", "probe", "node"))
        res.add("block_top_ritz", np.nanmax(padded_nodes, axis=(1, 2)), ("block",))
        res.meta.update(num_blocks=len(blocks), kernel_variance=var, path=path, matvecs=matvecs,
                        js_units="nats (JS divergence, natural log; at most ln 2)",
                        elapsed_s={"blocks": time.perf_counter() - t0})
        return res


def block_heterogeneity(model: nn.Module, data: Any, loss: str = "cross_entropy", **settings: Any) -> Result:
    """Run the ``block_heterogeneity`` probe in a notebook: ``block_heterogeneity(model, (X, y)).scalar("js0")``."""
    from lossatlas.batches import as_batches

    return BlockHeterogeneity(**settings).run(ProbeContext(model=model, data=as_batches(data), loss=loss))


__all__ = ["BlockHeterogeneity", "HessianBlock", "SliceOperator", "block_heterogeneity", "common_grid_densities",
           "heterogeneity_blocks", "js0", "js_divergence_matrix", "PARTITIONS"]
