"""Loss-spike and divergence detection on a logged training curve.

The detector is a robust z-score (median and 1.4826·MAD instead of mean and standard deviation, so a
spike cannot inflate its own yardstick) over a window of past steps: on the log of the
loss (which turns the decaying trend and multiplicative noise into a slowly moving level with
additive noise), each step is compared with a robust local trend of the previous ``window``
accepted steps (the line through the medians of their older and newer halves, so that a decaying
curve does not lag), in units of the robust standard deviation σ̂ = 1.4826·MAD of the residuals:

    r_t = (log ℓ_t − trend_t) / σ̂,   flagged when r_t > sensitivity

and, second, the rise over the *current level* (the median of the last 10 accepted steps) is at
least ``height_sigmas`` times the local noise σ_n of the curve:

    h_t = log ℓ_t − median(last 10 accepted log ℓ),   flagged only when also h_t > height_sigmas·σ_n,
    σ_n = std(Δ log ℓ over the window) / √2

σ_n is the standard deviation of the first differences of the accepted steps (differencing removes
the trend, so no trend model can bias it, and /√2 turns the variance of a difference of two
independent noises back into one), and it is the plain standard deviation, not the MAD: mini-batch
losses are heavy-tailed (a batch that happens to hold the hard examples), so the MAD-based σ̂
alone calls ordinary mini-batch noise a 6σ̂ event, while the height condition asks the rise to be
large against the noise the run really has. Both conditions are needed: the robust z keeps a
spike from hiding behind the heavy tail, the height test keeps the heavy tail from looking like a
spike. A curve that merely decays more slowly than its extrapolated trend (a steep first drop
bending into a plateau) is not flagged either, since it does not rise over its current level.
The height test is of the kind of OLMo 2's spike score (a value ≥ 7 standard deviations from the
rolling average of the last 1000 values; OLMo et al. 2025, "2 OLMo 2 Furious", arXiv 2501.00656),
measured from the current level and with the standard deviation of differences.

Flagged steps are kept out of the window (no "masking" of a second spike by the first), the first
``warmup`` steps are never flagged, and a spike lasts from its first flagged step until the
loss is back near the baseline. The first non-finite loss ends the curve: it is reported as a ``"divergence"`` event.

The llm-foundry ``KillLossSpike`` and Megatron-LM "spiky loss" rules are exposed too, for
comparison with what those codebases would have flagged.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np

from lossatlas.checks import check_choice

MAD_TO_SIGMA = 1.4826  # σ = 1.4826·MAD for Gaussian noise
SIGMA_FLOOR = 1e-3  # in log-loss units (0.1 %): a perfectly flat curve still needs a real jump
SpikeKind = Literal["spike", "divergence"]
RECENT = 10  # a spike must rise height_sigmas·σ_n above the median of this many last accepted steps
HEIGHT_SIGMAS = 6.0  # default rise over the current level, in units of the local noise σ_n


@dataclass(frozen=True)
class Spike:
    """One loss spike (or the divergence of the run).

    Attributes:
        kind: ``"spike"`` or ``"divergence"`` (the first non-finite loss).
        start: first flagged step.
        peak: step of the largest loss in the spike.
        end: last flagged step of the spike.
        recovery: first step after the peak whose loss is back within ``recover_sigmas`` σ̂ of
            the pre-spike baseline, or None (never recovered, or divergence).
        baseline: the pre-spike loss level exp(median of the window) at ``start``.
        peak_loss: the loss at ``peak`` (NaN/inf for a divergence).
        height_ratio: peak_loss / baseline.
        height_abs: peak_loss − baseline.
        zscore: the robust z-score r_t at the peak, in σ̂ units (inf for a divergence).
        noise_sigma: σ̂ = 1.4826·MAD of the log-loss residuals in the window before the spike (log
            units; ``noise_sigma`` and ``noise_std`` are in log-loss, the heights in loss units).
        noise_std: σ_n = std(Δ log ℓ)/√2 in that window: the local mini-batch noise, tails included.
        height_sigmas: the peak's rise over the pre-spike level (median of the last 10 accepted
            log-losses), in units of σ_n (inf for a divergence).
    """

    kind: SpikeKind
    start: int
    peak: int
    end: int
    recovery: int | None
    baseline: float
    peak_loss: float
    height_ratio: float
    height_abs: float
    zscore: float
    noise_sigma: float
    noise_std: float = math.nan
    height_sigmas: float = math.nan

    def to_dict(self) -> dict:
        """A JSON-able dict (non-finite floats become None)."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_curve(steps: Sequence[int], values: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps)
    x = np.asarray(values, dtype=np.float64)
    if s.ndim != 1 or x.ndim != 1 or s.shape != x.shape:
        raise ValueError(f"steps and {what} must be 1-D arrays of the same length, got shapes "
                         f"{s.shape} and {x.shape}")
    if s.size and np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing; sort the log by step and drop duplicates")
    return s.astype(np.int64), x


def first_nonfinite(values: Sequence[float]) -> int | None:
    """Index of the first NaN/±inf entry of ``values``, or None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(values, dtype=np.float64)))
    return int(bad[0]) if bad.size else None


def detect_spikes(
    steps: Sequence[int],
    loss: Sequence[float],
    *,
    sensitivity: float = 6.0,
    window: int = 100,
    warmup: int | None = None,
    recover_sigmas: float = 3.0,
    scale: Literal["log", "linear"] = "log",
    height_sigmas: float = HEIGHT_SIGMAS,
) -> list[Spike]:
    """Loss spikes: runs of steps whose log-loss exceeds its robust local trend by ``sensitivity`` σ̂.

    r_t = (y_t − trend_t(W_t)) / (1.4826·MAD(residuals of W_t)), y = log ℓ, W_t = the last
    ``window`` unflagged steps; flag r_t > k = ``sensitivity`` (flagged steps stay out of the window, and
    the trend is removed). The nominal threshold is a jump of k·σ̂ in log-loss, i.e. a
    height ratio exp(k·σ̂) over the trend (σ̂ is reported with each spike). The rise over the current
    level (median of the last 10 accepted steps) must also exceed ``height_sigmas``·σ_n, σ_n =
    std(Δy)/√2 over the window (module docstring). Measured on a noisy power-law curve
    (tests/analysis/test_spikes.py): recall ≈ 0.4 for heights 1–1.5× nominal, ≈ 0.97 from 1.5×, and
    no false positive in 9·10⁴ steps at k = 6; on 45 clean mini-batch runs (SGD, momentum, Adam;
    batches 16-256) no false positive, where the robust z alone gave 11
    (benchmarks/bench_diagnose.py).
    A spike is open until r_t < ``recover_sigmas`` (flags in between belong to it); one still open
    ``window`` steps after its start is closed with ``recovery=None`` and the window restarts at
    the new level.

    Args:
        steps: the logged steps, strictly increasing.
        loss: the loss at each step; the first non-finite value is a ``"divergence"`` event and
            the curve is not read past it.
        sensitivity: k, the threshold in robust standard deviations (7 is OLMo-style, 3 very
            sensitive; default 6).
        window: W, the number of previous accepted steps the median and MAD are taken over.
        warmup: steps never flagged at the start (default min(window, 50)); at least 5.
        recover_sigmas: the spike has recovered when r_t falls below this.
        scale: ``"log"`` (default; needs a positive loss) or ``"linear"`` (losses that can be ≤ 0).
        height_sigmas: the rise over the current level a spike needs, in units of the local noise
            σ_n = std(Δy)/√2 (default 6; 0 turns the height test off).

    Returns:
        The spikes in order of ``start``, and a final ``"divergence"`` event if the loss became
        non-finite.
    """
    s, x = _check_curve(steps, loss, "loss")
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, float)) or not 0 < sensitivity < math.inf:
        raise ValueError(f"sensitivity must be a positive finite number of robust standard deviations, got {sensitivity!r}")
    if not isinstance(window, int) or window < 5:
        raise ValueError(f"window must be an int ≥ 5 (steps of history), got {window!r}")
    if warmup is None:
        warmup = min(window, 50)
    if not isinstance(warmup, int) or warmup < 5:
        raise ValueError(f"warmup must be an int ≥ 5, got {warmup!r}")
    check_choice("scale", scale, ("log", "linear"))
    if isinstance(height_sigmas, bool) or not isinstance(height_sigmas, (int, float)) or not 0 <= height_sigmas < math.inf:
        raise ValueError(f"height_sigmas must be a finite number ≥ 0 of noise standard deviations, got {height_sigmas!r}")
    bad = first_nonfinite(x)
    n = x.size if bad is None else bad
    if scale == "log":
        if n and np.any(x[:n] <= 0):
            raise ValueError("a log-scale detector needs a positive loss; pass scale='linear' for losses ≤ 0")
        y = np.log(x[:n]) if n else np.empty(0)
    else:
        y = x[:n].copy()

    def back(v: float) -> float:
        return float(np.exp(v)) if scale == "log" else float(v)

    spikes: list[Spike] = []
    hist = _History(min(window, max(n, 1)))  # a window longer than the curve holds all of it, never wraps
    current: dict | None = None  # the open spike; its baseline line is frozen meanwhile
    line = (0.0, 0.0, 0.0)  # (level at position c, slope, c)
    sig = noise = 0.0
    refit = max(1, window // 20)  # the trend line is extrapolated between refits (speed)
    since_fit = refit
    for i in range(n):
        if current is None and hist.size >= warmup and since_fit >= refit:
            line, sig = hist.robust_line()
            noise = hist.difference_std()
            since_fit = 0
        since_fit += 1
        if hist.size >= warmup or current is not None:
            med = line[0] + line[1] * (i - line[2])
            r = (y[i] - med) / sig
        else:
            med, r = 0.0, -math.inf
        if current is not None:
            base_i = line[0] + line[1] * (current["start"] - line[2])
            if r > sensitivity:
                current["end"] = i
                if y[i] > y[current["peak"]]:
                    current["peak"] = i
            elif r < recover_sigmas:
                spikes.append(_close(current, s, x, y, i, back, base_i, sig, noise))
                current = None
                hist.append(i, y[i])
                since_fit = refit
                continue
            if i - current["start"] + 1 >= window:  # a level shift, not a spike: restart there
                spikes.append(_close(current, s, x, y, None, back, base_i, sig, noise))
                current = None
                hist.clear()
                for j in range(max(0, i - warmup + 1), i + 1):
                    hist.append(j, y[j])
                since_fit = refit
            continue
        level = hist.recent_median(RECENT) if hist.size else y[i]
        # robust z over the trend AND a rise over the current level that is large against the noise
        if r > sensitivity and y[i] - level > max(height_sigmas * noise, 0.5 * sensitivity * sig):
            current = {"start": i, "peak": i, "end": i, "level": level}
            continue
        hist.append(i, y[i])
    if current is not None:
        spikes.append(_close(current, s, x, y, None, back, line[0] + line[1] * (current["start"] - line[2]), sig,
                             noise))
    if bad is not None:
        if hist.size:
            (lvl, slope, c), sig = hist.robust_line()
            base = back(lvl + slope * (n - c))
        else:
            base, sig = math.nan, math.nan
        spikes.append(Spike(kind="divergence", start=int(s[bad]), peak=int(s[bad]), end=int(s[bad]),
                            recovery=None, baseline=base, peak_loss=float(x[bad]), height_ratio=math.inf,
                            height_abs=math.inf, zscore=math.inf, noise_sigma=sig,
                            noise_std=hist.difference_std() if hist.size > 2 else math.nan, height_sigmas=math.inf))
    return spikes


class _History:
    """The last ``window`` accepted (position, value) pairs in a ring buffer."""

    def __init__(self, window: int) -> None:
        self.pos = np.empty(window)
        self.val = np.empty(window)
        self.window, self.size, self.head = window, 0, 0

    def append(self, i: int, v: float) -> None:
        self.pos[self.head], self.val[self.head] = i, v
        self.head = (self.head + 1) % self.window
        self.size = min(self.size + 1, self.window)

    def clear(self) -> None:
        self.size = self.head = 0

    def recent_median(self, m: int) -> float:
        """Median of the last ``m`` accepted values."""
        m = min(m, self.size)
        idx = (self.head - 1 - np.arange(m)) % self.window
        return float(np.median(self.val[idx]))

    def difference_std(self) -> float:
        """σ_n = std of the first differences of the accepted values / √2, floored at ``SIGMA_FLOOR``.

        Differencing removes a slowly moving trend without a model of it; for independent noise of
        standard deviation σ a difference has standard deviation σ√2.
        """
        k = self.size
        if k < 3:
            return SIGMA_FLOOR
        order = (np.arange(k) + (self.head - k)) % self.window  # oldest first
        return max(float(np.std(np.diff(self.val[order]))) / math.sqrt(2.0), SIGMA_FLOOR)

    def robust_line(self) -> tuple[tuple[float, float, float], float]:
        """A robust local trend and noise: ((level at c, slope, c), σ̂ of the residuals).

        The slope joins the medians of the older and the newer half of the window (a two-group
        Theil-type estimate), so a decaying curve is not mistaken for noise; σ̂ = 1.4826·MAD of
        the residuals about that line, floored at ``SIGMA_FLOOR``.
        """
        k = self.size
        order = (np.arange(k) + (self.head - k)) % self.window  # oldest first
        p, v = self.pos[order], self.val[order]
        h = k // 2
        c1, c2 = float(np.median(p[:h])), float(np.median(p[h:]))
        m1, m2 = float(np.median(v[:h])), float(np.median(v[h:]))
        slope = (m2 - m1) / (c2 - c1) if c2 > c1 else 0.0
        res = v - (m2 + slope * (p - c2))
        shift = float(np.median(res))
        sig = max(MAD_TO_SIGMA * float(np.median(np.abs(res - shift))), SIGMA_FLOOR)
        return (m2 + shift, slope, c2), sig


def _close(cur: dict, s: np.ndarray, x: np.ndarray, y: np.ndarray, rec: int | None, back, med: float,
           sig: float, noise: float) -> Spike:
    p = cur["peak"]
    base = back(med)
    return Spike(kind="spike", start=int(s[cur["start"]]), peak=int(s[p]), end=int(s[cur["end"]]),
                 recovery=None if rec is None else int(s[rec]), baseline=base, peak_loss=float(x[p]),
                 height_ratio=float(x[p] / base) if base else math.inf, height_abs=float(x[p] - base),
                 zscore=float((y[p] - med) / sig), noise_sigma=float(sig), noise_std=float(noise),
                 height_sigmas=float((y[p] - cur["level"]) / noise))


def llm_foundry_spikes(loss: Sequence[float], *, window: int = 100, outlier_multiplier: float = 2.0,
                       patience: int = 4) -> list[int]:
    """Indices where llm-foundry's ``KillLossSpike`` callback would fire (mosaicml/llm-foundry).

    Its defaults: window 100, outlier_multiplier 2, patience 4.

    Once ``window`` losses are held, a loss ≥ multiplier·mean(window) is an outlier; the rule fires
    when more than ``patience`` consecutive outliers occur (outliers still enter the window).
    """
    buf: deque[float] = deque(maxlen=window)
    fired, run = [], 0
    for i, v in enumerate(np.asarray(loss, dtype=np.float64)):
        if len(buf) == window and v >= outlier_multiplier * (sum(buf) / window):
            run += 1
            if run > patience:
                fired.append(i)
                run = 0
        else:
            run = 0
        buf.append(float(v))
    return fired


def megatron_spikes(loss: Sequence[float], *, num_samples: int = 100, threshold: float = 10.0) -> list[int]:
    """Indices Megatron-LM's rerun machine flags as "spiky loss": |ℓ| ≥ threshold·max|ℓ| of the first values.

    The first values are the first ``num_samples`` (megatron/core/rerun_state_machine.py, threshold 10 for a spiky
    loss); non-finite values are left to the divergence check.
    """
    x = np.asarray(loss, dtype=np.float64)
    if x.size <= num_samples:
        return []
    ref = np.nanmax(np.abs(x[:num_samples]))
    tail = np.abs(x[num_samples:])
    return (np.flatnonzero(np.isfinite(tail) & (tail >= threshold * ref)) + num_samples).tolist()
