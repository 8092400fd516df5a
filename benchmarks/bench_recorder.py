"""Recorder overhead: a training step with telemetry on, as a ratio to a bare step, on three CPU models.

Run: ``python benchmarks/bench_recorder.py`` (``BENCH_MODELS=mlp,gpt,resnet`` picks the models).
CPU float32, 2 threads (``BENCH_THREADS``):

- ``mlp``: the reference MLP (64-128-128-10, 26k parameters, 6 tensors) on digits, batch 128 and
  1024, SGD with momentum: a ~1 ms step, where a fixed per-step cost shows most;
- ``gpt``: the small GPT with 4 layers (n_embd 64, 4 heads, block 32, vocab 64; 210k parameters,
  69 tensors) on ``token_stream``, batch 32, AdamW: a ~28 ms step;
- ``resnet``: the ResNet with widths 16-32-64 and 2 blocks per stage (175k parameters, 47 tensors)
  on digits, batch 128, SGD with momentum: a ~32 ms step.

Telemetry paths (``lossatlas/norms.py``): the C pass the Recorder uses on the CPU (one call per
step reads every gradient and weight once), the ring buffer it uses on accelerators (one fused
copy a step, norms reduced in blocks), the per-tensor PyTorch loop (parameters on several
devices; the MLP only, unless ``BENCH_PATHS`` names it), and telemetry off (loss and learning rate
only). On the GPT, ``attention heads`` times the per-head attention telemetry alone
(``Recorder(attention_heads=True)``, ``lossatlas.telemetry.AttentionHeadMonitor``: MaxLogit and entropy of
every head, norms off): its hooks are attached for the recorded blocks only, so the bare blocks run
unhooked. Checkpoint writes are excluded (no checkpoint schedule); the log is written to HDF5 every
16384 rows or 10 s as in a real run.

Absolute times drift by tens of percent on a shared machine, so every path is measured against
the bare loop in rounds of two short blocks (``steps`` steps bare, ``steps`` steps recorded, in
alternating order), on one model and one optimizer that all paths share; the overhead is the
median over rounds of (recorded block / bare block − 1), with its interquartile range, and
"minus C pass" the median over rounds of the paired difference of that ratio to the C pass's in
the same round. Beside it, the time spent inside ``Recorder.step`` itself is timed in the recorded
blocks (a direct measurement that misses only indirect costs such as cache misses it causes
later). ``BENCH_ROUNDS`` rounds (default 60), or as many as fit in ``BENCH_SECONDS`` per model and
batch size when that is set; ``BENCH_STEPS`` overrides every model's block length.

``BENCH_PUSH=1`` times instead the norm tracker's ``push()`` alone, outside a training loop (the
model's own gradients from one backward, the ring's block reductions amortized over its pushes;
median of 15 repeats): the cost without the training step's cache and thread-pool interplay.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lossatlas import models  # noqa: E402
from lossatlas.norms import NormRing, StepNorms  # noqa: E402
from lossatlas.recorder import Recorder  # noqa: E402
from lossatlas.telemetry import AttentionHeadMonitor  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "60"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "0"))  # > 0: rounds until this budget per model and batch
TARGET = 0.05
ALL_PATHS = ("C pass", "ring buffer", "per-tensor", "off")  # "C pass" is the Recorder's default on the CPU
HEADS = "attention heads"  # per-head MaxLogit and entropy only (models with attention)
KNOWN_PATHS = (*ALL_PATHS, HEADS)

# name: model spec, data spec, batch sizes, optimizer, steps per block, telemetry paths
MODELS = {
    "mlp": ({"name": "mlp"}, {"name": "digits"}, (128, 1024), "sgd", 50, ALL_PATHS),
    "gpt": ({"name": "gpt", "kwargs": {"n_layer": 4}}, {"name": "token_stream"}, (32,), "adamw", 10,
            ("C pass", "ring buffer", "off", HEADS)),
    "resnet": ({"name": "resnet", "kwargs": {"widths": [16, 32, 64], "blocks_per_stage": 2}}, {"name": "digits"},
               (128,), "sgd", 10, ("C pass", "ring buffer", "off")),
}


def _recorder(path: str, tmp: str, model, opt, spec) -> Recorder:
    rec = Recorder(str(Path(tmp) / f"{path}.h5"), model, opt, model_spec=spec, loss="cross_entropy",
                   telemetry=path not in ("off", HEADS), attention_heads=path == HEADS)
    if path == HEADS:  # names declared up front; the hooks are attached per recorded block (_heads_on)
        rec._heads.close()
        rec._heads = None
    if path == "ring buffer":
        rec._tracker = NormRing(rec._params)
    elif path == "per-tensor":
        rec._tracker = None  # the per-tensor fallback
    elif path == "C pass" and not isinstance(rec._tracker, StepNorms):
        raise SystemExit("the C helper lossatlas._fastnorms is not built: reinstall lossatlas with a C compiler")
    return rec


def measure(name: str, batch_size: int, rounds: int = ROUNDS, seconds: float = SECONDS) -> list[dict]:
    model_spec, data_spec, _, optimizer, steps, paths = MODELS[name]
    steps = int(os.environ.get("BENCH_STEPS", steps))
    if os.environ.get("BENCH_PATHS"):
        paths = tuple(p.strip() for p in os.environ["BENCH_PATHS"].split(","))
        if not set(paths) <= set(KNOWN_PATHS):
            raise SystemExit(f"BENCH_PATHS takes a comma-separated list of: {', '.join(KNOWN_PATHS)}")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = models.build_model(model_spec)
    x, y = models.build_data(data_spec)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0] - batch_size + 1, batch_size)]

    def train_step(i: int) -> torch.Tensor:
        xb, yb = batches[i % len(batches)]
        out = model(xb)  # (B, classes) or, for the GPT, (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    clock = time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        recs = {path: _recorder(path, tmp, model, opt, model_spec) for path in paths}
        step = 0
        for i in range(max(20, 2 * steps)):  # warm-up of every path
            for rec in recs.values():
                step += 1
                rec.step(step, loss=train_step(i).item())
        ratios = {p: [] for p in paths}
        inside = {p: [] for p in paths}
        bare_ms = []
        start, r = clock(), 0
        while (clock() - start < seconds or r < 4) if seconds > 0 else r < rounds:
            for path, rec in recs.items():
                times = {}
                for block in (("bare", "rec") if r % 2 == 0 else ("rec", "bare")):
                    if path == HEADS and block == "rec":  # hooks on for the recorded block only
                        rec._heads = AttentionHeadMonitor(model)
                    t0, spent = clock(), 0.0
                    for i in range(steps):
                        loss = train_step(i).item()
                        if block == "rec":
                            step += 1
                            a = clock()
                            rec.step(step, loss=loss)
                            spent += clock() - a
                    times[block] = clock() - t0
                    if rec._heads is not None and path == HEADS:
                        rec._heads.close()
                        rec._heads = None
                    if block == "rec":
                        inside[path].append(spent)
                ratios[path].append(times["rec"] / times["bare"] - 1)
                bare_ms.append(times["bare"] / steps * 1e3)
            r += 1
        for rec in recs.values():
            rec.close()
    bare = statistics.median(bare_ms)
    rows = []
    for path in paths:
        q1, med, q3 = statistics.quantiles(ratios[path], n=4)
        row = {"model": name, "batch": batch_size, "path": path, "rounds": r, "steps": steps, "bare_ms": bare,
               "overhead": med, "q1": q1, "q3": q3, "step_us": statistics.median(inside[path]) / steps * 1e6}
        if "C pass" in paths and path not in ("C pass", HEADS):  # paired per round: this path's ratio minus the C pass's
            diff = [a - b for a, b in zip(ratios[path], ratios["C pass"])]
            row["minus_c"], row["minus_c_q"] = statistics.median(diff), statistics.quantiles(diff, n=4)[::2]
        rows.append(row)
    return rows


def push_costs(name: str, repeats: int = 15, pushes: int = 64) -> dict[str, float]:
    """µs per ``push()`` of each norm tracker (and of the per-tensor loop) on ``name``'s parameters."""
    model_spec, data_spec, batch_sizes, *_ = MODELS[name]
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = models.build_model(model_spec)
    x, y = models.build_data(data_spec)
    out = model(x[: batch_sizes[0]])
    torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[: batch_sizes[0]].reshape(-1)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        loop = Recorder(str(Path(tmp) / "loop.h5"), model, None, telemetry=True)
        trackers = {"C pass": StepNorms(params).push, "ring buffer": NormRing(params).push, "per-tensor": loop._telemetry}
        costs = {}
        for path, push in trackers.items():
            for _ in range(pushes):  # warm-up, and the ring's first reductions
                push()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(pushes):
                    push()
                times.append((time.perf_counter() - t0) / pushes * 1e6)
            costs[path] = statistics.median(times)
        loop.close()
    return costs


def main() -> list[dict]:
    names = [n.strip() for n in os.environ.get("BENCH_MODELS", "mlp,gpt,resnet").split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown BENCH_MODELS {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if os.environ.get("BENCH_PUSH"):
        print("| model | parameters (tensors) | threads | C pass push (µs) | ring buffer push (µs) | per-tensor loop (µs) |")
        print("|---|---|---|---|---|---|")
        for name in names:
            model = models.build_model(MODELS[name][0])
            size = f"{sum(p.numel() for p in model.parameters()):,} ({len(list(model.parameters()))})"
            c = push_costs(name)
            print(f"| {name} | {size} | {THREADS} | {c['C pass']:.0f} | {c['ring buffer']:.0f} | {c['per-tensor']:.0f} |",
                  flush=True)
        return []
    rows = []
    print("| model | batch | telemetry path | rounds × steps | bare step (ms) | overhead | IQR | minus C pass (IQR) "
          "| inside Recorder.step (µs) | (% of bare) | target ≤ 5 % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for bs in MODELS[name][2]:
            for r in measure(name, bs):
                rows.append(r)
                verdict = "" if r["path"] == "off" else ("PASS" if r["overhead"] <= TARGET else "FAIL")
                minus = (f"{r['minus_c'] * 100:+.2f} pp ({r['minus_c_q'][0] * 100:+.1f} … {r['minus_c_q'][1] * 100:+.1f})"
                         if "minus_c" in r else "")
                print(f"| {name} | {r['batch']} | {r['path']} | {r['rounds']} × {r['steps']} | {r['bare_ms']:.3f} "
                      f"| {r['overhead'] * 100:.2f} % | {r['q1'] * 100:.1f} … {r['q3'] * 100:.1f} % | {minus} "
                      f"| {r['step_us']:.1f} | {r['step_us'] / (r['bare_ms'] * 1e3) * 100:.2f} % | {verdict} |",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()
