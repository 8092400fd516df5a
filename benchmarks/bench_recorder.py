"""Recorder overhead: a training step of the reference MLP with telemetry on, as a ratio to a bare step.

Run: ``python benchmarks/bench_recorder.py``. Reference MLP (64-128-128-10, 26k parameters) on
digits, batch 128 and 1024, SGD with momentum, CPU float32, 2 threads (``BENCH_THREADS``).
Two telemetry paths: the ring buffer the Recorder uses (one fused copy a step, norms reduced in
blocks of steps that fit a 4 MiB ring, ``lossatlas/norms.py``) and, for comparison, the per-tensor path (fused
``_foreach_norm``/``_foreach_sub`` every step, the fallback for parameters on several devices),
and the Recorder with telemetry off (loss and learning rate only).
Checkpoint writes are excluded (no checkpoint schedule); the log is written to HDF5 every 4096 rows
as in a real run. Bare and recorded blocks are interleaved and the median block time is compared,
since absolute times drift; run it on an otherwise idle machine.
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
from lossatlas.recorder import Recorder  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
PATHS = ("ring buffer", "per-tensor", "off")  # "off": loss and lr only (telemetry=False)


def measure(batch_size: int, blocks: int, steps_per_block: int, path: str = "ring buffer") -> dict:
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

    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(str(Path(tmp) / "bench.h5"), model, opt, model_spec={"name": "mlp"}, loss="cross_entropy",
                       telemetry=path != "off")
        if path == "per-tensor":
            rec._ring = None  # the per-tensor fallback path, for comparison
        for i in range(100):  # warm-up of both paths
            train_step(i)
            rec.step(i, loss=train_step(i).item())
        bare, recorded, step = [], [], 1000
        for _ in range(blocks):
            t = time.perf_counter()
            for i in range(steps_per_block):
                train_step(i).item()
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(steps_per_block):
                loss = train_step(i)
                rec.step(step, loss=loss.item())
                step += 1
            recorded.append(time.perf_counter() - t)
        rec.close()
    b, r = statistics.median(bare) / steps_per_block, statistics.median(recorded) / steps_per_block
    return {"batch": batch_size, "path": path, "bare_ms": b * 1e3, "recorded_ms": r * 1e3, "overhead": r / b - 1}


def main(blocks: int = 15, steps_per_block: int = 200) -> list[dict]:
    rows = [measure(bs, blocks, steps_per_block, path) for bs in (128, 1024) for path in PATHS]
    print(f"{'batch':>6} {'telemetry path':>15} {'bare step (ms)':>15} {'with telemetry (ms)':>20} {'overhead':>9}")
    for r in rows:
        verdict = "PASS" if r["overhead"] <= 0.05 else "FAIL"
        print(f"{r['batch']:>6} {r['path']:>15} {r['bare_ms']:>15.3f} {r['recorded_ms']:>20.3f} "
              f"{r['overhead'] * 100:>8.1f}%  (target <= 5 %) {verdict}")
    return rows


if __name__ == "__main__":
    main()
