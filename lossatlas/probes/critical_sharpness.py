"""The ``critical_sharpness`` probe: the curvature along the update, λ_c = 2/η_c, from forward passes only.

Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for Analyzing the Training Dynamics of LLMs":
along an update direction d (the step θ ← θ − η·d the optimizer takes at learning rate η), the critical step

    η_c = inf{η > 0 : L(θ − η d) > L(θ)}

is the smallest step that increases the loss, and the critical sharpness is λ_c = 2/η_c. On a quadratic
L(θ) = ½ θᵀHθ + bᵀθ with gradient g, L(θ − ηd) − L(θ) = −η gᵀd + ½η² dᵀHd, so η_c = 2 gᵀd / dᵀHd and

    λ_c = dᵀHd / gᵀd,        = gᵀHg / gᵀg (the directional curvature) for a gradient step d = g.

The step η is stable along d exactly when λ_c < 2/η: λ_c is compared with the same 2/η line as λ_max at the
edge of stability (Cohen et al. 2021). η_c is found by a line search: doubling (or halving) from η₀ until the
loss change changes sign, then the Illinois false-position method on the bracket until its relative width is
at most ``rtol``: a handful of forward passes and no Hessian-vector product, so it scales to any model that
can run a forward pass.

The direction d (``direction``), in units of one optimizer step per unit learning rate:

- "gradient": d = ∇L (SGD's step), of ``direction_data``'s loss when given (the relative form: the curvature
  of this data set's loss along another data set's update);
- "adam": d = m̂/(√v̂ + ε) (+ λ_wd·θ for AdamW), Adam's update from the checkpoint's optimizer state, m̂ and v̂
  bias-corrected with the stored step count;
- "update": d = (θ_a − θ_b) / ((b − a)·η), the update between this checkpoint and the next one (the previous
  one at the last checkpoint), per step and per unit learning rate η (the checkpoint's; 1 when unknown).

For "adam" and "update" the direction comes from the run's own training data; evaluating a different data set
(``--data``) gives the relative form. Beside λ_c the probe reports, unless switched off for large models, the
Rayleigh quotient dᵀHd/dᵀd and the quadratic prediction dᵀHd/gᵀd of λ_c (one Hessian-vector product) and
λ_max by Lanczos.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import Tensor

from lossatlas.batches import as_batches, to_device
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.paramdicts import Params, dot
from lossatlas.probes.settings import DTYPES, check_choice
from lossatlas.probes.sharpness import DataObjective, Objective, trainable_params
from lossatlas.probes.spectrum import TOL, top_eigenpairs

DIRECTIONS: tuple[str, ...] = ("gradient", "adam", "update")


@dataclass(frozen=True)
class LineSearch:
    """The critical step along a direction and how it was found.

    Attributes:
        eta_c: the critical step η_c (NaN when no bracket was found).
        lambda_c: the critical sharpness 2/η_c (NaN when no bracket was found).
        loss: L(θ), the loss at the start of the line.
        etas / changes: every step η tried and its loss change L(θ − η d) − L(θ), in the order tried.
        status: "converged", "max_evals" (bracket not narrowed to ``rtol``), "never_rises" (the loss did not
            rise at the largest step tried: λ_c ≤ 2/η there) or "rises_at_once" (it rose at the smallest step
            tried: d is not a descent direction at that scale).
        bracket: the last (η_lo, η_hi) with the loss not above L(θ) at η_lo and above it at η_hi.
    """

    eta_c: float
    lambda_c: float
    loss: float
    etas: np.ndarray
    changes: np.ndarray
    status: str
    bracket: tuple[float, float]

    @property
    def evals(self) -> int:
        """The forward passes over the data the search took (L(θ) included)."""
        return int(self.etas.size) + 1


def critical_step(loss_at: Callable[[float], float], *, eta0: float, rtol: float = 1e-3, max_evals: int = 40,
                  growth: float = 2.0) -> LineSearch:
    """η_c = inf{η > 0 : φ(η) > 0} of φ(η) = L(θ − η d) − L(θ), given ``loss_at(η)`` = L(θ − η d).

    Brackets the first sign change by multiplying η by ``growth`` from ``eta0`` (up while the loss does not
    rise, down while it does), then narrows the bracket [η_lo, η_hi] by the Illinois false-position method
    (Dowell & Jarratt 1971) until η_hi − η_lo ≤ rtol·η_hi; η_c is the secant root of the final bracket.
    At most ``max_evals`` evaluations of ``loss_at`` besides L(θ).
    """
    if not (eta0 > 0 and math.isfinite(eta0)):
        raise ValueError(f"eta0 must be a positive finite step, got {eta0!r}")
    loss0 = float(loss_at(0.0))
    etas: list[float] = []
    changes: list[float] = []

    def phi(eta: float) -> float:
        etas.append(eta)
        changes.append(float(loss_at(eta)) - loss0)
        return changes[-1]

    def done(eta_c: float, status: str, lo: float, hi: float) -> LineSearch:
        lam = 2.0 / eta_c if eta_c > 0 and math.isfinite(eta_c) else math.nan
        return LineSearch(eta_c, lam, loss0, np.asarray(etas), np.asarray(changes), status, (lo, hi))

    eta, f = eta0, phi(eta0)
    if f <= 0:  # the loss does not rise yet: grow the step until it does
        lo, f_lo = eta, f
        while len(etas) < max_evals:
            eta *= growth
            f = phi(eta)
            if f > 0:
                break
            lo, f_lo = eta, f
        if f <= 0:
            return done(math.nan, "never_rises", lo, math.inf)
        hi, f_hi = eta, f
    else:  # the loss rises already: shrink the step until it does not
        hi, f_hi = eta, f
        while len(etas) < max_evals:
            eta /= growth
            f = phi(eta)
            if f <= 0:
                break
            hi, f_hi = eta, f
        if f > 0:
            return done(math.nan, "rises_at_once", 0.0, hi)
        lo, f_lo = eta, f
    # Illinois: false position, halving the stale end's value when the same end is kept twice in a row
    a, fa, b, fb, kept = lo, f_lo, hi, f_hi, 0
    while b - a > rtol * b and len(etas) < max_evals:
        x = (a * fb - b * fa) / (fb - fa)
        if not (a < x < b):
            x = 0.5 * (a + b)  # rounding put the secant root outside the bracket: bisect instead
        fx = phi(x)
        if fx > 0:
            b, fb, hi, f_hi = x, fx, x, fx
            if kept == -1:
                fa *= 0.5  # the lower end was kept twice: pull the secant toward it
            kept = -1
        else:
            a, fa, lo, f_lo = x, fx, x, fx
            if kept == 1:
                fb *= 0.5
            kept = 1
    eta_c = lo if f_hi == f_lo else (lo * f_hi - hi * f_lo) / (f_hi - f_lo)  # secant root of the true values
    return done(eta_c, "converged" if hi - lo <= rtol * hi else "max_evals", lo, hi)


def line_loss(objective: Objective, params: Params, direction: Mapping[str, Tensor]) -> Callable[[float], float]:
    """η ↦ L(θ − η d) for ``objective`` at θ = ``params`` (float, no graph)."""
    def at(eta: float) -> float:
        if eta == 0.0:
            return float(objective.value(params))
        return float(objective.value({k: v - eta * direction[k] for k, v in params.items()}))

    return at


def adam_direction(params: Params, optimizer_state: Mapping[str, Mapping[str, Tensor]],
                   optimizer: Mapping[str, Any] | None) -> Params:
    """Adam's update per unit learning rate, d = m̂/(√v̂ + ε) (+ λ_wd·θ under AdamW), from a stored state.

    m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ) with t the stored ``step`` (Kingma & Ba 2015); β and ε from the
    optimizer's defaults (0.9, 0.999, 1e-8 when absent). ValueError for a parameter without ``exp_avg`` and
    ``exp_avg_sq`` in the state.
    """
    defaults = dict((optimizer or {}).get("defaults", {}) or {})
    name = str((optimizer or {}).get("name", "Adam"))
    beta1, beta2 = (float(b) for b in defaults.get("betas", (0.9, 0.999)))
    eps = float(defaults.get("eps", 1e-8))
    wd = float(defaults.get("weight_decay", 0.0) or 0.0) if name == "AdamW" else 0.0
    out: Params = {}
    for k, theta in params.items():
        st = optimizer_state.get(k)
        if st is None or "exp_avg" not in st or "exp_avg_sq" not in st:
            raise ValueError(f"the optimizer state has no exp_avg/exp_avg_sq for {k!r}; direction='adam' needs an "
                             "Adam state recorded with the run (Recorder(..., optimizer=opt)), or use direction="
                             "'gradient' or 'update'")
        t = max(float(st.get("step", 1.0)), 1.0)  # a tensor or a number; 1 when not stored
        m = st["exp_avg"].to(theta) / (1 - beta1 ** t)
        v = st["exp_avg_sq"].to(theta) / (1 - beta2 ** t)
        out[k] = m / (v.sqrt() + eps) + wd * theta  # AdamW's decoupled decay θ ← θ − ηλθ is part of the step
    return out


@register_probe
@dataclass(frozen=True, kw_only=True)
class CriticalSharpness(CurvatureProbe):
    """Critical sharpness λ_c = 2/η_c along the update (Kalra et al. 2026), by a line search of forward passes.

    η_c = inf{η > 0 : L(θ − η d) > L(θ)}; on a quadratic λ_c = dᵀHd/gᵀd (= gᵀHg/gᵀg for d = g). See the module
    docstring for the directions and their units.

    Attributes:
        direction: "gradient" (default), "adam" (m̂/(√v̂ + ε) from the stored optimizer state) or "update"
            (θ_next − θ from the checkpoints, per step and unit learning rate).
        direction_data: a data spec (JSON) whose loss gradient is the direction (relative form; "gradient" only).
        direction_examples: the first examples of ``direction_data`` used (None: all).
        eta0: the first step tried (None: the checkpoint's learning rate, else 1/‖d‖).
        rtol: the line search stops when the bracket's relative width (η_hi − η_lo)/η_hi ≤ rtol (1e-3).
        max_evals: the most forward passes of the search (40).
        rayleigh: also dᵀHd/dᵀd and the quadratic prediction dᵀHd/gᵀd (one Hessian-vector product).
        lambda_max: also λ_max by Lanczos (``tol``, ``max_iter``), for small models.
        curvature / subset / mode / path / dtype / seed: the operator and data (``lossatlas.probes.operators``);
            the line search evaluates the loss itself, in ``mode``.
    Values: "critical_sharpness" λ_c, "critical_step" η_c, "loss", "search_eta" / "search_loss_change"
        ("eval",), and "rayleigh_quotient", "quadratic_estimate", "directional_derivative" gᵀd, "lambda_max"
        when asked for.
    """

    name: ClassVar[str] = "critical_sharpness"
    summary: ClassVar[str] = "critical sharpness 2/η_c along the update, from a line search of forward passes"
    section: ClassVar[str] = "curvature"
    title: ClassVar[str] = "critical sharpness along the update"
    figure: ClassVar[str | None] = "critical_sharpness"
    usage: ClassVar[str] = "--steps all"

    direction: str = "gradient"
    direction_data: dict | None = field(default=None)
    direction_examples: int | None = None
    eta0: float | None = None
    rtol: float = 1e-3
    max_evals: int = 40
    rayleigh: bool = True
    lambda_max: bool = True
    tol: float = TOL
    max_iter: int | None = None

    @property
    def needs_optimizer_state(self) -> bool:  # type: ignore[override]
        """The runner loads the optimizer state for direction="adam" only (it can be twice the model's size)."""
        return self.direction == "adam"

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        prefix = f"{self.name}: "
        self.check_curvature_settings()
        check_choice("direction", self.direction, DIRECTIONS, prefix=prefix)
        if self.direction_data is not None:
            if not isinstance(self.direction_data, (dict, str)):
                raise ValueError(f"{prefix}direction_data must be a data spec (JSON object), got {self.direction_data!r}")
            if self.direction != "gradient":
                raise ValueError(f"{prefix}direction_data gives a gradient direction; use it with direction='gradient' "
                                 f"(direction={self.direction!r} comes from the run's own updates)")
        if self.direction_examples is not None:
            self.check_int("direction_examples", self.direction_examples, 1)
        if self.eta0 is not None:
            self.check_positive("eta0", self.eta0)
        self.check_positive("rtol", self.rtol)
        self.check_int("max_evals", self.max_evals, 4)
        self.check_positive("tol", self.tol)
        if self.max_iter is not None:
            self.check_int("max_iter", self.max_iter, 1)

    # ---------------------------------------------------------------------------------------------------------------
    def _direction(self, ctx: ProbeContext, objective: DataObjective, params: Params, dtype: torch.dtype,
                   meta: dict) -> tuple[Params, Params | None]:
        """(d, ∇L or None): the direction by ``direction``, and the gradient when it was computed on the way."""
        if self.direction == "gradient":
            if self.direction_data is None:
                _, grad = objective.value_and_grad(params)
                return grad, grad
            from lossatlas import models  # the data registry, only for the relative form

            data = models.build_data(self.direction_data)
            batches = to_device(as_batches(data, 256, limit=self.direction_examples), ctx.device, dtype)
            other = DataObjective(ctx.model, batches, ctx.loss, mode=self.mode, dtype=dtype)
            meta["direction_examples"] = int(other.total)
            return other.value_and_grad(params)[1], None
        if self.direction == "adam":
            if ctx.optimizer_state is None:
                raise ValueError(f"{self.name}: direction='adam' needs the checkpoint's optimizer state; record the run "
                                 "with its optimizer (Recorder(..., optimizer=opt)) or use direction='gradient'")
            return adam_direction(params, ctx.optimizer_state, ctx.optimizer), None
        # "update": the checkpoints' difference, per step and unit learning rate
        steps = sorted(int(s) for s in ctx.steps)
        if ctx.state_at is None or ctx.step is None or int(ctx.step) not in steps or len(steps) < 2:
            raise ValueError(f"{self.name}: direction='update' needs two checkpoints of the run; record more than one "
                             "or use direction='gradient'")
        i = steps.index(int(ctx.step))
        a, b = (steps[i], steps[i + 1]) if i + 1 < len(steps) else (steps[i - 1], steps[i])
        lr = float(ctx.lr) if ctx.lr is not None and ctx.lr > 0 else 1.0
        sa, sb = ctx.state_at(a), ctx.state_at(b)
        missing = [k for k in params if k not in sa or k not in sb]
        if missing:
            raise ValueError(f"{self.name}: the checkpoints at steps {a} and {b} lack {missing[:3]}; the model spec "
                             "does not match the run")
        meta.update(update_steps=[a, b], update_scale=(b - a) * lr,
                    update_units="per step per unit learning rate" if ctx.lr else "per step (learning rate unknown)")
        return {k: (sa[k].to(v) - sb[k].to(v)) / ((b - a) * lr) for k, v in params.items()}, None

    def run(self, ctx: ProbeContext) -> Result:
        """λ_c = 2/η_c along the chosen direction, with the Rayleigh quotient and λ_max when asked for."""
        t0 = time.perf_counter()
        batches = self.curvature_batches(ctx)
        dtype = DTYPES[self.dtype] if self.dtype is not None else ctx.dtype
        params = trainable_params(ctx.model, dtype)
        if not params:
            raise ValueError(f"{self.name}: the model has no parameter with requires_grad=True; nothing to measure")
        dtype = next(iter(params.values())).dtype
        params = {k: v.to(ctx.device) for k, v in params.items()}
        line_batches = to_device(batches, ctx.device, dtype)
        objective = DataObjective(ctx.model, line_batches, ctx.loss, mode=self.mode, dtype=dtype)
        meta: dict[str, Any] = {"direction": self.direction}
        d, grad = self._direction(ctx, objective, params, dtype, meta)
        d_norm = float(dot(d, d)) ** 0.5
        if not (d_norm > 0 and math.isfinite(d_norm)):
            raise ValueError(f"{self.name}: the {self.direction} direction is zero or not finite (‖d‖ = {d_norm}); "
                             "pick another checkpoint or direction")
        eta0 = self.eta0 if self.eta0 is not None else (float(ctx.lr) if ctx.lr else 1.0 / d_norm)
        search = critical_step(line_loss(objective, params, d), eta0=eta0, rtol=self.rtol, max_evals=self.max_evals)
        elapsed = {"line_search": time.perf_counter() - t0}

        op = self.curvature_operator(ctx, batches)
        res = self.new_result(ctx.step, self.operator_meta(ctx, op, batches))
        res.add("critical_sharpness", np.float64(search.lambda_c))
        res.add("critical_step", np.float64(search.eta_c))
        res.add("loss", np.float64(search.loss))
        res.add("search_eta", search.etas.astype(np.float64), ("eval",))
        res.add("search_loss_change", search.changes.astype(np.float64), ("eval",))
        res.meta.update(meta)
        res.meta.update(line_search_status=search.status, line_search_evals=search.evals, eta0=float(eta0),
                        bracket=[float(x) for x in search.bracket], direction_norm=d_norm, rtol=self.rtol)
        if search.status == "never_rises":
            res.meta["critical_sharpness_upper_bound"] = 2.0 / search.bracket[0]
        if self.rayleigh:
            t1 = time.perf_counter()
            if grad is None:
                _, grad = objective.value_and_grad(params)
            dv = op.flatten({k: v.to(op.dtype) for k, v in d.items()})
            dHd = float(torch.dot(dv.to(torch.float64), (op @ dv).to(torch.float64)))
            gd = float(dot(grad, d))
            res.add("rayleigh_quotient", np.float64(dHd / d_norm ** 2))
            res.add("directional_derivative", np.float64(gd))
            res.add("quadratic_estimate", np.float64(dHd / gd if gd != 0 else math.nan))
            elapsed["rayleigh"] = time.perf_counter() - t1
        if self.lambda_max:
            t1 = time.perf_counter()
            eig = top_eigenpairs(op, 1, which="LA", tol=self.tol, max_iter=self.max_iter, seed=self.seed,
                                 criterion="eigenvalue", return_eigenvectors=False)
            res.add("lambda_max", np.float64(eig.eigenvalues[0]))
            res.meta["lambda_max_converged"] = bool(eig.converged[0])
            elapsed["lambda_max"] = time.perf_counter() - t1
        res.meta.update(path=op.path, matvecs=int(op.matvecs), elapsed_s=elapsed)
        return res


__all__ = ["CriticalSharpness", "LineSearch", "critical_step", "line_loss", "adam_direction", "DIRECTIONS"]
