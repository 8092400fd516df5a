"""The report's opening: the run at a glance and its findings, read from the run file and its stored results.

No torch: everything here comes from file metadata, the per-step log and stored Results.

Findings, each a sentence with its numbers:

- the training loss, first to last logged step, and the evaluated loss/accuracy of the last checkpoint;
- loss spikes with their causes (``lossatlas.analysis.diagnose``), or that there were none;
- the edge of stability: per checkpoint the sharpness λ_max against the threshold of the run's optimizer (the
  ``stability_threshold`` the Hessian probe stores: 2/η for gradient descent, 2(1+β)/η for heavy-ball momentum, ...).
  It is *reached* when λ_max ≥ 0.9·threshold (the band of Cohen, Kaur, Li, Kolter, Talwalkar 2021, "Gradient
  Descent on Neural Networks Typically Occurs at the Edge of Stability"), and the largest stable step
  ``max_stable_lr`` is compared with the step used;
- the collapse phase (Papyan, Han, Donoho 2020, "Prevalence of neural collapse during the terminal phase of deep
  learning training"): whether the terminal phase (100 % training accuracy) is reached and how far NC1 fell;
- the sharpest layer: the block with the largest top eigenvalue of its Hessian block (``hessian --blocks layers``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from lossatlas.viz.report import Finding, Summary

EOS_BAND = 0.9  # λ_max / threshold at or above this: at the edge of stability (Cohen et al. 2021's band)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _count(n: int) -> str:
    """A parameter count in words: 26,122 · 1.2 M · 3.4 B."""
    if n >= 10**9:
        return f"{n / 1e9:.3g} B"
    if n >= 10**6:
        return f"{n / 1e6:.3g} M"
    return f"{n:,}"


def _spec(spec: Any) -> str:
    """A model or data spec in words: its name and its non-default keyword arguments."""
    if isinstance(spec, Mapping):
        name = str(spec.get("name") or spec.get("factory") or "custom")
        kwargs = spec.get("kwargs") or {}
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        return f"{name}({args})" if args else name
    return str(spec) if spec is not None else "unknown"


def _optimizer(opt: Any) -> str:
    if not isinstance(opt, Mapping):
        return "unknown"
    d = opt.get("defaults") or {}
    parts = [f"{k}={d[k]}" for k in ("lr", "momentum", "betas", "weight_decay") if d.get(k) not in (None, 0, 0.0)]
    return f"{opt.get('name', '?')}({', '.join(parts)})"


def glance(reader: Any) -> dict[str, str]:
    """The run at a glance: model, data, parameter count, steps, optimizer, loss (label → text)."""
    steps = reader.steps()
    shapes = reader.parameter_shapes()
    n_params = sum(math.prod(s) for s in shapes.values())
    log_steps = reader.log([])["step"] if reader.truncated is None else np.array([])
    out = {
        "model": _spec(reader.model_spec),
        "data": _spec(reader.data_spec),
        "parameters": f"{_count(n_params)} in {len(shapes)} tensors" if shapes else "no checkpoint yet",
        "steps": (f"{int(log_steps[-1])} logged" if len(log_steps) else "no per-step log")
                 + (f" · {len(steps)} checkpoints ({steps[0]}…{steps[-1]})" if steps else " · no checkpoints"),
        "optimizer": _optimizer(reader.optimizer),
        "loss": str(reader.loss or "unknown"),
    }
    return out


def _loss_finding(log: Mapping[str, np.ndarray], loss_results: Sequence[Any]) -> Finding | None:
    parts = []
    if "loss" in log:
        v = np.asarray(log["loss"], dtype=np.float64)
        s = np.asarray(log["step"])
        ok = np.isfinite(v)
        if ok.sum() >= 2:
            parts.append(f"training loss {_fmt(v[ok][0])} (step {int(s[ok][0])}) → {_fmt(v[ok][-1])} "
                         f"(step {int(s[ok][-1])})")
    if loss_results:
        last = loss_results[-1]
        ev = [f"loss {_fmt(float(last.values['loss']))}"] if "loss" in last.values else []
        if "accuracy" in last.values:
            ev.append(f"accuracy {100 * float(last.values['accuracy']):.1f} %")
        if ev:
            parts.append(f"evaluated at step {last.step}: {', '.join(ev)}")
    return Finding("Loss", "; ".join(parts) + ".", "info") if parts else None


def spike_finding(diagnosis: Mapping[str, Any] | None) -> Finding | None:
    """Spikes and divergence in words (from ``Diagnosis.to_dict()``), None without a per-step log."""
    if diagnosis is None:
        return None
    spikes = diagnosis.get("spikes") or []
    n = diagnosis.get("n_steps") or 0
    if not spikes:
        return Finding("Spikes", f"none in {n} logged steps.", "ok")
    described = []
    for e in spikes[:3]:
        s = e.get("spike", {})
        cause = str(e.get("cause") or "cause unknown").replace("_", " ")
        described.append(f"step {s.get('peak')} ({cause})")
    more = f" and {len(spikes) - 3} more" if len(spikes) > 3 else ""
    div = "; the run diverged" if diagnosis.get("diverged") else ""
    word = "spike" if len(spikes) == 1 else "spikes"
    return Finding("Spikes", f"{len(spikes)} loss {word}: {', '.join(described)}{more}{div}.", "warn")


def _lambda_max(r: Any) -> float | None:
    v = r.meta.get("lambda_max")
    if v is None and "top_eigenvalues" in r.values and np.asarray(r.values["top_eigenvalues"]).size:
        v = float(np.nanmax(np.asarray(r.values["top_eigenvalues"], dtype=np.float64)))
    return float(v) if v is not None and np.isfinite(v) else None


def stability_rows(hessian: Sequence[Any]) -> list[dict[str, Any]]:
    """Per checkpoint with a λ_max: step, λ_max, the stability threshold, their ratio, max stable step, η, rule."""
    rows = []
    for r in hessian:
        lam = _lambda_max(r)
        if lam is None:
            continue
        thr = r.meta.get("stability_threshold")
        rows.append({"step": r.step, "lambda_max": lam, "threshold": thr,
                     "ratio": lam / thr if thr else None, "max_stable_lr": r.meta.get("max_stable_lr"),
                     "lr": r.meta.get("lr"), "rule": r.meta.get("stability_rule")})
    return rows


def eos_finding(rows: Sequence[Mapping[str, Any]]) -> Finding | None:
    """Whether λ_max reached the stability threshold of the run's optimizer (ratio ≥ EOS_BAND), in words."""
    rated = [r for r in rows if r["ratio"] is not None]
    if not rated:
        if rows and rows[-1].get("rule"):
            return Finding("Edge of stability", f"not assessed: {rows[-1]['rule']}.", "info")
        return None
    peak = max(rated, key=lambda r: r["ratio"])
    rule = f" Rule: {peak['rule']}." if peak.get("rule") else ""
    reached = [r for r in rated if r["ratio"] >= EOS_BAND]
    if reached:
        first = reached[0]
        return Finding("Edge of stability", f"reached at step {first['step']}: λ_max {_fmt(first['lambda_max'])} "
                       f"vs the threshold {_fmt(first['threshold'])}; peak ratio {peak['ratio']:.2f} at step "
                       f"{peak['step']}.{rule}", "warn")
    last = rated[-1]
    stable = (f" Largest stable step {_fmt(last['max_stable_lr'])} (η = {_fmt(last['lr'])})."
              if last.get("max_stable_lr") and last.get("lr") else "")
    return Finding("Edge of stability", f"not reached: λ_max peaked at {peak['ratio']:.2f} of the threshold, "
                   f"{_fmt(peak['lambda_max'])} vs {_fmt(peak['threshold'])} at step {peak['step']}.{stable}{rule}",
                   "ok")


def collapse_finding(collapse: Sequence[Any], loss_results: Sequence[Any]) -> Finding | None:
    """The collapse phase: terminal phase reached (training accuracy 100 %) or not, and how far NC1 fell."""
    nc = [(r.step, float(r.values["nc1"])) for r in collapse if "nc1" in r.values and np.isfinite(r.values["nc1"])]
    if not nc:
        return None
    acc = {r.step: float(r.values["accuracy"]) for r in loss_results if "accuracy" in r.values}
    if not acc:
        acc = {r.step: float(r.values["classifier_accuracy"]) for r in collapse if "classifier_accuracy" in r.values}
    terminal = [s for s in sorted(acc) if acc[s] >= 1.0]
    (s0, v0), (s1, v1) = nc[0], nc[-1]
    trend = (f"NC1 fell {v0 / v1:.3g}× from {_fmt(v0)} (step {s0}) to {_fmt(v1)} (step {s1})" if v1 < v0 and v1 > 0
             else f"NC1 went from {_fmt(v0)} (step {s0}) to {_fmt(v1)} (step {s1})")
    if terminal:
        return Finding("Collapse", f"in the terminal phase from step {terminal[0]} (100 % accuracy); {trend}.", "info")
    last_acc = f" (accuracy {100 * acc[max(acc)]:.1f} % at step {max(acc)})" if acc else ""
    return Finding("Collapse", f"not in the terminal phase yet{last_acc}; {trend}.", "info")


def sharpest_layer_finding(hessian: Sequence[Any]) -> Finding | None:
    """The block with the largest top eigenvalue of its Hessian block, at the last checkpoint that has block spectra."""
    for r in reversed(list(hessian)):
        m = r.values.get("block_top_eigenvalues")
        if m is None or np.asarray(m).ndim != 2 or not np.asarray(m).size:
            continue
        m = np.asarray(m, dtype=np.float64)
        top = np.nanmax(m, axis=1)
        names = r.coords.get(r.dims["block_top_eigenvalues"][0])
        names = [str(n) for n in names] if names is not None and len(names) == len(top) else [str(i) for i in range(len(top))]
        order = np.argsort(top)[::-1]
        best = order[0]
        runner = (f", {top[best] / top[order[1]]:.2g}× the next ({names[order[1]]})"
                  if len(order) > 1 and top[order[1]] > 0 else "")
        return Finding("Sharpest layer", f"{names[best]}: top eigenvalue {_fmt(top[best])} at step {r.step}{runner}.",
                       "info")
    return None


def summarize(reader: Any, groups: Mapping[tuple[str, str], Sequence[Any]], diagnosis: Mapping | None) -> Summary:
    """The report's Summary: ``glance(reader)``, then the findings from the stored results.

    ``groups`` maps (probe, config key) to that configuration's Results in step order, newest configuration first
    (parts merged into their owner); of each probe the configuration with the most checkpoints is read.
    """
    def best(probe: str) -> list:
        """The configuration with the most checkpoints carrying a stability threshold, then the most checkpoints."""
        found = [rs for (p, _), rs in groups.items() if p == probe and rs]
        return max(found, key=lambda rs: (sum("stability_threshold" in r.meta for r in rs), len(rs))) if found else []

    hessian, loss_results, collapse = best("hessian"), best("loss"), best("collapse")
    log = reader.log(["loss"]) if reader.truncated is None else {"step": np.array([])}
    rows = stability_rows(hessian)
    findings = [_loss_finding(log, loss_results), spike_finding(diagnosis), eos_finding(rows),
                collapse_finding(collapse, loss_results)]
    blocks = [rs for (p, _), rs in groups.items() if p == "hessian" and any("block_top_eigenvalues" in r.values for r in rs)]
    if any("block_top_eigenvalues" in r.values for r in hessian):
        blocks.insert(0, hessian)  # the configuration the edge-of-stability finding reads, when it has block spectra
    findings.append(sharpest_layer_finding(blocks[0]) if blocks else None)
    summary = Summary(glance=glance(reader), findings=[f for f in findings if f is not None])
    if rows:
        table = [[str(r["step"]), _fmt(r["lambda_max"]), _fmt(r["threshold"]) if r["threshold"] else "—",
                  f"{r['ratio']:.3f}" if r["ratio"] is not None else "—",
                  _fmt(r["max_stable_lr"]) if r["max_stable_lr"] else "—", _fmt(r["lr"]) if r["lr"] else "—"]
                 for r in rows]
        summary.tables.append(("λ_max against the stability threshold, per checkpoint",
                               ["step", "λ_max", "threshold", "λ_max / threshold", "max stable η", "η"], table))
    return summary


__all__ = ["EOS_BAND", "glance", "summarize", "spike_finding", "eos_finding", "collapse_finding",
           "sharpest_layer_finding", "stability_rows"]
