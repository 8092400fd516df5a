"""The largest stable learning rate for the run's optimizer, read from its stored settings.

Linear stability on a quadratic with curvature λ (the sharpness λ_max of the loss, or Adam's
preconditioned sharpness), for the update rules as PyTorch implements them (step size η):

- gradient descent (``SGD``, momentum 0): x ← x − ηλx is stable iff ηλ < 2, so η < 2/λ
  (Cohen, Kaur, Li, Kolter, Talwalkar 2021, "Gradient Descent on Neural Networks Typically Occurs at
  the Edge of Stability").
- heavy-ball momentum β (``SGD(momentum=β)``, v ← βv + (1 − d)g, x ← x − ηv): the iteration
  x_{t+1} = (1 + β − a)x_t − βx_{t−1} with a = η(1 − d)λ has the characteristic polynomial
  z² − (1 + β − a)z + β, whose roots leave the unit disc through z = −1 at a = 2 + 2β, so
  η < 2(1 + β)/((1 − d)λ) (Polyak 1964; the momentum thresholds of Cohen et al. 2021, Appendix).
- Nesterov momentum β (``SGD(momentum=β, nesterov=True)``, v ← βv + g, x ← x − η(g + βv)):
  x_{t+1} = (1 − a)(1 + β)x_t − β(1 − a)x_{t−1} with a = ηλ; at z = −1 the polynomial
  z² − (1 − a)(1 + β)z + β(1 − a) vanishes when 1 + (1 − a)(1 + 2β) = 0, i.e. a = 2(1 + β)/(1 + 2β),
  so η < 2(1 + β)/((1 + 2β)λ) (Cohen et al. 2021).
- Adam/AdamW with the preconditioner P frozen (m ← β₁m + (1 − β₁)g, x ← x − ηP⁻¹m): heavy ball on
  P⁻¹H with step η(1 − β₁), so the *preconditioned* sharpness λ(P⁻¹H) must stay below
  2(1 + β₁)/((1 − β₁)η), i.e. η < 2(1 + β₁)/((1 − β₁)λ(P⁻¹H)) (38/η at β₁ = 0.9; Cohen et al. 2022,
  "Adaptive Gradient Methods at the Edge of Stability"). λ_max(H) alone gives no Adam threshold.

SGD's ``weight_decay`` w adds w to every curvature (the gradient is g + wx), so λ + w replaces λ;
Adam's weight decay is left out (it acts through the preconditioner). Other optimizers have no rule here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

StabilityKind = Literal["gd", "heavy_ball", "nesterov", "adam"]


@dataclass(frozen=True)
class StabilityRule:
    """One optimizer's linear-stability condition on a quadratic.

    Attributes:
        kind: ``"gd"``, ``"heavy_ball"``, ``"nesterov"`` or ``"adam"``.
        beta: the momentum β (Adam's β₁; 0 for ``gd``).
        dampening: SGD's dampening d (the gradient enters the momentum as (1 − d)g).
        weight_decay: SGD's L2 weight decay w, added to the curvature (0 for Adam).
        sharpness: which curvature the rule bounds: ``"hessian"`` (λ_max of the loss) or
            ``"preconditioned"`` (Adam's λ_max(P⁻¹H)).
        text: the rule in words, e.g. ``"heavy-ball 2(1+β)/λ with β=0.9"``.
    """

    kind: StabilityKind
    beta: float
    dampening: float
    weight_decay: float
    sharpness: Literal["hessian", "preconditioned"]
    text: str

    @property
    def factor(self) -> float:
        """The factor c in η_max = c/(λ + w): 2, 2(1+β)/(1−d), 2(1+β)/(1+2β), or 2(1+β₁)/(1−β₁)."""
        b = self.beta
        if self.kind == "gd":
            return 2.0
        if self.kind == "heavy_ball":
            return 2.0 * (1.0 + b) / (1.0 - self.dampening)
        if self.kind == "nesterov":
            return 2.0 * (1.0 + b) / (1.0 + 2.0 * b)
        return 2.0 * (1.0 + b) / (1.0 - b)

    def max_stable_lr(self, sharpness: float) -> float | None:
        """The largest stable step c/(λ + w) for sharpness λ; None when λ + w ≤ 0 (every step is stable)."""
        curv = float(sharpness) + self.weight_decay
        return self.factor / curv if curv > 0 and math.isfinite(curv) else None

    def threshold(self, lr: float) -> float:
        """The sharpness at which step ``lr`` becomes unstable: c/η − w."""
        return self.factor / float(lr) - self.weight_decay


def _number(value: Any, default: float) -> float:
    """A hyper-parameter read from a stored spec (a number, a bool, or missing)."""
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def stability_rule(optimizer: Mapping[str, Any] | None) -> StabilityRule | None:
    """The stability rule of a stored optimizer spec ``{"name": "SGD", "defaults": {...}}``.

    None for an optimizer without a known rule (RMSprop, Adagrad, …). No spec (a run without its
    optimizer, a notebook model): gradient descent, and the text says the optimizer is unknown.
    """
    if not optimizer:
        return StabilityRule("gd", 0.0, 0.0, 0.0, "hessian", "gradient descent 2/λ (the run recorded no optimizer)")
    name = str(optimizer.get("name", ""))
    d = dict(optimizer.get("defaults") or {})
    if name == "SGD":
        beta, damp, wd = _number(d.get("momentum"), 0.0), _number(d.get("dampening"), 0.0), _number(d.get("weight_decay"), 0.0)
        decay = f" and weight_decay={wd:g} added to λ" if wd else ""
        if beta == 0.0:
            return StabilityRule("gd", 0.0, 0.0, wd, "hessian", f"gradient descent 2/λ{decay} (SGD without momentum)")
        if bool(d.get("nesterov", False)):
            return StabilityRule("nesterov", beta, 0.0, wd, "hessian",
                                 f"Nesterov 2(1+β)/((1+2β)λ) with β={beta:g}{decay}")
        damp_text = f"/(1−d) with d={damp:g}" if damp else ""
        return StabilityRule("heavy_ball", beta, damp, wd, "hessian",
                             f"heavy-ball 2(1+β)/λ{damp_text} with β={beta:g}{decay}")
    if name in ("Adam", "AdamW"):
        betas = d.get("betas") or (0.9, 0.999)
        b1 = _number(betas[0], 0.9)
        return StabilityRule("adam", b1, 0.0, 0.0, "preconditioned",
                             f"{name} 2(1+β₁)/((1−β₁)λ(P⁻¹H)) with β₁={b1:g}, on the preconditioned sharpness")
    return None


def stability_meta(optimizer: Mapping[str, Any] | None, sharpness: float, lr: float | None, *,
                   preconditioned: bool = False) -> dict[str, Any]:
    """Result metadata: ``max_stable_lr``, ``stability_rule`` (the rule in words) and ``stability_threshold``.

    ``sharpness`` is λ_max(H) (``preconditioned=False``) or Adam's λ_max(P⁻¹H) (True); a rule only
    applies to its own kind of sharpness, so λ_max(H) of an Adam run gives no ``max_stable_lr``, and a
    rule's text says so. ``stability_threshold`` is the sharpness threshold at the checkpoint's ``lr``.
    """
    rule = stability_rule(optimizer)
    if rule is None:
        name = (optimizer or {}).get("name", "?")
        return {"stability_rule": f"no stability rule for {name}; max_stable_lr not reported"}
    if (rule.sharpness == "preconditioned") != preconditioned:
        if preconditioned:  # a preconditioned sharpness of a non-Adam run: nothing to compare it with
            return {}
        return {"stability_rule": f"{rule.text}: λ_max(H) gives no step limit for Adam; run hessian with "
                                  "--preconditioned for max_stable_lr"}
    out: dict[str, Any] = {"stability_rule": rule.text}
    lr_max = rule.max_stable_lr(sharpness)
    if lr_max is not None:
        out["max_stable_lr"] = lr_max
    if lr is not None and lr > 0:
        out["stability_threshold"] = rule.threshold(lr)
    return out


__all__ = ["StabilityRule", "stability_rule", "stability_meta"]
