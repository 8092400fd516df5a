"""Sharpness of a checkpoint: ε-sharpness, SAM/ASAM worst case, m-sharpness, average case, ‖∇L‖, Fisher–Rao norm.

Every measure is a pure function of an *objective* θ ↦ L_S(θ) and a parameter dict θ.
``DataObjective`` is the objective of a model on a fixed list of batches (example-weighted mean loss Σ_b (n_b/N) L_b),
evaluated with ``torch.func.functional_call`` on fresh parameter dicts; ``FunctionObjective`` wraps any callable
``fn(params) -> 0-d tensor`` (a quadratic in the tests). The user's module is never mutated; its train/eval flags are
set for the duration of an evaluation only and restored, and buffers (BatchNorm running statistics) are private copies.

Perturbations are written in scaled coordinates u = δ / c with c = 1 (standard) or c = |w| + η (adaptive, Kwon et al.
2021; Andriushchenko et al. 2023 use η = 0), so the feasible set is always the plain ball ‖u‖_p ≤ ρ.

λ_max and tr(H) (Cohen et al.'s sharpness and the Hessian trace) come from ``lossatlas.probes.spectrum``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, Sequence

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossatlas.batches import Batch, as_batches, num_examples, split, take, to_device
from lossatlas.curvature import HessianOperator
from lossatlas.losses import (
    batch_count,
    batch_loss,
    batch_weights,
    check_loss_name,
    data_loss,
    output_hessian_product,
    per_example_loss,
    require_output_loss,
)
from lossatlas.outputs import model_outputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.paramdicts import Params, axpy, dot, flatten, l2_norm, multiply, scale, unflatten
from lossatlas.probes.settings import MODES, check_choice, check_nonneg_int
from lossatlas.probes.spectrum import TOL, TRACE_MATVECS, top_eigenpairs, trace_estimate

NORMS: tuple[str, ...] = ("l2", "linf")
FISHER_TARGETS: tuple[str, ...] = ("empirical", "model")
MEASURES: tuple[str, ...] = (
    "grad_norm",
    "fisher_rao",
    "keskar",
    "sam",
    "adaptive_sam",
    "m_sharpness",
    "worst_case",
    "adaptive_worst_case",
    "average_case",
    "adaptive_average_case",
)
STOCHASTIC_MEASURES: tuple[str, ...] = ("average_case", "adaptive_average_case")

_APGD_MOMENTUM = 0.75  # x ← x + α(z − x) + (1 − α)(x − x_prev), α = 0.75 (Croce & Hein 2020)
_APGD_RHO = 0.75  # halve the step when fewer than 75% of the iterations since the last checkpoint increased the loss


# --------------------------------------------------------------------------------------------------------------------
# Parameters and perturbation scales


def trainable_params(model: nn.Module, dtype: torch.dtype | None = None) -> Params:
    """θ: fresh copies of ``model``'s parameters with ``requires_grad=True``, cast to ``dtype``."""
    return {
        name: p.detach().clone().to(dtype=dtype or p.dtype)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _scale(params: Params, adaptive: bool, eta: float) -> Params:
    """The scale c = |w| + η per coordinate (adaptive, every parameter scaled) or c = 1 (standard)."""
    if adaptive:
        return {k: v.abs() + eta for k, v in params.items()}
    return {k: torch.ones_like(v) for k, v in params.items()}


# --------------------------------------------------------------------------------------------------------------------
# Objectives


class Objective(Protocol):
    """θ ↦ L(θ): what every sharpness measure maximises or averages."""

    def value(self, params: Params) -> Tensor:
        """L(θ) at θ = ``params`` as a detached 0-d tensor, without building a graph."""
        ...

    def value_and_grad(self, params: Params) -> tuple[Tensor, Params]:
        """(L(θ), ∇_θ L(θ)) at θ = ``params``: the detached value and one gradient tensor per name."""
        ...


class FunctionObjective:
    """θ ↦ fn(θ) for any differentiable ``fn(params) -> 0-d tensor`` (closed-form test losses)."""

    def __init__(self, fn: Callable[[Params], Tensor]):
        self.fn = fn

    def value(self, params: Params) -> Tensor:
        """fn(θ), detached, evaluated without gradients."""
        with torch.no_grad():
            return self.fn(params).detach()

    def value_and_grad(self, params: Params) -> tuple[Tensor, Params]:
        """(fn(θ), ∇fn(θ)) by autograd; a parameter ``fn`` does not use gets a zero gradient."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            out = self.fn(leaves)
            grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
        return out.detach(), {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


class DataObjective:
    """θ ↦ L_S(θ) = Σ_b (n_b/N) L_b(θ) of ``model`` on fixed batches, via ``functional_call``.

    Frozen parameters and buffers are private copies (cast to ``dtype``), so BatchNorm in train mode never updates
    the user's running statistics. ``mode`` ("eval" default, as in Andriushchenko et al. 2023) is the
    train/eval flag used while evaluating; the module's own flags are restored after every call.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        loss: str,
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
    ):
        check_loss_name(loss)
        check_choice("mode", mode, MODES)
        if not batches:
            raise ValueError("the data holds no batches; give at least one (inputs, targets) batch")
        self.model, self.batches, self.loss, self.mode = model, list(batches), loss, mode
        self.counts = [batch_count(loss, y) for _, y in self.batches]
        self.total = sum(self.counts)
        self.weights = batch_weights(loss, self.batches)  # n_b / N
        fixed = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        fixed.update(dict(model.named_buffers()))
        self.fixed = {
            n: t.detach().clone().to(dtype) if (dtype is not None and t.is_floating_point()) else t.detach().clone()
            for n, t in fixed.items()
        }

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Model outputs f(x; θ) with θ = ``params`` (call inside the objective's mode)."""
        return model_outputs(self.model, x, params=(params, self.fixed))

    def value(self, params: Params) -> Tensor:
        """L_S(θ) = Σ_b (n_b/N) L_b(θ) over the fixed batches, without gradients, in the objective's mode."""
        with torch.no_grad(), evaluation_mode(self.model, self.mode):
            total = data_loss(self.loss, lambda x: self.forward(params, x), self.batches, weights=self.weights)
        return total.detach()

    def value_and_grad(self, params: Params) -> tuple[Tensor, Params]:
        """(L_S(θ), ∇L_S(θ)), accumulating (n_b/N)∇L_b with one backward per batch to bound memory."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        total = 0.0
        with torch.enable_grad(), evaluation_mode(self.model, self.mode):
            for (x, y), w in zip(self.batches, self.weights):  # the terms of data_loss, one backward each
                lb = batch_loss(self.loss, self.forward(leaves, x), y) * w
                gb = torch.autograd.grad(lb, list(leaves.values()), allow_unused=True)
                for k, g in zip(leaves, gb):
                    if g is not None:
                        grads[k] += g
                total = total + lb.detach()
        return total, grads


def _as_objective(objective: Objective | Callable[[Params], Tensor]) -> Objective:
    if hasattr(objective, "value_and_grad"):
        return objective  # type: ignore[return-value]
    if callable(objective):
        return FunctionObjective(objective)
    raise ValueError(f"objective must be a callable params -> loss or an Objective, got {type(objective).__name__}")


def _check_radius(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Measures on one objective


def gradient_norm(objective: Objective | Callable[[Params], Tensor], params: Params) -> float:
    """‖∇L(θ)‖₂ over all parameters."""
    _, g = _as_objective(objective).value_and_grad(params)
    return float(l2_norm(g))


def sam_sharpness(
    objective: Objective | Callable[[Params], Tensor],
    params: Params,
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    norm: str = "l2",
) -> float:
    """One-step SAM/ASAM sharpness L(w + ε̂) − L(w) (Foret et al. ICLR 2021; Kwon et al. ICML 2021).

    ε̂ = ρ T² g / ‖T g‖₂ (l2) or ρ T sign(g) (linf), T = diag(|w| + η) if ``adaptive`` else I; standard l2 is SAM's
    ``dual_vector`` ρ g/‖g‖₂. Every parameter is scaled when adaptive (Andriushchenko et al.); ASAM's own code leaves
    parameters whose name lacks "weight" unscaled. A zero gradient gives ε̂ = 0.
    """
    obj = _as_objective(objective)
    _check_radius("rho", rho)
    check_choice("norm", norm, NORMS)
    loss0, g = obj.value_and_grad(params)
    c = _scale(params, adaptive, eta)
    cg = multiply(c, g)  # gradient in the scaled coordinates u = δ / c
    if norm == "l2":
        u = scale(cg, rho / (l2_norm(cg) + 1e-16))
    else:
        u = {k: rho * torch.sign(v) for k, v in cg.items()}
    return float(obj.value(axpy(1.0, multiply(c, u), params)) - loss0)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which Auto-PGD may halve its step: w_j = ⌈p_j·steps⌉ (Croce & Hein 2020).

    p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06).
    """
    ps = [0.0, 0.22]
    while ps[-1] < 1.0:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    return sorted({math.ceil(p * steps) for p in ps[1:] if 0 < math.ceil(p * steps) <= steps})


def _project(u: Params, rho: float, norm: str) -> Params:
    if norm == "linf":
        return {k: v.clamp(-rho, rho) for k, v in u.items()}
    n = float(l2_norm(u))
    return u if n <= rho else scale(u, rho / n)


def _ascent_direction(gu: Params, norm: str) -> Params:
    if norm == "linf":
        return {k: torch.sign(v) for k, v in gu.items()}
    n = l2_norm(gu) + 1e-12
    return {k: v / n for k, v in gu.items()}


def _random_point(params: Params, rho: float, norm: str, generator: torch.Generator | None) -> Params:
    """A uniform random point of the ball ‖u‖_p ≤ ρ (drawn on the CPU, then moved)."""
    if norm == "linf":
        return {
            k: ((2 * torch.rand(v.shape, generator=generator, dtype=v.dtype) - 1) * rho).to(v.device)
            for k, v in params.items()
        }
    z = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in params.items()}
    dim = sum(v.numel() for v in params.values())
    radius = rho * float(torch.rand((), generator=generator, dtype=torch.float64)) ** (1.0 / dim)
    n = float(l2_norm(z))
    return scale(z, radius / n)


def worst_case_sharpness(
    objective: Objective | Callable[[Params], Tensor],
    params: Params,
    rho: float,
    *,
    steps: int = 20,
    adaptive: bool = False,
    eta: float = 0.01,
    norm: str = "l2",
    rand_init: bool = False,
    generator: torch.Generator | None = None,
    step_size_mult: float = 1.0,
) -> float:
    """Worst-case sharpness max_{‖δ/c‖_p ≤ ρ} L(w + δ) − L(w) by Auto-PGD on the weights.

    Andriushchenko et al. 2023 (``eval_APGD_sharpness``): step η₀ = 2ρ·``step_size_mult``; l2 steps along g/‖g‖,
    linf along sign(g); momentum 0.75; at the checkpoints of :func:`apgd_checkpoints` the step halves and the iterate
    restarts from the best point when the loss rose in fewer than 75% of the iterations since the last checkpoint, or
    when neither the step nor the best loss changed; the best (highest) loss seen is kept, δ = 0 included, so the value
    is ≥ 0. c = 1, or c = |w| + η if ``adaptive``.

    Simplifications: ascent and projection are done in the scaled coordinates u = δ/c (for adaptive l2 the step is
    ASAM's T²g/‖Tg‖ and the projection the Euclidean one in u, where the reference steps along g|w|/‖g‖ and projects
    onto the ellipsoid in δ by bisection; identical for standard l2 and for linf); the momentum is reset after a
    restart. ``rand_init`` starts from a uniform point of the ball (the reference's intended, but broken, option);
    without it a point with ∇L = 0 is a fixed point and the measured sharpness is 0.
    """
    obj = _as_objective(objective)
    _check_radius("rho", rho)
    check_choice("norm", norm, NORMS)
    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    c = _scale(params, adaptive, eta)

    def loss_and_grad(u: Params) -> tuple[float, Params]:
        val, g = obj.value_and_grad(axpy(1.0, multiply(c, u), params))
        return float(val), multiply(c, g)  # d/du L(w + c⊙u) = c⊙g

    loss0 = float(obj.value(params))
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    u = _random_point(params, rho, norm, generator) if rand_init else zero
    loss, gu = loss_and_grad(u)
    best_loss, best_u, best_g = max(loss, loss0), u, gu
    if loss0 > loss:  # a random start below the clean loss: δ = 0 is the best point so far
        best_u, best_g = zero, None
    step = 2.0 * rho * step_size_mult
    checkpoints = set(apgd_checkpoints(int(steps)))
    u_prev, prev_loss, increases, last_cp = u, loss, 0, 0
    reduced_last, best_at_last_cp = False, best_loss
    for i in range(int(steps)):
        z = _project(axpy(step, _ascent_direction(gu, norm), u), rho, norm)
        a = 1.0 if i == 0 or u_prev is u else _APGD_MOMENTUM
        u_new = _project({k: u[k] + a * (z[k] - u[k]) + (1 - a) * (u[k] - u_prev[k]) for k in u}, rho, norm)
        u_prev, u = u, u_new
        loss, gu = loss_and_grad(u)
        increases += loss > prev_loss
        prev_loss = loss
        if loss > best_loss:
            best_loss, best_u, best_g = loss, u, gu
        if i + 1 in checkpoints:
            oscillating = increases < _APGD_RHO * (i + 1 - last_cp)
            stalled = (not reduced_last) and best_loss <= best_at_last_cp
            reduced_last = oscillating or stalled
            if reduced_last:
                step /= 2.0
                if best_g is None:  # the best point is δ = 0, whose gradient was not needed before
                    _, best_g = loss_and_grad(best_u)
                u, gu = best_u, best_g
                u_prev = u  # no momentum across a restart
            increases, last_cp, best_at_last_cp = 0, i + 1, best_loss
    return best_loss - loss0


def average_case_sharpness(
    objective: Objective | Callable[[Params], Tensor],
    params: Params,
    rho: float,
    *,
    num_samples: int = 20,
    adaptive: bool = False,
    eta: float = 0.01,
    norm: str = "l2",
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Average-case sharpness E_δ[L(w + δ)] − L(w) and its standard error.

    l2: δ = ρ c ⊙ z, z ~ N(0, I), i.e. δ ~ N(0, ρ² diag(c²)) (per-coordinate std ρ c_i, not ρ/√P); linf:
    δ = ρ c ⊙ U[−1, 1]. c = 1, or c = |w| + η if ``adaptive`` (Andriushchenko et al. 2023: c = |w|).
    Returns (mean of the ``num_samples`` differences, their sample std / √num_samples).
    """
    obj = _as_objective(objective)
    _check_radius("rho", rho)
    check_choice("norm", norm, NORMS)
    if int(num_samples) < 2:
        raise ValueError(f"num_samples must be at least 2 (for a standard error), got {num_samples!r}")
    c = _scale(params, adaptive, eta)
    loss0 = obj.value(params)
    diffs = []
    for _ in range(int(num_samples)):
        if norm == "l2":
            z = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in params.items()}
        else:
            z = {
                k: (2 * torch.rand(v.shape, generator=generator, dtype=v.dtype) - 1).to(v.device)
                for k, v in params.items()
            }
        diffs.append(float(obj.value(axpy(rho, multiply(c, z), params)) - loss0))
    d = np.asarray(diffs)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def keskar_sharpness(
    objective: Objective | Callable[[Params], Tensor],
    params: Params,
    epsilon: float = 1e-3,
    *,
    subspace: int | Tensor | None = None,
    max_iter: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    """Keskar et al. 2017 ε-sharpness in percent (Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, ICLR 2017).

    φ = 100·(max_{y ∈ C_ε} L(x + Ay) − L(x)) / (1 + L(x)).
    C_ε = {y : |y_i| ≤ ε(|(A⁺x)_i| + 1)} is a box, not a ball. A = I (``subspace=None``), a random (P, p) matrix with
    N(0, 1) entries (``subspace=p``; dense, so P·p numbers must fit in memory) or a given (P, p) tensor. The inner
    maximisation is L-BFGS-B (scipy, float64, ``max_iter`` iterations) from a uniform random point of the box (from
    y = 0 a stationary x would never move); the best value seen, y = 0 included, is kept.
    """
    obj = _as_objective(objective)
    _check_radius("epsilon", epsilon)
    names = list(params)
    x = flatten(params, names).to(torch.float64).cpu()  # (P,)
    if subspace is None:
        A = None
        coords = x
    else:
        if isinstance(subspace, Tensor):
            A = subspace.detach().to(torch.float64).cpu()
        else:
            if int(subspace) < 1:
                raise ValueError(f"subspace must be a positive dimension p, got {subspace!r}")
            A = torch.randn(x.numel(), int(subspace), generator=generator, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] != x.numel():
            raise ValueError(f"subspace matrix must have shape ({x.numel()}, p), got {tuple(A.shape)}")
        coords = torch.linalg.pinv(A) @ x  # A⁺x, (p,)
    bound = (epsilon * (coords.abs() + 1)).numpy()

    loss0 = float(obj.value(params))
    best = [loss0]

    def negative(y: np.ndarray) -> tuple[float, np.ndarray]:
        yt = torch.from_numpy(y)
        w = x + (yt if A is None else A @ yt)
        val, g = obj.value_and_grad(unflatten(w, params))
        gflat = flatten(g, names).to(torch.float64).cpu()
        best[0] = max(best[0], float(val))
        grad_y = gflat if A is None else A.T @ gflat
        return -float(val), -grad_y.numpy()

    y0 = (2 * torch.rand(bound.shape, generator=generator, dtype=torch.float64).numpy() - 1) * bound
    scipy.optimize.minimize(
        negative, y0, jac=True, method="L-BFGS-B", bounds=list(zip(-bound, bound)), options={"maxiter": int(max_iter)}
    )
    return 100.0 * (best[0] - loss0) / (1.0 + loss0)


# --------------------------------------------------------------------------------------------------------------------
# Measures that need the model and data


def chunk_batches(batches: Sequence[Batch], m: int | None, batch_size: int | None = None) -> list[list[Batch]]:
    """The examples split into disjoint consecutive chunks of ``m`` (the last may be smaller).

    Each chunk is further split into physical batches of ``batch_size`` (None: one batch per chunk).
    ``m=None``: one chunk, batches as given.
    """
    if m is None:
        if batch_size is None:
            return [list(batches)]
        m = num_examples(batches)
    if int(m) < 1:
        raise ValueError(f"m must be a positive number of examples, got {m!r}")
    n = num_examples(batches)
    size = int(batch_size) if batch_size is not None else int(m)
    chunks = []
    for i in range(0, n, int(m)):  # examples of unequal shapes: one group per shape (``take``), each cut in ``size``
        groups = take(batches, torch.arange(i, min(i + int(m), n)))
        chunks.append([part for group in groups for part in split(group, size)])
    return chunks


def m_sharpness(
    model: nn.Module,
    params: Params,
    batches: Sequence[Batch],
    loss: str,
    rho: float,
    *,
    m: int | None,
    steps: int = 1,
    adaptive: bool = False,
    eta: float = 0.01,
    norm: str = "l2",
    mode: str = "eval",
    batch_size: int | None = None,
    rand_init: bool = False,
    generator: torch.Generator | None = None,
) -> float:
    """m-sharpness: Σ_S (|S|/N) [max_{‖δ/c‖_p ≤ ρ} L_S(w + δ) − L_S(w)] over disjoint chunks S of m examples.

    Foret et al. 2021 (one ascent step per chunk, ``steps=1``) and Andriushchenko et al. 2023 (Auto-PGD per batch of
    m = 128, ``steps>1``). ``m=None`` (or m ≥ N) is the full-set worst case.
    """
    chunks = chunk_batches(batches, m, batch_size)
    dtype = next(iter(params.values())).dtype
    total, count = 0.0, 0
    for chunk in chunks:
        obj = DataObjective(model, chunk, loss, mode=mode, dtype=dtype)
        if steps == 1:
            s = sam_sharpness(obj, params, rho, adaptive=adaptive, eta=eta, norm=norm)
        else:
            s = worst_case_sharpness(
                obj, params, rho, steps=steps, adaptive=adaptive, eta=eta, norm=norm,
                rand_init=rand_init, generator=generator,
            )
        total += s * obj.total
        count += obj.total
    return total / count


def _output_and_jvp(obj: DataObjective, params: Params, x: Tensor) -> tuple[Tensor, Tensor]:
    """f(x; θ) and J_θ θ by the double-VJP trick Jv = ∂/∂u ⟨Jᵀu, v⟩ (reverse-over-reverse).

    Reverse mode, unlike ``torch.func.jvp``, lets BatchNorm in train mode update its (private) running statistics.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        out = obj.forward(leaves, x)
        u = torch.zeros_like(out, requires_grad=True)
        vjp = torch.autograd.grad(out, list(leaves.values()), grad_outputs=u, create_graph=True, allow_unused=True)
        inner = dot(dict(zip(leaves, vjp)), params, dtype=None)  # ⟨Jᵀu, θ⟩, differentiable in u
        if not isinstance(inner, Tensor) or not inner.requires_grad:
            return out.detach(), torch.zeros_like(out)
        jv = torch.autograd.grad(inner, u)[0]
    return out.detach(), jv.detach()


def fisher_rao_norm(
    model: nn.Module,
    params: Params,
    batches: Sequence[Batch],
    loss: str,
    *,
    target: str = "empirical",
    mode: str = "eval",
) -> float:
    """Fisher–Rao norm ‖θ‖_fr = (θᵀ I(θ) θ)^½ = (E[⟨θ, ∇_θ ℓ⟩²])^½ (Liang, Poggio, Rakhlin, Stokes, AISTATS 2019).

    ⟨θ, ∇_θ ℓ⟩ = ⟨∂ℓ/∂f, J_θ θ⟩ is computed exactly from J_θ θ (double-VJP), for any model; for a bias-free
    ReLU net with L hidden layers J_θ θ = (L+1) f, giving Liang's closed form (L+1)² E⟨∂ℓ/∂f, f⟩².
    ``target="empirical"``: y are the data labels; ``"model"``: E over y ~ p_θ(·|x), which for these losses (negative
    log-likelihoods) is E_x[(Jθ)ᵀ (∂²ℓ/∂f²)(Jθ)] in closed form (softmax: diag(p) − ppᵀ; half_sse: I; mse: (2/C) I).
    The expectation over x is the example-weighted mean over the batches. The products run under PyTorch's math
    attention backend (fused attention kernels have no double backward). ValueError for the loss "model".
    """
    check_loss_name(loss)
    require_output_loss(loss, "sharpness measure fisher_rao (per-example gradients ⟨θ, ∇ℓ_i⟩)")
    check_choice("target", target, FISHER_TARGETS)
    obj = DataObjective(model, batches, loss, mode=mode, dtype=next(iter(params.values())).dtype)
    tangent = {k: v.detach() for k, v in params.items()}
    total = 0.0
    with evaluation_mode(model, mode), sdpa_kernel(SDPBackend.MATH):
        for (x, y), n in zip(obj.batches, obj.counts):
            out, jv = _output_and_jvp(obj, tangent, x)  # f, Jθ: (n, C)
            if target == "empirical":
                leaf = out.clone().requires_grad_(True)
                with torch.enable_grad():
                    dl = torch.autograd.grad(per_example_loss(loss, leaf, y).sum(), leaf)[0]  # ∂ℓ_i/∂f_i
                if out.ndim == 3 and y.ndim == 2:  # token terms: ℓ_(b,t) depends on f[b, t] only
                    inner = (dl * jv).sum(dim=-1).reshape(-1)  # ⟨θ, ∇_θ ℓ_(b,t)⟩, 0 at an uncounted token
                else:
                    inner = (dl * jv).reshape(n, -1).sum(dim=1)  # ⟨θ, ∇_θ ℓ_i⟩, (n,)
                total += float((inner**2).sum())
            else:
                total += float((jv * output_hessian_product(loss, out, y, jv)).sum())
    return math.sqrt(total / obj.total)


# --------------------------------------------------------------------------------------------------------------------
# The probe


def _generator(seed: int, measure: str) -> torch.Generator:
    """One generator per measure, so that choosing other measures never changes a measure's value."""
    return torch.Generator().manual_seed(int(seed) * 1000 + MEASURES.index(measure))


@register_probe
@dataclass(frozen=True, kw_only=True)
class Sharpness(Probe):
    """Sharpness measures of a checkpoint.

    One 0-d value per measure, ``<measure>_stderr`` for Monte-Carlo ones, and the clean loss.

    Measures: ``grad_norm`` ‖∇L‖; ``fisher_rao`` ‖θ‖_fr; ``keskar`` ε-sharpness (%); ``sam`` / ``adaptive_sam``
    one-step SAM / ASAM on all examples (ρ = ``rho`` / ``adaptive_rho``); ``m_sharpness`` one-step SAM averaged
    over chunks of ``m``; ``worst_case`` / ``adaptive_worst_case`` Auto-PGD (``steps``) per chunk of ``m``;
    ``average_case`` / ``adaptive_average_case`` Monte-Carlo E_δ L(w+δ) − L(w) (``num_samples``, linear in L_S, so
    independent of m; each δ is drawn once for all examples). Defaults follow the reference code: SAM ρ 0.05
    (google-research/sam, CIFAR), ASAM ρ 0.5 and η 0.01 (SamsungLabs/ASAM; η = 0 is Andriushchenko's c = |w| and makes
    the adaptive measures invariant to the rescalings (αW₁, W₂/α) of Dinh et al. 2017), 1024 examples, m = 128,
    20 Auto-PGD iterations (tml-epfl/sharpness-vs-generalization), Keskar ε 1e-3 with 10 L-BFGS-B iterations
    (Keskar et al. 2017), eval mode.
    """

    name: ClassVar[str] = "sharpness"
    summary: ClassVar[str] = "SAM/ASAM worst-case, m-, average-case and Keskar sharpness; gradient and Fisher-Rao norms"
    section: ClassVar[str] = "sharpness"
    figure: ClassVar[str | None] = "sharpness"

    measures: tuple[str, ...] = MEASURES
    rho: float = 0.05
    adaptive_rho: float = 0.5
    eta: float = 0.01
    norm: str = "l2"
    steps: int = 20
    m: int | None = 128
    num_samples: int = 20
    epsilon: float = 1e-3
    keskar_dim: int | None = None
    keskar_iters: int = 10
    fisher: str = "empirical"
    rand_init: bool = False
    mode: str = "eval"
    seed: int = 0
    max_examples: int | None = 1024
    batch_size: int | None = None
    lambda_max: bool = False
    trace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.measures, str):
            object.__setattr__(self, "measures", (self.measures,))
        else:
            object.__setattr__(self, "measures", tuple(self.measures))
        super().__post_init__()

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses an empty, unknown or repeated measure; ``rho``/``adaptive_rho``/``epsilon`` not finite and > 0;
        ``eta`` not finite and ≥ 0; an unknown ``norm``, ``fisher`` or ``mode``; a negative ``seed``;
        ``steps``/``keskar_iters`` < 1 or ``num_samples`` < 2; ``m``/``keskar_dim``/``max_examples``/``batch_size``
        that are neither None nor a positive integer.
        """
        if not self.measures:
            raise ValueError(f"measures is empty; choose some of {', '.join(MEASURES)}")
        for name in self.measures:
            check_choice("sharpness measure", name, MEASURES)
        if len(set(self.measures)) != len(self.measures):
            raise ValueError(f"measures lists a measure twice: {list(self.measures)}")
        for field_name in ("rho", "adaptive_rho", "epsilon"):
            _check_radius(field_name, getattr(self, field_name))
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")
        check_choice("norm", self.norm, NORMS)
        check_choice("fisher", self.fisher, FISHER_TARGETS)
        check_choice("mode", self.mode, MODES)
        check_nonneg_int("seed", self.seed)
        for field_name, low in (("steps", 1), ("num_samples", 2), ("keskar_iters", 1)):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{field_name} must be an integer >= {low}, got {value!r}")
        for field_name in ("m", "keskar_dim", "max_examples", "batch_size"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field_name} must be a positive integer or None, got {value!r}")

    def _curvature(self, ctx: ProbeContext, batches, dtype, conventions: dict) -> dict[str, np.ndarray]:
        """λ_max and tr(H) of the loss on these batches, with ``lossatlas.probes.spectrum``'s defaults."""
        op = HessianOperator(ctx.model, batches, ctx.loss, mode=self.mode, dtype=dtype)
        out: dict[str, np.ndarray] = {}
        if self.lambda_max:
            eig = top_eigenpairs(op, 1, seed=self.seed, return_eigenvectors=False)
            out["lambda_max"] = np.float64(eig.eigenvalues[0])
            conventions["lambda_max"] = f"Lanczos top-1, rel. Ritz residual ≤ {TOL:g}, {eig.matvecs} HVPs ({op.path})"
        if self.trace:
            tr = trace_estimate(op, seed=self.seed)
            out["trace"], out["trace_stderr"] = np.float64(tr.value), np.float64(tr.stderr)
            conventions["trace"] = f"Hutch++ (Meyer et al. 2021), {TRACE_MATVECS} matvecs"
        return out

    def run(self, ctx: ProbeContext) -> Result:
        """The clean ``loss`` L(w) and each chosen measure on the first ``max_examples`` examples.

        ``grad_norm`` ‖∇L‖₂; ``fisher_rao`` (E⟨θ,∇_θℓ⟩²)^½; ``keskar`` 100·(max_{C_ε} L − L)/(1 + L);
        ``sam``/``adaptive_sam`` L(w + ρ c²∇L/‖c∇L‖) − L(w) in one step (l2); ``m_sharpness`` the same per chunk of
        ``m``, example-weighted; ``worst_case``/``adaptive_worst_case`` max_{‖δ/c‖ ≤ ρ} L(w + δ) − L(w) by
        Auto-PGD per chunk; ``average_case``/``adaptive_average_case`` E_δ L(w + δ) − L(w) with a ``_stderr``.
        Optional ``lambda_max`` (Lanczos) and ``trace``/``trace_stderr`` (Hutch++) of the Hessian.
        """
        check_loss_name(ctx.loss)
        if "fisher_rao" in self.measures:  # the one measure that needs per-example terms of an output loss
            require_output_loss(ctx.loss, "the sharpness measure fisher_rao",
                                "drop it from --measures, or use --loss causal_lm or --loss cross_entropy")
        start = time.perf_counter()
        batches = to_device(as_batches(ctx.data, limit=self.max_examples), ctx.device, ctx.dtype)
        if self.batch_size is not None:
            batches = chunk_batches(batches, None, self.batch_size)[0]
        params = trainable_params(ctx.model, ctx.dtype)
        if not params:
            raise ValueError("the model has no parameters with requires_grad=True; nothing to measure")
        dtype = next(iter(params.values())).dtype
        full = DataObjective(ctx.model, batches, ctx.loss, mode=self.mode, dtype=dtype)
        common = dict(eta=self.eta, norm=self.norm, mode=self.mode, batch_size=self.batch_size)
        res = self.new_result(ctx.step).add("loss", np.float64(full.value(params)))
        conventions: dict[str, str] = {}
        for i, name in enumerate(self.measures):
            if ctx.progress is not None:
                ctx.progress(i, len(self.measures))
            gen = _generator(self.seed, name)
            adaptive = name.startswith("adaptive_")
            rho = self.adaptive_rho if adaptive else self.rho
            if name == "grad_norm":
                res.add(name, np.float64(gradient_norm(full, params)))
                conventions[name] = "‖∇L‖₂ on all examples"
            elif name == "fisher_rao":
                res.add(name, np.float64(
                    fisher_rao_norm(ctx.model, params, batches, ctx.loss, target=self.fisher, mode=self.mode)
                ))
                conventions[name] = f"(E⟨θ,∇θℓ⟩²)^½ by JVP, y from the {self.fisher} distribution"
            elif name == "keskar":
                res.add(name, np.float64(
                    keskar_sharpness(full, params, self.epsilon, subspace=self.keskar_dim,
                                     max_iter=self.keskar_iters, generator=gen)
                ))
                space = "full space A=I" if self.keskar_dim is None else f"random N(0,1) subspace p={self.keskar_dim}"
                conventions[name] = (f"percent, ε={self.epsilon}, box ε(|A⁺x|+1), {space}, "
                                     f"L-BFGS-B {self.keskar_iters} iters from a random point of the box")
            elif name in ("sam", "adaptive_sam"):
                res.add(name, np.float64(sam_sharpness(full, params, rho, adaptive=adaptive, eta=self.eta,
                                                       norm=self.norm)))
                conventions[name] = f"one step, ρ={rho}, {self.norm}, all examples" + self._scale_note(adaptive)
            elif name == "m_sharpness":
                res.add(name, np.float64(m_sharpness(ctx.model, params, batches, ctx.loss, rho, m=self.m, steps=1,
                                                     adaptive=False, **common)))
                conventions[name] = f"one step per chunk of m={self.m}, ρ={rho}, {self.norm}, example-weighted mean"
            elif name in ("worst_case", "adaptive_worst_case"):
                res.add(name, np.float64(m_sharpness(
                    ctx.model, params, batches, ctx.loss, rho, m=self.m, steps=self.steps, adaptive=adaptive,
                    rand_init=self.rand_init, generator=gen, **common,
                )))
                conventions[name] = (f"Auto-PGD {self.steps} iters per chunk of m={self.m}, ρ={rho}, {self.norm}, "
                                     f"rand_init={self.rand_init}" + self._scale_note(adaptive))
            else:  # average_case, adaptive_average_case
                mean, stderr = average_case_sharpness(full, params, rho, num_samples=self.num_samples,
                                                      adaptive=adaptive, eta=self.eta, norm=self.norm, generator=gen)
                res.add(name, np.float64(mean)).add(f"{name}_stderr", np.float64(stderr))
                dist = "N(0, ρ²c²)" if self.norm == "l2" else "ρc⊙U[-1,1]"
                conventions[name] = f"δ ~ {dist}, ρ={rho}, {self.num_samples} samples" + self._scale_note(adaptive)
        if self.lambda_max or self.trace:
            for name, value in self._curvature(ctx, batches, dtype, conventions).items():
                res.add(name, value)
        res.meta.update({
            "loss_name": ctx.loss,
            "mode": self.mode,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(ctx.device),
            "num_examples": full.total,
            "num_chunks": 1 if self.m is None else math.ceil(num_examples(batches) / self.m),
            "seed": self.seed,
            "conventions": conventions,
            "finite": bool(all(np.isfinite(v) for v in res.values.values())),
            "elapsed_s": time.perf_counter() - start,
        })
        return res

    def _scale_note(self, adaptive: bool) -> str:
        return f", c=|w|+η (η={self.eta}) on every parameter" if adaptive else ""
