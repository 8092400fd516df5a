"""Directions in parameter space for landscape slices, and the four ways to build them.

A direction is a ``dict[str, Tensor]`` with the shapes of the model's parameters (``dir_type="weights"``)
or of every floating parameter and buffer (``dir_type="states"``, BN running statistics included), plus
a record of the rule applied to each tensor, e.g. ``{"fc1.weight": "filter(dim0)", "fc1.bias":
"zero(biasbn)"}``. Builders:

- ``random_direction``: d ~ N(0, I), filter-normalised (below) by default.
- ``checkpoint_direction`` / ``checkpoint_plane``: d = θ_b − θ_a, the path θ(α) = θ_a + α(θ_b − θ_a)
  (Goodfellow, Vinyals, Saxe 2015); a plane through three checkpoints, optionally Gram–Schmidt
  orthogonalised.
- ``top_hessian_eigenvectors`` / ``eigenvector_directions``: the unit eigenvectors u_1, ..., u_k of the
  k largest Hessian eigenvalues, H u_i = λ_i u_i, by Lanczos on Hessian-vector products.
- ``worst_case_directions``: the direction of steepest loss increase within a ball, max_{‖δ‖ ≤ ρ‖θ‖} L(θ + δ)
  by projected gradient ascent, rescaled to the norm of a filter-normalised direction (Chen et al. 2025,
  "Unveiling the Basin-Like Loss Landscape in Large Language Models", compare such worst-case directions
  with random ones).
- ``trajectory_pca``: rows d_e = vec(θ_e − θ_T) for every checkpoint e (θ_T the final one), centred by
  their mean; the top right-singular vectors of that matrix (as ``sklearn.decomposition.PCA``) are
  the directions pc_1, pc_2, and each checkpoint projects to x_e = ⟨d_e, pc_1⟩, y_e = ⟨d_e, pc_2⟩ of
  its *uncentred* row (Li et al. 2018, §7), at distance ‖d_e − x_e pc_1 − y_e pc_2‖ from the plane.

Filter normalisation (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural
Nets"): every filter d_i of a Gaussian direction is rescaled to the norm of the matching weight filter,
d_i ← d_i·‖w_i‖/(‖d_i‖ + 1e-10). A filter is one output unit's incoming weights:

- Conv1d/2d/3d: the slice along dim 0 (one output channel, shape (in/groups, k...)).
- ConvTranspose1d/2d/3d: weights are (in, out/groups, k...), so an output channel is the slice along
  **dim 1** (rule ``filter(dim1)``); loss-landscape's code slices dim 0 here, which mixes output channels.
- Linear, attention projections (``in_proj_weight`` of ``nn.MultiheadAttention``, 3d×d): one row.
- Embedding: one row = one token's vector.
- Any other tensor with ``dim() > 1``: slices along dim 0, as loss-landscape does.
- Parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and every
  tensor with ``dim() ≤ 1`` (biases, running statistics) are "biasbn": zeroed with ``ignore="biasbn"``
  (the default), else the direction equals the tensor itself (d = w, loss-landscape's behaviour).
- Integer buffers (``num_batches_tracked``) are never perturbed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas import losses as L
from lossatlas.curvature import HessianOperator, make_operator  # noqa: F401  (HessianOperator: re-exported)
from lossatlas.outputs import model_outputs
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.paramdicts import axpy, cosine, dot, flatten, unflatten  # noqa: F401  (cosine: re-exported)
from lossatlas.probes.settings import check_choice
from lossatlas.probes.spectrum import top_eigenpairs

NORMS: tuple[str, ...] = ("filter", "layer", "weight", "dfilter", "dlayer", "none")
IGNORES: tuple[str, ...] = ("biasbn", "none")
DIR_TYPES: tuple[str, ...] = ("weights", "states")
DEFAULT_SEED = 123  # torch.manual_seed(123) in loss-landscape's plot_surface.py
_EPS = 1e-10

_NORM_LAYERS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Direction:
    """A direction in parameter (or state) space: one tensor per name, and the rule applied to each."""

    tensors: dict[str, Tensor]
    rules: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The tensor names, in the order ``flat`` concatenates them."""
        return list(self.tensors)

    def flat(self) -> Tensor:
        """All tensors concatenated in name order, shape (P,)."""
        return torch.cat([t.reshape(-1) for t in self.tensors.values()]) if self.tensors else torch.zeros(0)

    def norm(self) -> float:
        """Euclidean norm over every floating tensor, in float64."""
        return float(dot(self, self)) ** 0.5


def model_state(model: nn.Module, dir_type: str = "weights") -> dict[str, Tensor]:
    """Detached references to the model's trainable parameters (and buffers for ``dir_type="states"``)."""
    check_choice("dir_type", dir_type, DIR_TYPES)
    out = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if dir_type == "states":
        out.update({k: b.detach() for k, b in model.named_buffers()})
    return out


def tensor_kinds(model: nn.Module) -> dict[str, str]:
    """The filter-normalisation kind of every parameter and buffer: "conv_transpose", "biasbn" or "dim0"."""
    kinds: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for key, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = prefix + key
            if full in kinds:
                continue  # tied weights: the first owner decides
            if isinstance(mod, _NORM_LAYERS) or t.dim() <= 1:
                kinds[full] = "biasbn"
            elif isinstance(mod, _CONV_TRANSPOSE) and key == "weight":
                kinds[full] = "conv_transpose"
            else:
                kinds[full] = "dim0"
    return kinds


def _filter_scale(d: Tensor, w: Tensor, axis: int, unit: bool) -> Tensor:
    """The tensor d with every slice along ``axis`` rescaled to ‖w_i‖ (or to 1 when ``unit``)."""
    dm = d.movedim(axis, 0).reshape(d.shape[axis], -1)
    dn = dm.norm(dim=1, keepdim=True)
    target = torch.ones_like(dn) if unit else w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1, keepdim=True)
    out = dm * (target / (dn + _EPS))
    shape = list(d.movedim(axis, 0).shape)
    return out.reshape(shape).movedim(0, axis)


def normalize_tensor(d: Tensor, w: Tensor, norm: str, kind: str = "dim0") -> tuple[Tensor, str]:
    """One tensor of a direction normalised by ``norm``; returns (tensor, rule).

    filter: d_i·‖w_i‖/(‖d_i‖+1e-10) per filter; layer: d·‖w‖/‖d‖; weight: d ⊙ w;
    dfilter: unit-norm filters; dlayer: unit-norm tensor; none: d unchanged.
    """
    check_choice("norm", norm, NORMS)
    axis = 1 if kind == "conv_transpose" else 0
    if norm == "filter":
        return _filter_scale(d, w, axis, unit=False), f"filter(dim{axis})"
    if norm == "dfilter":
        return _filter_scale(d, w, axis, unit=True), f"dfilter(dim{axis})"
    if norm == "layer":
        return d * (w.norm() / (d.norm() + _EPS)), "layer"
    if norm == "dlayer":
        return d / (d.norm() + _EPS), "dlayer"
    if norm == "weight":
        return d * w, "weight"
    return d, "none"


def normalize_direction(
    direction: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
    kinds: Mapping[str, str] | None = None,
) -> Direction:
    """A direction normalised tensor by tensor against ``weights`` (Li et al. 2018).

    ``kinds`` (from ``tensor_kinds(model)``) says which tensors are biasbn and which are ConvTranspose
    weights; without it, tensors with ``dim() ≤ 1`` are biasbn and every other one slices dim 0.
    """
    check_choice("norm", norm, NORMS)
    check_choice("ignore", ignore, IGNORES)
    out: dict[str, Tensor] = {}
    rules: dict[str, str] = {}
    for name, d in direction.items():
        w = weights[name]
        kind = (kinds or {}).get(name, "biasbn" if w.dim() <= 1 else "dim0")
        if not w.is_floating_point():
            out[name], rules[name] = torch.zeros_like(w), "zero(integer)"
        elif kind == "biasbn":
            if ignore == "biasbn":
                out[name], rules[name] = torch.zeros_like(w), "zero(biasbn)"
            else:
                out[name], rules[name] = w.detach().clone(), "copy(w)"
        else:
            out[name], rules[name] = normalize_tensor(d, w, norm, kind)
    return Direction(out, rules)


def random_direction(
    model: nn.Module,
    params: Mapping[str, Tensor] | None = None,
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
    dir_type: str = "weights",
    seed: int | None = DEFAULT_SEED,
    generator: torch.Generator | None = None,
) -> Direction:
    """A Gaussian direction, filter-normalised by default (Li et al. 2018).

    d ~ N(0, I) per tensor, drawn in state order from ``generator`` (else a CPU generator seeded with
    ``seed``, 123 as in the original), then ``normalize_direction``. ``params`` overrides the
    model's own tensors (the weights the direction is scaled against).
    """
    check_choice("norm", norm, NORMS)
    check_choice("ignore", ignore, IGNORES)
    weights = dict(model_state(model, dir_type))
    if params is not None:
        weights.update({k: v.detach() for k, v in params.items() if k in weights})
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_SEED if seed is None else int(seed))
    raw = {}
    for name, w in weights.items():
        if w.is_floating_point():
            raw[name] = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=generator.device).to(w.device)
        else:
            raw[name] = torch.zeros_like(w)
    return normalize_direction(raw, weights, norm=norm, ignore=ignore, kinds=tensor_kinds(model))


def checkpoint_direction(
    start: Mapping[str, Tensor], end: Mapping[str, Tensor], names: Iterable[str] | None = None
) -> Direction:
    """The direction from one checkpoint to another, d = θ_end − θ_start.

    Integer tensors (``num_batches_tracked``) get a zero direction. ``names`` selects the tensors
    (default: every name of ``start``); a name missing from ``end`` raises ValueError.
    """
    names = list(start) if names is None else list(names)
    missing = [n for n in names if n not in end]
    if missing:
        raise ValueError(f"the end checkpoint lacks {missing[:3]}; both checkpoints must come from the same model")
    out, rules = {}, {}
    for n in names:
        a, b = start[n].detach(), end[n].detach().to(start[n].device)
        if a.shape != b.shape:
            raise ValueError(f"tensor {n!r} has shape {tuple(a.shape)} in one checkpoint and {tuple(b.shape)} in the other")
        if a.is_floating_point():
            out[n], rules[n] = b.to(a.dtype) - a, "difference"
        else:
            out[n], rules[n] = torch.zeros_like(a), "zero(integer)"
    return Direction(out, rules)


def checkpoint_plane(
    origin: Mapping[str, Tensor],
    first: Mapping[str, Tensor],
    second: Mapping[str, Tensor],
    names: Iterable[str] | None = None,
    *,
    orthogonalize: bool = False,
) -> tuple[Direction, Direction]:
    """The plane through three checkpoints: d_x = θ₁ − θ₀, d_y = θ₂ − θ₀ (θ₀ at the origin).

    With ``orthogonalize``, d_y loses its component along d_x (Gram–Schmidt), so the plane's
    axes are orthogonal; θ₂ then sits at (⟨θ₂−θ₀, d_x⟩/‖d_x‖², 1).
    """
    dx = checkpoint_direction(origin, first, names)
    dy = checkpoint_direction(origin, second, names)
    if orthogonalize:
        c = float(dot(dx, dy)) / max(float(dot(dx, dx)), 1e-300)
        floating = [k for k, v in dy.tensors.items() if v.is_floating_point()]
        moved = axpy(-c, {k: dx.tensors[k] for k in floating}, {k: dy.tensors[k] for k in floating})
        dy = Direction({k: moved.get(k, v) for k, v in dy.tensors.items()},
                       {k: f"{r}-proj" for k, r in dy.rules.items()})
    return dx, dy


def eigenvector_directions(
    vectors: Mapping[str, Tensor] | Tensor | Sequence[Mapping[str, Tensor] | Tensor],
    params: Mapping[str, Tensor],
    *,
    label: str = "eigenvector",
) -> list[Direction]:
    """Directions from given vectors (e.g. top Hessian eigenvectors), unnormalised.

    Accepts a dict (one vector), a flat tensor (P,), a matrix (P, K) of K column vectors, or a
    sequence of those; each becomes a Direction over ``params`` with rule ``label``.
    """
    if isinstance(vectors, Mapping):
        items: list = [vectors]
    elif isinstance(vectors, Tensor):
        items = [vectors] if vectors.ndim == 1 else [vectors[:, k] for k in range(vectors.shape[1])]
    else:
        items = list(vectors)
    out = []
    for v in items:
        if isinstance(v, Mapping):
            missing = [n for n in params if n not in v]
            if missing:
                raise ValueError(f"the vector lacks parameters {missing[:3]}; give one tensor per model parameter")
            tensors = {n: v[n].detach().to(dtype=params[n].dtype, device=params[n].device).reshape(params[n].shape) for n in params}
        else:
            tensors = unflatten(v.detach(), params)
        out.append(Direction(tensors, {n: label for n in tensors}))
    return out


def top_hessian_eigenvectors(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    k: int = 2,
    *,
    seed: int = 0,
) -> list[Direction]:
    """The top-k Hessian eigenvectors (unit norm) at ``params``, H u_i = λ_i u_i.

    ``lossatlas.probes.spectrum.top_eigenpairs`` (Lanczos with full reorthogonalization) on float64
    Hessian-vector products, to a relative residual of 1e-8.
    """
    op = make_operator("hessian", model, list(data), loss, params=dict(params), dtype=torch.float64)
    # A Ritz vector's error is of order residual/gap (an eigenvalue's only residual²/gap), and these
    # vectors span the plotted plane: 1e-8 instead of the default 1e-4 keeps them the true eigenvectors.
    res = top_eigenpairs(op, k, tol=1e-8, seed=seed)
    ordered = {n: params[n] for n in op.param_names}
    return eigenvector_directions(res.eigenvectors, ordered, label="eigenvector(unit)")


def loss_at(model: nn.Module, state: Mapping[str, Tensor], data: Sequence[tuple[Tensor, Tensor]], loss: str) -> Tensor:
    """L(θ) = Σ_b w_b L_b(θ) with the model's tensors replaced by ``state`` (differentiable; a name or a closure)."""
    if L.is_closure(loss):
        return L.closure_data_loss(loss, model, dict(state), data)  # type: ignore[arg-type]
    return L.data_loss(loss, lambda x: model_outputs(model, x, params=(dict(state),)), data)


def worst_case_directions(
    model: nn.Module,
    data: Sequence[tuple[Tensor, Tensor]],
    loss: str,
    k: int = 1,
    *,
    radius: float = 0.1,
    steps: int = 20,
    ignore: str = "biasbn",
    seed: int = DEFAULT_SEED,
    params: Mapping[str, Tensor] | None = None,
) -> list[Direction]:
    """The k directions of steepest loss increase within a ball around θ, by projected gradient ascent.

    Direction j maximises L(θ + δ) over ‖δ‖ ≤ R = ``radius``·‖θ_P‖ (θ_P: the tensors a filter-normalised
    direction perturbs, i.e. the floating parameters, without biases and norm layers under ``ignore="biasbn"``),
    δ orthogonal to the directions before it: from a filter-normalised Gaussian start (seed ``seed``) scaled to
    norm R, ``steps`` (20) times δ ← P_ball(P_⊥(δ + R·g/‖g‖)) with g = ∇L(θ + δ) (a normalised step of length R,
    P_⊥ removing the earlier directions, P_ball rescaling to norm R when outside). On a quadratic
    L = L* + ½ δᵀHδ this is a shifted power iteration: δ → R·u_1 (then u_2, ...), the top eigenvectors.
    The result is rescaled to ‖d‖ = ‖θ_P‖, the norm of a filter-normalised direction, so that α = ``radius``
    on it is the ascent's end point (filter-wise rescaling would turn it off the ascent direction), rule
    "worst(pga)" (Chen et al. 2025, "Unveiling the Basin-Like Loss Landscape in Large Language Models").
    Evaluated in eval mode; ``params`` overrides the model's own tensors (θ).
    """
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"worst_radius must be a positive number, got {radius}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"worst_steps must be a positive integer, got {steps}")
    check_choice("ignore", ignore, IGNORES)
    state = dict(model_state(model, "states"))
    if params is not None:
        state.update({n: v.detach() for n, v in params.items() if n in state})
    trainable = model_state(model, "weights")
    kinds = tensor_kinds(model)
    names = [n for n in trainable if state[n].is_floating_point() and not (ignore == "biasbn" and kinds.get(n) == "biasbn")]
    if not names:
        raise ValueError("worst-case directions need parameters to move; the model has none besides biases and norms")
    theta = {n: state[n] for n in names}
    scale = float(dot(theta, theta)) ** 0.5
    R = radius * scale
    g = torch.Generator().manual_seed(int(seed))
    found: list[dict[str, Tensor]] = []

    def orth(v: dict[str, Tensor]) -> dict[str, Tensor]:
        for u in found:  # remove the components along the earlier (unit) directions
            v = axpy(-float(dot(u, v)), u, v)
        return v

    def rescale(v: dict[str, Tensor], to: float) -> dict[str, Tensor]:
        n = float(dot(v, v)) ** 0.5
        return {k_: t * (to / max(n, 1e-300)) for k_, t in v.items()}

    out = []
    with evaluation_mode(model, "eval"):
        for _ in range(int(k)):
            start = random_direction(model, {**state}, ignore=ignore, generator=g)
            delta = rescale(orth({n: start.tensors[n] for n in names}), R)
            for _ in range(int(steps)):
                leaves = {n: (theta[n] + delta[n]).detach().requires_grad_(True) for n in names}
                with torch.enable_grad():
                    value = loss_at(model, {**state, **leaves}, data, loss)
                    grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
                grad = orth({n: (gr if gr is not None else torch.zeros_like(theta[n])) for n, gr in zip(names, grads)})
                gnorm = float(dot(grad, grad)) ** 0.5
                if gnorm == 0.0:
                    break  # a stationary point of the ball's interior: stay
                delta = orth(axpy(R / gnorm, grad, delta))
                norm = float(dot(delta, delta)) ** 0.5
                if norm > R:  # the projection onto the ball
                    delta = rescale(delta, R)
            unit = rescale(delta, 1.0)
            found.append(unit)
            tensors = {n: (unit[n] * scale if n in unit else torch.zeros_like(state[n])) for n in trainable}
            rules = {n: ("worst(pga)" if n in unit else "zero(biasbn)") for n in trainable}
            out.append(Direction(tensors, rules))
    return out


@dataclass(frozen=True)
class TrajectoryPCA:
    """PCA of a trajectory: directions (unit pcs), variance shares, projections, distances to the plane."""

    directions: tuple[Direction, ...]
    explained_variance_ratio: np.ndarray  # (k,)
    explained_variance: np.ndarray  # (k,)
    singular_values: np.ndarray  # (k,)
    coords: np.ndarray  # (E, k), cos projection of θ_e − θ_T
    distance: np.ndarray  # (E,), ‖θ_e − θ_T − Σ_k coords[e, k] pc_k‖
    names: list[str]


def trajectory_pca(
    states: Sequence[Mapping[str, Tensor]],
    final: Mapping[str, Tensor],
    *,
    ignore: str = "biasbn",
    names: Sequence[str] | None = None,
    kinds_model: nn.Module | None = None,
    n_components: int = 2,
) -> TrajectoryPCA:
    """PCA of the checkpoints θ_e around the final one θ_T, in float64 (Li et al. 2018, §7).

    Rows d_e = vec(θ_e − θ_T) (tensors of ``ignore="biasbn"`` zeroed), centred by their mean, SVD
    M = U S Vᵀ; pc_k = the k-th row of Vᵀ, explained variance S_k²/(E − 1) and its share of the total;
    projections x_e = ⟨d_e, pc_k⟩ of the uncentred rows, so θ_T → 0.

    ``names`` selects the tensors (default: the floating tensors of ``final``); ``kinds_model`` tells
    which tensors are biasbn (norm-layer parameters and every ``dim() ≤ 1`` tensor otherwise).
    Components carry a deterministic sign: each pc's largest-magnitude entry is positive.
    """
    check_choice("ignore", ignore, IGNORES)
    names = [k for k in final if final[k].is_floating_point()] if names is None else list(names)
    kinds = tensor_kinds(kinds_model) if kinds_model is not None else {}
    biasbn = {n for n in names if kinds.get(n, "biasbn" if final[n].dim() <= 1 else "dim0") == "biasbn"}
    keep = [n for n in names if not (ignore == "biasbn" and n in biasbn)]
    if len(states) < n_components + 1:
        raise ValueError(f"trajectory PCA with {n_components} components needs at least {n_components + 1} checkpoints, got {len(states)}")
    ref = {n: final[n].detach().double().cpu() for n in names}

    def row(state: Mapping[str, Tensor]) -> np.ndarray:
        d = {n: (state[n].detach().double().cpu() - ref[n]) if n in keep else torch.zeros_like(ref[n]) for n in names}
        return flatten(d, names).numpy()

    D = np.stack([row(s) for s in states])  # (E, P)
    M = D - D.mean(axis=0, keepdims=True)
    _, S, Vt = np.linalg.svd(M, full_matrices=False)
    pcs = Vt[:n_components].copy()
    for k in range(n_components):
        if pcs[k, np.argmax(np.abs(pcs[k]))] < 0:
            pcs[k] = -pcs[k]
    var = S**2 / (len(states) - 1)
    total = var.sum()
    coords = D @ pcs.T  # (E, k)
    distance = np.linalg.norm(D - coords @ pcs, axis=1)
    like = {n: final[n].detach() for n in names}
    rules = {n: ("pca" if n in keep else "zero(biasbn)") for n in names}
    directions = tuple(Direction(unflatten(torch.as_tensor(pc), like), dict(rules)) for pc in pcs)
    return TrajectoryPCA(
        directions=directions,
        explained_variance_ratio=var[:n_components] / total if total > 0 else np.zeros(n_components),
        explained_variance=var[:n_components],
        singular_values=S[:n_components],
        coords=coords,
        distance=distance,
        names=names,
    )
