"""Recorder overhead: a training step of the reference MLP with telemetry on, as a ratio to a bare step.

Run: ``python benchmarks/bench_recorder.py``. Reference MLP (64-128-128-10, 26k parameters) on
digits, batch 128 and 1024, SGD with momentum, CPU float32, 2 threads (``BENCH_THREADS``).
Telemetry paths (``lossatlas/norms.py``): the C pass the Recorder uses on the CPU (one call per
step reads every gradient and weight once), the ring buffer it uses on accelerators (one fused
copy a step, norms reduced in blocks), the per-tensor PyTorch loop (parameters on several
devices), and telemetry off (loss and learning rate only). Checkpoint writes are excluded (no
checkpoint schedule); the log is written to HDF5 every 16384 rows or 10 s as in a real run.

Absolute times drift by tens of percent on a shared machine, so every path is measured against
the bare loop in ``ROUNDS`` rounds of two short blocks (``STEPS`` steps bare, ``STEPS`` steps
recorded, in alternating order), on one model and one optimizer that all paths share; the
overhead is the median over rounds of (recorded block / bare block − 1), with its interquartile
range. Beside it, the time spent inside ``Recorder.step`` itself is timed in the recorded blocks
(a direct measurement that misses only indirect costs such as cache misses it causes later).
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

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "60"))
STEPS = int(os.environ.get("BENCH_STEPS", "50"))
TARGET = 0.05
PATHS = ("C pass", "ring buffer", "per-tensor", "off")  # "C pass" is the Recorder's default on the CPU


def _recorder(path: str, tmp: str, model, opt) -> Recorder:
    rec = Recorder(str(Path(tmp) / f"{path}.h5"), model, opt, model_spec={"name": "mlp"}, loss="cross_entropy",
                   telemetry=path != "off")
    if path == "ring buffer":
        rec._tracker = NormRing(rec._params)
    elif path == "per-tensor":
        rec._tracker = None  # the per-tensor fallback
    elif path == "C pass" and not isinstance(rec._tracker, StepNorms):
        raise SystemExit("the C helper lossatlas._fastnorms is not built: reinstall lossatlas with a C compiler")
    return rec


def measure(batch_size: int, rounds: int = ROUNDS, steps: int = STEPS) -> list[dict]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = models.build_model({"name": "mlp"})
    x, y = models.build_data({"name": "digits"})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0] - batch_size + 1, batch_size)]

    def train_step(i: int) -> torch.Tensor:
        xb, yb = batches[i % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    clock = time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        recs = {path: _recorder(path, tmp, model, opt) for path in PATHS}
        step = 0
        for i in range(100):  # warm-up of every path
            for rec in recs.values():
                step += 1
                rec.step(step, loss=train_step(i).item())
        ratios = {p: [] for p in PATHS}
        inside = {p: [] for p in PATHS}
        bare_ms = []
        for r in range(rounds):
            for path, rec in recs.items():
                times = {}
                for block in (("bare", "rec") if r % 2 == 0 else ("rec", "bare")):
                    t0, spent = clock(), 0.0
                    for i in range(steps):
                        loss = train_step(i).item()
                        if block == "rec":
                            step += 1
                            a = clock()
                            rec.step(step, loss=loss)
                            spent += clock() - a
                    times[block] = clock() - t0
                    if block == "rec":
                        inside[path].append(spent)
                ratios[path].append(times["rec"] / times["bare"] - 1)
                bare_ms.append(times["bare"] / steps * 1e3)
        for rec in recs.values():
            rec.close()
    bare = statistics.median(bare_ms)
    rows = []
    for path in PATHS:
        q1, med, q3 = statistics.quantiles(ratios[path], n=4)
        rows.append({"batch": batch_size, "path": path, "bare_ms": bare, "overhead": med, "q1": q1, "q3": q3,
                     "step_us": statistics.median(inside[path]) / steps * 1e6})
    return rows


def main() -> list[dict]:
    rows = [row for bs in (128, 1024) for row in measure(bs)]
    print(f"{'batch':>5} {'telemetry path':>14} {'bare step (ms)':>14} {'overhead':>9} {'IQR':>17} "
          f"{'inside Recorder.step (us)':>26} {'(% of bare)':>11}")
    for r in rows:
        verdict = "" if r["path"] == "off" else ("PASS" if r["overhead"] <= TARGET else "FAIL")
        print(f"{r['batch']:>5} {r['path']:>14} {r['bare_ms']:>14.3f} {r['overhead'] * 100:>8.1f}% "
              f"{r['q1'] * 100:>7.1f}..{r['q3'] * 100:>5.1f}% {r['step_us']:>26.1f} "
              f"{r['step_us'] / (r['bare_ms'] * 1e3) * 100:>10.1f}%  (target <= 5 %) {verdict}")
    return rows


if __name__ == "__main__":
    main()
