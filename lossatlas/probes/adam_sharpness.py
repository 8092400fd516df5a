"""The ``adam_sharpness`` probe: Adam's preconditioned sharpness λ_max(P⁻¹H) (Cohen et al. 2022).

"Adaptive gradient methods at the edge of stability": the frozen-Adam update is θ ← θ − η P⁻¹ m with the
EMA m, so its stability is governed by λ_max(P⁻¹H) against (2 + 2β₁)/((1 − β₁)η) (= 38/η for β₁ = 0.9).
P = (1 − β₁ᵗ)(√v̂ + ε) comes from the checkpoint's optimizer state; λ_max(P⁻¹H) is computed as
λ_max(P^{−1/2} H P^{−1/2}) (same eigenvalues, symmetric) by Lanczos. ``lossatlas hessian --preconditioned``
runs this probe as a part, stored under its own key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from lossatlas.estimators import EigResult
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.spectrum import TOL, top_eigenpairs
from lossatlas.probes.stability import stability_meta


class _Sandwich:
    """v ↦ D (A (D v)) for a diagonal D given as a flat vector: a symmetric rescaling of A."""

    def __init__(self, A: Any, d: Tensor) -> None:
        self.A, self.d = A, d
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        d = self.d if V.ndim == 1 else self.d[:, None]
        return d * (self.A @ (d * V))


def adam_preconditioner(
    optimizer_state: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    step: int | None = None,
) -> dict[str, Tensor]:
    """Adam's diagonal preconditioner P = (1 − β₁ᵗ)(√v̂ + ε), v̂ = v/(1 − β₂ᵗ), per parameter name.

    The bias-correction factor follows torch.optim.Adam (m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ)); ``t``
    is the state's ``step`` unless given.
    """
    b1, b2 = float(betas[0]), float(betas[1])
    out = {}
    for n in names:
        st = optimizer_state.get(n)
        if not st or "exp_avg_sq" not in st:
            raise ValueError(
                f"the optimizer state has no 'exp_avg_sq' for parameter {n!r}; preconditioned sharpness needs "
                "an Adam/AdamW run recorded with its optimizer state (Recorder(save_optimizer_state=True))"
            )
        t = step if step is not None else st.get("step")
        if t is None:
            raise ValueError(f"the optimizer state of {n!r} has no 'step'; pass step= explicitly")
        t = float(torch.as_tensor(t).reshape(-1)[0])
        if t < 1:
            raise ValueError(f"Adam step count must be >= 1 for the bias correction, got {t:g}")
        v_hat = st["exp_avg_sq"].detach().to(torch.float64) / (1.0 - b2**t)
        out[n] = (1.0 - b1**t) * (v_hat.sqrt() + eps)
    return out


def preconditioned_sharpness(
    op: Any,
    preconditioner: Mapping[str, Tensor],
    *,
    tol: float = TOL,
    max_iter: int | None = None,
    seed: int = 0,
) -> EigResult:
    """λ_max(P⁻¹H) as λ_max(P^{−1/2} H P^{−1/2}) (same eigenvalues, symmetric; Cohen et al. 2022).

    ``op`` is a curvature operator (it supplies ``flatten`` and the parameter order), ``preconditioner``
    maps each of its parameter names to the positive diagonal P.
    """
    p = op.flatten({n: preconditioner[n] for n in op.param_names}).to(device=op.device, dtype=torch.float64)
    if not bool(torch.all(p > 0)):
        raise ValueError("the preconditioner must be positive everywhere (Adam's √v̂ + ε with ε > 0)")
    d = p.rsqrt().to(op.dtype)
    return top_eigenpairs(_Sandwich(op, d), 1, tol=tol, max_iter=max_iter, seed=seed)


@register_probe
@dataclass(frozen=True, kw_only=True)
class AdamSharpness(CurvatureProbe):
    """Adam's preconditioned sharpness λ_max(P⁻¹H) at a checkpoint of an Adam/AdamW run (Cohen et al. 2022).

    Attributes:
        tol / max_iter / seed: the Lanczos settings, as the ``hessian`` probe's.
        curvature / subset / mode / path / dtype: the operator (``lossatlas.probes.operators``).
    Values: "preconditioned_lambda_max" (0-d); meta "adam_threshold" = (2 + 2β₁)/((1 − β₁)η) when η is known.
    """

    name: ClassVar[str] = "adam_sharpness"
    summary: ClassVar[str] = "Adam's preconditioned sharpness λ_max(P⁻¹H) from the checkpoint's optimizer state"
    splits_work: ClassVar[bool] = True  # under torchrun: data-parallel products over ctx.dist
    needs_optimizer_state: ClassVar[bool] = True
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = None  # shown in the hessian figure, merged (part_of)
    title: ClassVar[str] = "Adam's preconditioned sharpness"
    part_of: ClassVar[str | None] = "hessian"
    switch: ClassVar[str | None] = "preconditioned"

    tol: float = TOL
    max_iter: int | None = None

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        self.check_curvature_settings()
        self.check_positive("tol", self.tol)
        if self.max_iter is not None:
            self.check_int("max_iter", self.max_iter, 1)

    def run(self, ctx: ProbeContext) -> Result:
        """λ_max(P⁻¹H) with P from the context's optimizer state (ValueError without one)."""
        t0 = time.perf_counter()
        if not ctx.optimizer_state:
            raise ValueError(f"{self.name}: Adam's preconditioned sharpness needs the checkpoint's optimizer state; "
                             "record the run with its optimizer (Recorder(..., optimizer=opt))")
        defaults = dict((ctx.optimizer or {}).get("defaults", {}) or {})
        optimizer = str((ctx.optimizer or {}).get("name", "Adam"))
        if optimizer not in ("Adam", "AdamW"):
            raise ValueError(f"{self.name}: preconditioned sharpness is defined for Adam/AdamW, the run used {optimizer}")
        betas = tuple(defaults.get("betas", (0.9, 0.999)))
        eps = float(defaults.get("eps", 1e-8))
        batches = self.curvature_batches(ctx)
        op = self.curvature_operator(ctx, batches)
        P = adam_preconditioner(ctx.optimizer_state, op.param_names, betas=betas, eps=eps)
        eig = preconditioned_sharpness(op, P, tol=self.tol, max_iter=self.max_iter, seed=self.seed)
        res = self.new_result(ctx.step, self.operator_meta(ctx, op, batches))
        res.add("preconditioned_lambda_max", eig.eigenvalues[0])
        res.meta.update(preconditioned_converged=bool(eig.converged[0]), adam_betas=[float(b) for b in betas],
                        adam_eps=eps)
        if ctx.lr is not None and ctx.lr > 0:
            # frozen-Adam stability threshold (2 + 2β₁)/((1 − β₁)η) = 38/η at β₁ = 0.9 (Cohen et al. 2022)
            res.meta["adam_threshold"] = (2 + 2 * betas[0]) / ((1 - betas[0]) * float(ctx.lr))
        # the largest stable step on λ_max(P⁻¹H): 2(1 + β₁)/((1 − β₁)λ), and the rule used
        res.meta.update(stability_meta(ctx.optimizer or {"name": optimizer, "defaults": {"betas": list(betas)}},
                                       float(eig.eigenvalues[0]), ctx.lr, preconditioned=True))
        res.meta.update(path=op.path, matvecs=int(op.matvecs), elapsed_s={"preconditioned": time.perf_counter() - t0})
        return res


__all__ = ["AdamSharpness", "adam_preconditioner", "preconditioned_sharpness"]
