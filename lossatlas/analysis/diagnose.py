"""Why did a run spike or diverge? Precursor ranking and a verdict with the literature's fixes.

For every loss spike (``lossatlas.analysis.spikes.detect_spikes``) and for a divergence (the first
non-finite logged value), each logged signal x (log-transformed when positive) is tested for a
change just before the spike start s that is unusual for its own history:

    z_ℓ = (x_{s−1} − x_{s−1−ℓ} − median Δ_ℓ) / (1.4826·MAD Δ_ℓ),  Δ_ℓ = {x_t − x_{t−ℓ}: t < s − P},

over lags ℓ ≤ P (``precursor_window``). The signal moved if max_ℓ |z_ℓ| > ``z_threshold``; its lead
time is the smallest lag reaching 90 % of that maximum (the change point). Precursors are ranked by
lead time, then |z|, and the earliest one of a known kind names the likely cause:

- ``attn_logit_max/<layer>``: attention-logit growth → qk-layernorm (Wortsman et al. 2023; Dehghani et al. 2023);
  per head, ``attn_max_logit/layer<i>/head<h>`` rising (the MaxLogit of Kimi K2's QK-Clip, Kimi Team 2025,
  arXiv 2507.20534) or ``attn_entropy/layer<i>/head<h>`` falling (entropy collapse, Zhai et al. 2023,
  "Stabilizing Transformer Training by Preventing Attention Entropy Collapse") names the same cause and the head;
- ``output_logz_mean`` / ``output_logit_max``: output-logit divergence → z-loss 1e-4·log²Z (PaLM, Chowdhery
  et al. 2022; Wortsman et al. 2023);
- ``grad_norm/<param>`` / ``act_max/<block>``: one layer's gradient explosion → gradient clipping,
  lower LR; embedding scaling / small sub-layer init (Takase et al., "Spike No More");
- the learning rate rose or warm-up ended just before → lower peak LR / longer warm-up;
- no precursor and a quick recovery: a data batch → restart ~100 steps earlier and skip ~200–500 batches (PaLM).

Figures belong to ``lossatlas.viz``: each spike carries the arrays to draw (``figure``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lossatlas.analysis.spikes import HEIGHT_SIGMAS, MAD_TO_SIGMA, Spike, detect_spikes
from lossatlas.errors import UserError
from lossatlas.finite import strict

CAUSES = ("attention_logit_growth", "output_logit_divergence", "layer_gradient_explosion", "gradient_norm_growth",
          "adam_second_moment", "opposing_signals", "lr_schedule", "data_batch", "unknown")

CITATIONS = {
    "wortsman": "Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training instabilities, arXiv 2309.14322",
    "dehghani": "Dehghani et al. 2023, Scaling Vision Transformers to 22 Billion Parameters, arXiv 2302.05442",
    "palm": "Chowdhery et al. 2022, PaLM: Scaling Language Modeling with Pathways, arXiv 2204.02311",
    "takase": "Takase et al., Spike No More: Stabilizing the Pre-training of Large Language Models, arXiv 2312.16903",
    "rosenfeld": "Rosenfeld & Risteski 2023, Outliers with Opposing Signals Have an Outsized Effect on Neural Network "
                 "Optimization, arXiv 2311.04163",
    "cohen": "Cohen et al. 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability, arXiv 2103.00065",
}

_ADVICE: dict[str, tuple[str, list[str], list[str]]] = {
    "attention_logit_growth": (
        "attention-logit growth{where}: the largest pre-softmax attention logit grew before the spike, "
        "driving attention towards one-hot",
        ["add qk-layernorm (LayerNorm on queries and keys before the dot product)",
         "or lower the learning rate"], ["wortsman", "dehghani"]),
    "output_logit_divergence": (
        "output-logit divergence: the output logits' log-partition log Z drifted before the spike",
        ["add the z-loss 1e-4·(log Z)² to the training loss", "or lower the learning rate"], ["palm", "wortsman"]),
    "layer_gradient_explosion": (
        "gradient explosion in {where}: its gradient norm grew before the spike",
        ["clip the global gradient norm (e.g. 1.0)", "lower the learning rate or lengthen warm-up",
         "if it is the embedding or an early layer: scale the embeddings by √d or LayerNorm them, and use a "
         "small init for sub-layers (\"Spike No More\")"], ["takase", "wortsman"]),
    "gradient_norm_growth": (
        "gradient-norm growth: the global gradient norm grew before the spike (no single layer stood out)",
        ["clip the global gradient norm (e.g. 1.0)", "lower the learning rate or lengthen warm-up",
         "scale the embeddings by √d or LayerNorm them (\"Spike No More\")"], ["takase", "wortsman"]),
    "adam_second_moment": (
        "Adam's second-moment estimate moved before the spike (stale or ε-dominated updates)",
        ["lower the learning rate", "lower AdamW ε (e.g. 1e-15) if ε is comparable to the gradient RMS",
         "or lower β₂"], ["wortsman"]),
    "opposing_signals": (
        "data-group losses moved before the spike (groups with opposing signals{where})",
        ["inspect the groups' losses for anti-correlated oscillation", "lower the learning rate"], ["rosenfeld"]),
    "lr_schedule": (
        "the learning-rate schedule: {where} just before the spike",
        ["lower the peak learning rate", "or lengthen the warm-up"], ["wortsman", "cohen"]),
    "data_batch": (
        "a data batch: the loss spiked with no logged precursor and recovered within {where} steps",
        ["if it recurs: restart from a checkpoint ~100 steps before the spike and skip ~200-500 batches"], ["palm"]),
    "unknown": (
        "no logged signal moved before the spike{where}",
        ["log more telemetry (lossatlas.telemetry.InstabilityMonitor: attention logits, log Z, activations, Adam)",
         "or lower the learning rate"], []),
}
# which signals can name a cause, by prefix (exact names end without '/')
_KINDS = (("attn_logit_max/", "attention_logit_growth"), ("attn_max_logit/", "attention_logit_growth"),
          ("attn_entropy/", "attention_logit_growth"), ("output_logz_mean", "output_logit_divergence"),
          ("output_logit_max", "output_logit_divergence"), ("grad_norm/", "layer_gradient_explosion"),
          ("act_max/", "layer_gradient_explosion"), ("grad_norm", "gradient_norm_growth"),
          ("adam_", "adam_second_moment"), ("group_loss/", "opposing_signals"))
_NOT_SIGNALS = ("loss", "lr")
SIGMA_FLOOR = 0.005  # a precursor must move by more than z·0.5 % of its level (log units)


def signal_cause(name: str) -> str | None:
    """The cause a moving signal points to, or None (weight norms, update ratios, unknown names)."""
    for prefix, cause in _KINDS:
        if name == prefix or (prefix.endswith(("/", "_")) and name.startswith(prefix)):
            return cause
    return None


def signal_layer(name: str) -> str | None:
    """``grad_norm/blocks.0.attn.q_proj.weight`` -> ``blocks.0.attn.q_proj``; ``attn_logit_max/blocks.0`` -> ``blocks.0``."""
    if "/" not in name:
        return None
    tail = name.split("/", 1)[1]
    for suffix in (".weight", ".bias"):
        if name.startswith(("grad_norm/", "weight_norm/", "update_ratio/")) and tail.endswith(suffix):
            return tail[: -len(suffix)]
    return tail


@dataclass(frozen=True)
class Precursor:
    """A logged signal that moved before a spike: lead in steps, robust z of its change, direction."""

    signal: str
    lead_steps: int
    onset_step: int
    zscore: float
    direction: str
    cause: str | None
    layer: str | None


@dataclass
class SpikeDiagnosis:
    """One spike (or the divergence) with its precursors, verdict, fixes and figure data."""

    spike: dict
    precursors: list[Precursor]
    cause: str
    verdict: str
    mitigations: list[str]
    citations: list[str]
    lr_event: dict | None = None
    first_nonfinite: dict | None = None
    checkpoints: dict[str, int | None] = field(default_factory=dict)
    curvature: dict[str, float | None] = field(default_factory=dict)
    figure: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)


@dataclass
class Diagnosis:
    """What happened in a run: its spikes and divergence, each diagnosed (JSON-able via ``to_dict``)."""

    run: str
    n_steps: int
    first_step: int | None
    last_step: int | None
    diverged: bool
    spikes: list[SpikeDiagnosis]
    settings: dict
    summary: str

    def to_dict(self) -> dict:
        """A strict-JSON dict: NaN and ±inf become None.

        ``"nonfinite"`` maps the JSON Pointer of each to "nan", "inf" or "-inf" (``lossatlas.finite.strict``).
        """
        clean, found = strict(asdict(self))
        clean["nonfinite"] = found
        return clean


# -- the computation ----------------------------------------------------------------------------------
def _transform(x: np.ndarray) -> np.ndarray:
    fin = x[np.isfinite(x)]
    if fin.size and np.all(fin > 0):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)
    return x.copy()


def _lags(max_lag: int) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, max_lag, num=min(max_lag, 30))).astype(int)) if max_lag >= 1 else np.empty(0, int)


def find_precursors(steps: np.ndarray, signals: Mapping[str, np.ndarray], start: int, *,
                    precursor_window: int = 100, z_threshold: float = 5.0, min_history: int = 20) -> list[Precursor]:
    """Signals whose change over the ℓ ≤ P log rows before row ``start`` is unusual for their history.

    See the module docstring for z_ℓ and the lead time. Rows, not steps, are the unit of lag;
    lead times are reported in steps.
    """
    P = min(precursor_window, start - 1 - min_history)
    if P < 1:
        return []
    hist_end = start - P  # changes x_t - x_{t-ℓ} with t < hist_end form the history
    lags = _lags(P)
    out = []
    for name, raw in signals.items():
        x = _transform(np.asarray(raw, dtype=np.float64))
        now = x[start - 1]
        if not np.isfinite(now):
            continue
        z = np.full(lags.shape, np.nan)
        for j, lag in enumerate(lags):
            past = x[start - 1 - lag]
            if not np.isfinite(past) or hist_end - lag < min_history:
                continue
            d = x[lag:hist_end] - x[: hist_end - lag]
            d = d[np.isfinite(d)]
            if d.size < min_history:
                continue
            med = np.median(d)
            sig = max(MAD_TO_SIGMA * float(np.median(np.abs(d - med))), SIGMA_FLOOR)
            z[j] = (now - past - med) / sig
        if not np.isfinite(z).any():
            continue
        a = np.where(np.isfinite(z), np.abs(z), -1.0)
        best = float(a.max())
        if best <= z_threshold:
            continue
        j = int(np.flatnonzero(a >= 0.9 * best)[0])  # the change point: smallest lag with ~all the evidence
        onset_row = start - 1 - int(lags[j])
        jb = int(np.argmax(a))
        out.append(Precursor(signal=name, lead_steps=int(steps[start] - steps[onset_row]), onset_step=int(steps[onset_row]),
                             zscore=float(z[jb]), direction="up" if z[jb] > 0 else "down",
                             cause=signal_cause(name), layer=signal_layer(name)))
    seen = {p.signal: i for i, p in enumerate(out)}
    for name, raw in signals.items():  # slow, sustained growth that began before the window
        grown = _sustained_growth(steps, name, np.asarray(raw, dtype=np.float64), start, min_history)
        if grown is not None and (name not in seen or grown.lead_steps > out[seen[name]].lead_steps):
            if name in seen:
                out[seen[name]] = grown
            else:
                out.append(grown)
    out.sort(key=lambda p: (-p.lead_steps, -abs(p.zscore), p.signal))
    return out


GROWTH_SIGNALS = ("attn_logit_max/", "attn_max_logit/", "output_logit_max")
FALLING_SIGNALS = ("attn_entropy/",)  # blamed when they fall: attention-entropy collapse (Zhai et al. 2023)
GROWTH_FACTOR = 10.0  # a logit scale that grew tenfold over its early level is an instability (Wortsman et al. 2023)
GROWTH_FLOOR = 10.0  # ... once it is large in absolute terms: a logit gap of 10 makes softmax nearly one-hot


def _sustained_growth(steps: np.ndarray, name: str, raw: np.ndarray, start: int, min_history: int) -> Precursor | None:
    """Attention/output logits that grew ≥ GROWTH_FACTOR× over their early level (and past GROWTH_FLOOR).

    A steady exponential climb (the attention-logit growth of Wortsman et al. 2023) has unremarkable
    step-to-step changes, so the change-based z-score misses it; its level does not. The onset is the
    first row above 3× the early level (median of the first ``min_history`` logged rows).
    """
    if not name.startswith(GROWTH_SIGNALS):
        return None
    x = np.abs(raw[:start])
    fin = np.flatnonzero(np.isfinite(x))
    if fin.size < 2 * min_history:
        return None
    early = float(np.median(x[fin[:min_history]]))
    now = float(np.median(x[fin[-5:]]))
    if not early > 0 or now < max(GROWTH_FACTOR * early, GROWTH_FLOOR):
        return None
    above = np.flatnonzero(np.isfinite(x) & (x > 3 * early))
    onset = int(above[0])
    spread = float(np.std(np.log(x[fin[:min_history]] + 1e-30)))
    z = float(np.log(now / early) / max(spread, SIGMA_FLOOR))
    return Precursor(signal=name, lead_steps=int(steps[start] - steps[onset]), onset_step=int(steps[onset]), zscore=z,
                     direction="up", cause=signal_cause(name), layer=signal_layer(name))


def lr_event(steps: np.ndarray, lr: np.ndarray | None, start: int, *, window: int = 50, rise: float = 0.05,
             min_warmup: int = 5) -> dict | None:
    """The learning rate rose by more than ``rise`` or a warm-up ended within ``window`` steps before row ``start``."""
    if lr is None:
        return None
    lr = np.asarray(lr, dtype=np.float64)
    lo = int(np.searchsorted(steps, steps[start] - window))
    seg = lr[lo:start + 1]
    seg = seg[np.isfinite(seg)]
    if seg.size < 2:
        return None
    increasing = np.flatnonzero(np.diff(lr[: start + 1]) > 0)  # row i+1 higher than row i
    if increasing.size:
        end = int(increasing[-1]) + 1  # last row where lr rose
        rising = set(increasing.tolist())
        run = 1
        while run < end and (end - run - 1) in rising:
            run += 1
        flat_after = end == start or np.allclose(lr[end:start + 1], lr[end])
        if run >= min_warmup and lo <= end and flat_after and end < start:
            return {"kind": "warmup_end", "step": int(steps[end]), "lr": float(lr[end]),
                    "text": f"the warm-up ended at step {int(steps[end])} (lr {lr[end]:.3g})",
                    "lead_steps": int(steps[start] - steps[end])}
    if lr[start] > (1 + rise) * float(np.min(seg)):
        first = lo + int(np.argmin(lr[lo:start + 1]))
        return {"kind": "lr_rise", "step": int(steps[first]), "lr": float(lr[start]),
                "text": f"the learning rate rose from {lr[first]:.3g} at step {int(steps[first])} to {lr[start]:.3g}",
                "lead_steps": int(steps[start] - steps[first])}
    return None


def _first_nonfinite(steps: np.ndarray, cols: Mapping[str, np.ndarray], upto: int) -> dict | None:
    """The first row ≤ ``upto`` with a NaN/inf value, the signals non-finite there, and the primary one."""
    first = None
    for name, x in cols.items():
        bad = np.flatnonzero(~np.isfinite(x[: upto + 1]) & _logged(x, upto, name == "loss"))
        if bad.size and (first is None or bad[0] < first):
            first = int(bad[0])
    if first is None:
        return None
    names = sorted(n for n, x in cols.items() if not np.isfinite(x[first]) and _logged(x, upto, n == "loss")[first])
    rank = {"layer_gradient_explosion": 0, "attention_logit_growth": 1, "output_logit_divergence": 2}
    primary = min(names, key=lambda n: (rank.get(signal_cause(n) or "", 3), n == "loss", n))
    return {"step": int(steps[first]), "row": first, "signal": primary, "layer": signal_layer(primary),
            "value": float(cols[primary][first]), "signals": names}


def _logged(x: np.ndarray, upto: int, always: bool = False) -> np.ndarray:
    """Rows where a column was logged: NaN before its first number (finite or ±inf) means 'not logged yet'.

    With ``always`` (the loss, which the log holds only because it was logged) a column that is NaN
    throughout counts as logged from the first row: every loss it recorded was NaN.
    """
    fin = np.flatnonzero(~np.isnan(x[: upto + 1]))
    mask = np.zeros(upto + 1, dtype=bool)
    if fin.size:
        mask[fin[0]:] = True
    elif always:
        mask[:] = True
    return mask


def _verdict(spike: Spike, precursors: list[Precursor], lr_ev: dict | None, quick: int) -> tuple[str, str, list[str], list[str]]:
    # every named cause is a growth (attention logits, output logits, gradient norms); a signal that
    # fell before the spike is reported as a precursor but never blamed (opposing signals: either way)
    causal = [p for p in precursors if p.cause is not None and (
        (p.direction == "down") == p.signal.startswith(FALLING_SIGNALS) or p.cause == "opposing_signals")]
    if causal and causal[0].cause == "gradient_norm_growth":  # prefer a named layer if one moved too
        layer = [p for p in causal if p.cause == "layer_gradient_explosion"]
        if layer:
            causal.remove(layer[0])
            causal.insert(0, layer[0])
    if lr_ev is not None and (not causal or lr_ev["lead_steps"] >= causal[0].lead_steps):
        cause, where = "lr_schedule", lr_ev["text"]
    elif causal:
        top = causal[0]
        cause = top.cause
        if cause == "layer_gradient_explosion":
            where = f"layer {top.layer}"
        elif cause == "attention_logit_growth":
            where = f" in {top.layer}" if top.layer else ""
        elif cause == "opposing_signals":
            where = f": {top.layer}"
            # two groups that moved in opposite directions are the paper's pair (Rosenfeld & Risteski 2023)
            other = [p for p in causal if p.cause == cause and p.direction != top.direction]
            if other:
                where += f" {'rose' if top.direction == 'up' else 'fell'} while {other[0].layer} " + (
                    "fell" if top.direction == "up" else "rose")
        else:
            where = ""
    elif spike.kind == "spike" and spike.recovery is not None and spike.recovery - spike.start <= quick:
        cause, where = "data_batch", str(spike.recovery - spike.start)
    else:
        cause, where = "unknown", ""
    text, fixes, cites = _ADVICE[cause]
    verdict = text.format(where=where)
    if causal and cause != causal[0].cause:
        verdict += f"; first logged precursor: {causal[0].signal} ({causal[0].lead_steps} steps before)"
    elif len(causal) > 1:
        later = [p.signal for p in causal[1:4]]
        verdict += f"; followed by {', '.join(later)}"
    return cause, verdict, list(fixes), [CITATIONS[c] for c in cites]


def _figure(steps: np.ndarray, loss: np.ndarray, signals: Mapping[str, np.ndarray], lo: int, hi: int,
            precursors: list[Precursor], top: int) -> dict:
    sel = slice(lo, hi)
    return {"steps": steps[sel].tolist(), "loss": loss[sel].tolist(),
            "signals": {p.signal: np.asarray(signals[p.signal], dtype=np.float64)[sel].tolist() for p in precursors[:top]}}


def diagnose_log(log: Mapping[str, Any], *, run: str = "", checkpoint_steps: Sequence[int] = (),
                 sensitivity: float = 6.0, window: int = 100, precursor_window: int = 100, z_threshold: float = 5.0,
                 quick_recovery: int = 10, top: int = 5, height_sigmas: float = HEIGHT_SIGMAS,
                 curvature_fn: Callable[[int], float | None] | None = None) -> Diagnosis:
    """``diagnose`` on an in-memory log ``{"step": (N,), "loss": (N,), name: (N,), ...}``.

    A spike needs a robust z-score above ``sensitivity`` over the local trend and a rise above the current
    level of more than ``height_sigmas`` times the local noise σ_n = std(Δ log ℓ)/√2 (both default 6;
    ``lossatlas.analysis.spikes.detect_spikes``), so ordinary heavy-tailed mini-batch noise is not flagged
    (benchmarks/bench_diagnose.py measures the false-positive and detection rates).
    """
    if "step" not in log or "loss" not in log:
        raise ValueError("the log needs 'step' and 'loss' columns; record the loss with Recorder.step(step, loss=...)")
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, float)) or not 0 < sensitivity < math.inf:
        raise ValueError(f"sensitivity must be a positive finite number of robust standard deviations, got {sensitivity!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 5:
        raise ValueError(f"window must be an integer ≥ 5 (steps of history), got {window!r}")
    steps = np.asarray(log["step"], dtype=np.int64)
    order = np.argsort(steps, kind="stable")
    keep = np.ones(steps.size, dtype=bool)  # the last row of a repeated step wins (a resumed run)
    s_sorted = steps[order]
    keep[:-1] = s_sorted[:-1] != s_sorted[1:]
    idx = order[keep]
    steps = steps[idx]
    cols = {k: np.asarray(v, dtype=np.float64)[idx] for k, v in log.items() if k != "step"}
    loss = cols["loss"]
    settings = {"sensitivity": sensitivity, "height_sigmas": height_sigmas, "window": window,
                "precursor_window": precursor_window,
                "z_threshold": z_threshold, "quick_recovery": quick_recovery}
    n = steps.size
    logged = np.flatnonzero(np.isfinite(loss))
    if logged.size:  # rows before the first logged loss carry other signals only
        first_row = int(logged[0])
    else:
        first_row = 0
    signals = {k: v for k, v in cols.items() if k not in _NOT_SIGNALS}
    nonfinite = _first_nonfinite(steps, cols, n - 1) if n else None
    curve_end = n if nonfinite is None else nonfinite["row"]
    spikes = detect_spikes(steps[first_row:curve_end], loss[first_row:curve_end], sensitivity=sensitivity,
                           window=window, height_sigmas=height_sigmas) if curve_end - first_row > 0 else []
    spikes = [sp for sp in spikes if sp.kind == "spike"]
    if nonfinite is not None:
        r = nonfinite["row"]
        spikes.append(Spike(kind="divergence", start=int(steps[r]), peak=int(steps[r]), end=int(steps[r]), recovery=None,
                            baseline=math.nan, peak_loss=float(loss[r]), height_ratio=math.inf, height_abs=math.inf,
                            zscore=math.inf, noise_sigma=math.nan, height_sigmas=math.inf))
    ck = sorted(int(c) for c in checkpoint_steps)
    row_of = {int(s): i for i, s in enumerate(steps)}
    out = []
    for sp in spikes:
        r = row_of[sp.start]
        pre = find_precursors(steps, signals, r, precursor_window=precursor_window, z_threshold=z_threshold)
        ev = lr_event(steps, cols.get("lr"), r, window=min(precursor_window, 50))
        cause, verdict, fixes, cites = _verdict(sp, pre, ev, quick_recovery)
        first_bad = nonfinite if sp.kind == "divergence" else None
        if first_bad is not None:
            where = f" (layer {first_bad['layer']})" if first_bad["layer"] else ""
            verdict = (f"diverged at step {first_bad['step']}: first non-finite signal {first_bad['signal']}{where}; "
                       f"likely cause: {verdict}")
        after_step = sp.recovery if sp.recovery is not None else sp.peak
        before = max((c for c in ck if c <= sp.start), default=None)
        after = min((c for c in ck if c >= after_step), default=None) if sp.kind == "spike" else None
        checkpoints = {"before": before, "after": after}
        curvature = {}
        if curvature_fn is not None:
            for label, c in checkpoints.items():
                curvature[label] = None if c is None else curvature_fn(c)
        hi_row = row_of.get(sp.recovery, r) if sp.recovery is not None else row_of[sp.peak]
        lo = max(0, r - precursor_window - 10)
        hi = min(n, max(hi_row, r) + 20)
        out.append(SpikeDiagnosis(spike=asdict(sp), precursors=pre[: max(top, 1) * 4], cause=cause, verdict=verdict,
                                  mitigations=fixes, citations=cites, lr_event=ev, first_nonfinite=first_bad,
                                  checkpoints=checkpoints, curvature=curvature,
                                  figure=_figure(steps, loss, signals, lo, hi, pre, top)))
    n_sp = sum(1 for sp in spikes if sp.kind == "spike")
    if not spikes:
        summary = (f"no loss spikes detected in {n} logged steps (sensitivity {sensitivity} robust σ, window {window})"
                   if n else "the run has no logged steps yet")
    else:
        parts = [f"{n_sp} loss spike{'s' if n_sp != 1 else ''}"] if n_sp else []
        if nonfinite is not None:
            parts.append(f"diverged at step {nonfinite['step']} ({nonfinite['signal']} non-finite first)")
        causes = sorted({d.cause for d in out})
        summary = f"{' and '.join(parts)}; likely cause{'s' if len(causes) > 1 else ''}: {', '.join(causes)}"
    return Diagnosis(run=run, n_steps=int(n), first_step=int(steps[0]) if n else None,
                     last_step=int(steps[-1]) if n else None, diverged=nonfinite is not None, spikes=out,
                     settings=settings, summary=summary)


def diagnose(run_path: Any, **kwargs: Any) -> Diagnosis:
    """Diagnose a run file's loss spikes and divergence from its per-step log.

    Args:
        run_path: a run file path or a ``lossatlas.store.RunReader``.
        **kwargs: ``sensitivity``, ``window`` (spike detector), ``precursor_window``,
            ``z_threshold``, ``quick_recovery`` (steps within which a precursor-less spike counts as a
            data batch), ``top`` (signals per figure), ``curvature_fn(step) -> λ_max | None`` called
            for the checkpoints just before and after each spike.
    """
    from lossatlas import store  # the one file-reading dependency; analysis may use store

    reader = run_path if isinstance(run_path, store.RunReader) else store.RunReader(run_path)
    log = reader.log()
    if "loss" not in log:
        raise UserError(f"{reader.path} has no loss log; import it with --log FILE (CSV/JSONL with step,loss) or "
                        "record training with the Recorder (Recorder.step(step, loss=...))")
    d = diagnose_log(log, run=str(reader.path), checkpoint_steps=reader.steps(), **kwargs)
    _add_conditions(d, reader)  # Spike No More: embedding / sub-layer std at the checkpoint before each spike
    return d


EMB_STD_MIN = 0.5  # std(x₀) below this is "far from 1" (Takase et al. 2023 want std(x₀) ≈ 1)
SUBLAYER_STD_FACTOR = 2.0  # sub-layer weights "not small": std > 2·√(2/(5d))


def _is_embedding(name: str) -> bool:
    low = name.lower()
    return low.endswith(".weight") and ("emb" in low or "wte" in low) and "pos" not in low and "wpe" not in low \
        and not low.rsplit(".", 2)[-2].endswith(("_ln", "ln", "norm"))


def spike_no_more_condition(state: Mapping[str, Any], model_kwargs: Mapping[str, Any] | None = None) -> dict | None:
    """Takase et al.'s stability conditions read from one checkpoint's state_dict, or None without an embedding.

    Takase, Kiyono, Kobayashi, Suzuki 2023 ("Spike No More: Stabilizing the Pre-training of Large Language
    Models", arXiv 2312.16903): pre-LN Transformer pre-training avoids spikes when the embeddings entering
    the first block have std(x₀) ≈ 1 and the sub-layer weights are small. Reads

    - ``embedding_std``: s·std(E) of the token-embedding matrix E (the first 2-D tensor named ``*emb*``/``wte``,
      not a position embedding), s = √n_embd when ``model_kwargs`` says ``scaled_embed`` (else 1); an embedding
      LayerNorm (a state key ``emb_ln.weight`` or ``emb_layernorm`` in the kwargs) makes std(x₀) ≈ 1 by itself;
    - ``sublayer_std``: √(mean of the per-matrix variances) of the 2-D weights of the blocks (names with
      ``blocks.``/``layers.``/``h.``), against ``small_std`` = √(2/(5d)), d the embedding width.

    ``violated`` lists "embedding_std" when std(x₀) < ``EMB_STD_MIN`` (0.5) and no embedding LayerNorm, and
    "sublayer_std" when ``sublayer_std`` > ``SUBLAYER_STD_FACTOR``·small_std (2×); ``text`` says it in words.
    """
    kw = dict(model_kwargs or {})
    emb_name = next((k for k, v in state.items() if _is_embedding(k) and getattr(v, "ndim", 0) == 2), None)
    if emb_name is None:
        return None
    emb = np.asarray(state[emb_name].detach().double().cpu() if hasattr(state[emb_name], "detach") else state[emb_name],
                     dtype=np.float64)
    d = emb.shape[1]
    scale = math.sqrt(d) if kw.get("scaled_embed") else 1.0  # Scaled Embed multiplies by √d
    emb_ln = bool(kw.get("emb_layernorm")) or any(k.startswith("emb_ln.") for k in state)
    emb_std = float(emb.std()) * scale
    variances = [float(np.asarray(v.detach().double().cpu() if hasattr(v, "detach") else v).var())
                 for k, v in state.items() if getattr(v, "ndim", 0) == 2 and k.endswith(".weight")
                 and any(t in f".{k}" for t in (".blocks.", ".layers.", ".h."))]
    sub_std = math.sqrt(float(np.mean(variances))) if variances else None
    small = math.sqrt(2.0 / (5.0 * d))
    violated = []
    if emb_std < EMB_STD_MIN and not emb_ln:
        violated.append("embedding_std")
    if sub_std is not None and sub_std > SUBLAYER_STD_FACTOR * small:
        violated.append("sublayer_std")
    parts = []
    if "embedding_std" in violated:
        parts.append(f"embedding std {emb_std:.3g} ≪ 1 ({emb_name}; scale the embeddings by √d or add an embedding "
                     "LayerNorm)")
    if "sublayer_std" in violated:
        parts.append(f"sub-layer weight std {sub_std:.3g} > {SUBLAYER_STD_FACTOR:g}·√(2/(5d)) = "
                     f"{SUBLAYER_STD_FACTOR * small:.3g} (use a small init)")
    text = ("\"Spike No More\" condition violated: " + "; ".join(parts)) if parts else ""
    return {"embedding": emb_name, "embedding_std": emb_std, "embedding_layernorm": emb_ln, "sublayer_std": sub_std,
            "small_std": small, "violated": violated, "text": text}


def _add_conditions(d: Diagnosis, reader: Any) -> None:
    """Attach ``spike_no_more_condition`` at the checkpoint before each spike; name it when it is violated."""
    spec = reader.model_spec if isinstance(getattr(reader, "model_spec", None), dict) else {}
    kwargs = spec.get("kwargs") if isinstance(spec.get("kwargs"), dict) else {}
    for sd in d.spikes:
        step = sd.checkpoints.get("before")
        if step is None:
            continue
        try:
            state = reader.checkpoint(step).state_dict()
        except (KeyError, ValueError, OSError):  # a checkpoint the file cannot give back: no condition check
            continue
        cond = spike_no_more_condition(state, kwargs)
        if cond is None:
            continue
        sd.conditions = {"spike_no_more": {**cond, "step": step}}
        if cond["violated"] and sd.cause in ("gradient_norm_growth", "layer_gradient_explosion", "unknown",
                                             "data_batch", "attention_logit_growth"):
            sd.verdict = f"{sd.verdict}; {cond['text']}"
            fix = "scale the embeddings by √d (std ≈ 1) or LayerNorm them, and use a small sub-layer init"
            if fix not in sd.mitigations:
                sd.mitigations.append(fix)
            if CITATIONS["takase"] not in sd.citations:
                sd.citations.append(CITATIONS["takase"])


def render_text(d: Diagnosis) -> str:
    """A plain-language report of a ``Diagnosis``."""
    lines = [f"{d.run or 'run'}: {d.summary}"]
    if d.n_steps:
        lines[0] += f" (steps {d.first_step}-{d.last_step})"
    for i, sd in enumerate(d.spikes, 1):
        sp = sd.spike
        if sp["kind"] == "divergence":
            lines.append(f"\n[{i}] divergence at step {sp['start']}")
        else:
            rec = f"recovered at step {sp['recovery']}" if sp["recovery"] is not None else "did not recover"
            lines.append(f"\n[{i}] spike at step {sp['start']} (peak {sp['peak']}: loss {sp['peak_loss']:.4g}, "
                         f"×{sp['height_ratio']:.3g} the baseline {sp['baseline']:.4g}); {rec}")
        lines.append(f"    verdict: {sd.verdict}")
        for fix in sd.mitigations:
            lines.append(f"    fix: {fix}")
        if sd.precursors:
            lines.append("    moved before it (lead, robust z):")
            for p in sd.precursors[:6]:
                lines.append(f"      {p.signal:<48} {p.lead_steps:>5} steps  z={p.zscore:+.1f} ({p.direction})")
        else:
            lines.append("    no logged signal moved before it")
        ck = sd.checkpoints
        if ck.get("before") is not None or ck.get("after") is not None:
            lam = "".join(f", λ_max {sd.curvature[k]:.4g}" if sd.curvature.get(k) is not None else ""
                          for k in ("before",))
            lines.append(f"    checkpoints: before {ck.get('before')}, after {ck.get('after')}{lam}")
        for c in sd.citations:
            lines.append(f"    see: {c}")
    return "\n".join(lines)


def diagnose_command(run_path: str | Path, *, as_json: bool = False, **kwargs: Any) -> tuple[str, dict]:
    """What ``lossatlas diagnose RUN.h5 [--json]`` prints, and the JSON-able dict."""
    d = diagnose(run_path, **kwargs)
    data = d.to_dict()
    text = json.dumps(data, indent=2, allow_nan=False) if as_json else render_text(d)
    return text, data


def checkpoint_sharpness(run_path: str | Path, *, max_examples: int = 1024, batch_size: int = 256,
                         trust_factory: bool = False, model: dict | str | None = None,
                         data: dict | str | None = None) -> Callable[[int], float | None]:
    """``step ↦ λ_max`` of the loss at a stored checkpoint, for ``curvature_fn``.

    λ_max is the ``hessian`` probe at ``top_k=1`` (its defaults otherwise: Lanczos to a relative Ritz
    residual of 1e-4) on the first ``max_examples`` examples in batches of ``batch_size``, run by
    ``lossatlas.analysis.runner.run_probe``: it is stored in the run's results file and reused there,
    also by a later ``lossatlas hessian RUN --top-k 1`` with the same data settings.

    Returns None for a checkpoint holding NaN/inf or when the run has no data spec. ``model`` and
    ``data`` replace the run's specs; a factory the run's specs name is imported only when this user
    signed the file or ``trust_factory`` is set, and a refusal comes here, before any spike is looked at.
    """
    from lossatlas import store, trust
    from lossatlas.analysis.runner import RunOptions, checkpoint_state, run_probe
    from lossatlas.finite import nonfinite_counts
    from lossatlas.probes.hessian import HessianProbe

    with store.RunReader(run_path) as reader:
        for spec in (model if model is not None else reader.model_spec, data if data is not None else reader.data_spec):
            trust.require_trusted(spec, trust_factory=trust_factory, hint=" (or skip curvature with --no-curvature)")
    probe = HessianProbe(top_k=1)
    options = dict(data=data, model=model, trust_factory=trust_factory, batch_size=batch_size,
                   max_examples=max_examples)
    cache: dict[int, float | None] = {}

    def sharpness(step: int) -> float | None:
        if step in cache:
            return cache[step]
        with store.RunReader(run_path) as reader:
            if (data if data is not None else reader.data_spec) is None or step not in reader.steps():
                return None
            # a diverged checkpoint has no λ_max
            finite = not nonfinite_counts(checkpoint_state(reader, step, allow_nonfinite=True))
        if not finite:
            cache[step] = None
            return None
        report = run_probe(run_path, probe, RunOptions(steps=[step], **options))
        cache[step] = float(report.results[0].values["top_eigenvalues"][0])
        return cache[step]

    return sharpness
