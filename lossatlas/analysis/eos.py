"""Edge of stability: sharpness against the stability threshold along a run.

Cohen, Kaur, Li, Kolter, Talwalkar (ICLR 2021): under full-batch GD with step η the sharpness S = λ_max(∇²L) first rises
(*progressive sharpening*) and then hovers at the threshold 2/η (*edge of stability*, EoS), where a
quadratic model would diverge. Thresholds for other optimizers (the divergence bound of a
quadratic under each update rule):

- ``gd``: 2/η
- ``heavy_ball`` (Polyak momentum β): (2 + 2β)/η
- ``nesterov``: (2 + 2β)/(η(1 + 2β))
- ``adam``: the *preconditioned* sharpness λ₁(P⁻¹H) equilibrates at (2 + 2β₁)/((1 − β₁)η),
  38/η for β₁ = 0.9 (Cohen et al. 2022, arXiv 2207.14484); pass preconditioned sharpness values.

The rule for a run's own optimizer (read from its stored settings: SGD momentum, dampening, Nesterov,
weight decay; Adam's β₁), the largest stable step and the rule's text that results carry as
``max_stable_lr`` / ``stability_rule``: ``lossatlas.probes.stability`` (re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import numpy as np

from lossatlas.checks import check_choice
from lossatlas.probes.stability import StabilityRule, stability_meta, stability_rule  # noqa: F401  (re-exported)

OPTIMIZERS = ("gd", "heavy_ball", "nesterov", "adam")
Optimizer = Literal["gd", "heavy_ball", "nesterov", "adam"]


def stability_threshold(lr: Any, *, optimizer: Optimizer = "gd", beta: float = 0.9) -> Any:
    """The sharpness at which a quadratic becomes unstable for step size ``lr``.

    2/η (GD), (2+2β)/η (heavy ball), (2+2β)/(η(1+2β)) (Nesterov), (2+2β₁)/((1−β₁)η) (Adam's
    preconditioned sharpness; 38/η at β₁ = 0.9). ``beta`` is ignored for ``gd``. Works on arrays.
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer != "gd" and not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
    eta = np.asarray(lr, dtype=np.float64)
    if np.any(~(eta > 0)):
        raise ValueError("learning rates must be positive and finite to have a stability threshold")
    if optimizer == "gd":
        out = 2.0 / eta
    elif optimizer == "heavy_ball":
        out = (2.0 + 2.0 * beta) / eta
    elif optimizer == "nesterov":
        out = (2.0 + 2.0 * beta) / (eta * (1.0 + 2.0 * beta))
    else:
        out = (2.0 + 2.0 * beta) / ((1.0 - beta) * eta)
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class EoSAnalysis:
    """Sharpness relative to the stability threshold along a run, and its phases.

    Attributes:
        steps, sharpness, threshold: per measured step.
        ratio: sharpness / threshold (= λ_max·η/2 for GD); 1 is the edge of stability.
        phase: per step, ``"sharpening"``, ``"eos"`` or ``"other"``.
        sharpening: (first, last) step of progressive sharpening (sharpness rising from its
            minimum to the EoS onset, or to the end of the run), or None.
        sharpening_rate: least-squares slope of sharpness per step during sharpening, or None.
        eos_onset: first step of the sustained EoS phase, or None.
        eos: (first, last) step of the EoS phase, or None.
        eos_ratio_mean, eos_ratio_std: ratio statistics over the EoS phase (None without one).
        fraction_above: fraction of the EoS phase with ratio > 1.
    """

    steps: list[int]
    sharpness: list[float]
    threshold: list[float]
    ratio: list[float]
    phase: list[str]
    band: float
    sharpening: tuple[int, int] | None
    sharpening_rate: float | None
    eos_onset: int | None
    eos: tuple[int, int] | None
    eos_ratio_mean: float | None
    eos_ratio_std: float | None
    fraction_above: float | None

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


def eos_phases(steps: Sequence[int], sharpness: Sequence[float], lr: float | Sequence[float], *,
               optimizer: Optimizer = "gd", beta: float = 0.9, band: float = 0.9, sustain: int = 3,
               rise: float = 0.1) -> EoSAnalysis:
    """Progressive sharpening and edge-of-stability phases of a sharpness curve (Cohen et al. 2021).

    ratio_t = S_t / threshold(η_t). The EoS onset is the first step from which ``sustain``
    consecutive measurements have ratio ≥ ``band`` (default 0.9); the EoS phase runs from there to
    the last measurement with ratio ≥ band. Progressive sharpening is the stretch from the minimum
    of S before the onset (or before the end, if EoS is never reached) up to the onset, provided S
    rose by more than ``rise`` (relative) over it.

    Args:
        steps: measurement steps, strictly increasing.
        sharpness: λ_max at those steps (for Adam: the preconditioned λ₁(P⁻¹H)).
        lr: the learning rate, one number or one per step.
        optimizer: the optimizer whose stability threshold applies (see ``stability_threshold``).
        beta: its momentum β (Adam's β₁); ignored for ``"gd"``.
        band: the ratio counted as "at the edge" (0 < band ≤ 1).
        sustain: consecutive measurements needed for the onset.
        rise: minimal relative increase of S for progressive sharpening.
    """
    s = np.asarray(steps, dtype=np.int64)
    lam = np.asarray(sharpness, dtype=np.float64)
    if s.ndim != 1 or lam.shape != s.shape or s.size == 0:
        raise ValueError(f"steps and sharpness must be non-empty 1-D arrays of one length, got {s.shape} and {lam.shape}")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing")
    eta = np.broadcast_to(np.asarray(lr, dtype=np.float64), s.shape) if np.ndim(lr) == 0 else np.asarray(lr, np.float64)
    if eta.shape != s.shape:
        raise ValueError(f"lr must be one number or one per step ({s.size}), got {eta.shape[0]} values")
    if not 0.0 < band <= 1.0:
        raise ValueError(f"band must lie in (0, 1], got {band!r}")
    if not isinstance(sustain, int) or sustain < 1:
        raise ValueError(f"sustain must be a positive int, got {sustain!r}")
    thr = np.asarray(stability_threshold(eta, optimizer=optimizer, beta=beta), dtype=np.float64).reshape(s.shape)
    ratio = lam / thr
    at_edge = np.isfinite(ratio) & (ratio >= band)
    onset = None
    for i in range(s.size - sustain + 1):
        if at_edge[i:i + sustain].all():
            onset = i
            break
    phase = np.array(["other"] * s.size, dtype=object)
    eos = None
    if onset is not None:
        last = int(np.flatnonzero(at_edge)[-1])
        eos = (int(s[onset]), int(s[last]))
        phase[onset:last + 1] = "eos"
    stop = onset if onset is not None else s.size - 1
    sharpening, rate = None, None
    finite = np.where(np.isfinite(lam[:stop + 1]), lam[:stop + 1], np.inf)
    if stop > 0 and np.isfinite(finite).any():
        lo = int(np.argmin(finite))
        if stop > lo and lam[stop] > lam[lo] * (1 + rise):
            sharpening = (int(s[lo]), int(s[stop]))
            phase[lo:stop] = "sharpening"
            seg = slice(lo, stop + 1)
            rate = float(np.polyfit(s[seg].astype(np.float64), lam[seg], 1)[0]) if stop - lo >= 1 else None
    if onset is not None:
        r = ratio[onset:last + 1]
        r = r[np.isfinite(r)]
        mean, std, above = float(r.mean()), float(r.std()), float((r > 1).mean())
    else:
        mean = std = above = None
    return EoSAnalysis(steps=s.tolist(), sharpness=lam.tolist(), threshold=thr.tolist(), ratio=ratio.tolist(),
                       phase=[str(p) for p in phase], band=float(band), sharpening=sharpening,
                       sharpening_rate=rate, eos_onset=None if onset is None else int(s[onset]), eos=eos,
                       eos_ratio_mean=mean, eos_ratio_std=std, fraction_above=above)


def gd_diverges_on_quadratic(curvature: float, lr: float, steps: int = 200) -> bool:
    """Whether GD x ← x − η λ x on L = ½λx² blows up from x = 1 (it does iff ηλ > 2)."""
    x = 1.0
    for _ in range(steps):
        x -= lr * curvature * x
        if not math.isfinite(x) or abs(x) > 1e6:
            return True
    return abs(x) > 1.0
