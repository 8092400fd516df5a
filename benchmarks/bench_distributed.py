"""Speed-up of 2 torchrun ranks over 1 process on the machine it runs on: top-k eigenvalues, a density and a surface.

Run: ``python benchmarks/bench_distributed.py [JOB ...]`` (all jobs, or those whose name starts with a JOB
argument, e.g. ``density``). The reference MLP (26k parameters) trained for 100 steps on digits;
``lossatlas hessian --top-k 5`` on 2048 examples (Hessian-vector products over the data shard of each rank,
all-reduced), ``lossatlas hessian --density`` with 4 SLQ probes × 40 Lanczos steps on 2048 examples (the
probes split across ranks, each over the full data, no collective per step) and ``lossatlas surface`` on a
31×31 grid over 1024 examples (whole chunks of grid points per rank). Each process uses one thread
(OMP_NUM_THREADS=1), so 2 ranks use the machine's 2 cores. Reported:
the probe's own compute time (stored with each result, rank 0's) and the whole command's wall time
(interpreter start-up, torchrun's rendezvous and gloo set-up included), median of 3.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lossatlas.store import ResultsStore  # noqa: E402
from lossatlas.train import TrainConfig, train  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
JOBS = {
    "hessian top-5": ["hessian", "--top-k", "5", "--batch-size", "256", "--max-examples", "2048"],
    "density 4x40": ["hessian", "--top-k", "0", "--density", "--num-probes", "4", "--num-steps", "40",
                     "--batch-size", "256", "--max-examples", "2048"],
    "surface 31x31": ["surface", "--xrange", "-1", "1", "31", "--yrange", "-1", "1", "31", "--max-examples", "1024",
                      "--no-quadratic-check"],
}


def timed(cmd: list[str], results: Path, probe: str, step: int) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if results.exists():
        results.unlink()
    t = time.perf_counter()
    subprocess.run(cmd + ["--results", str(results)], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t
    with ResultsStore(results, mode="r") as store:
        _, info = store.latest(probe, step)
    return float(info["elapsed_s"]), wall


def main(only: list[str] | None = None) -> list[dict]:
    jobs = {n: a for n, a in JOBS.items() if not only or any(n.startswith(o) for o in only)}
    if not jobs:
        raise SystemExit(f"no job starts with {' or '.join(only)}; jobs: {', '.join(JOBS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.h5"
        train(TrainConfig(model={"name": "mlp"}, data={"name": "digits", "kwargs": {"split": "all"}}, steps=100,
                          batch_size=128, checkpoint_every=100), str(run))
        for name, args in jobs.items():
            probe = args[0]
            single = [sys.executable, "-m", "lossatlas.cli", probe, str(run), *args[1:]]
            multi = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "lossatlas.cli", probe, str(run), *args[1:]]
            one = [timed(single, Path(tmp) / "one.h5", probe, 100) for _ in range(REPEATS)]
            two = [timed(multi, Path(tmp) / "two.h5", probe, 100) for _ in range(REPEATS)]
            c1, w1 = statistics.median(c for c, _ in one), statistics.median(w for _, w in one)
            c2, w2 = statistics.median(c for c, _ in two), statistics.median(w for _, w in two)
            rows.append({"job": name, "compute_1": c1, "compute_2": c2, "wall_1": w1, "wall_2": w2})
    print(f"{'job':<16} {'1 rank (s)':>11} {'2 ranks (s)':>12} {'speed-up':>9} {'wall 1 (s)':>11} {'wall 2 (s)':>11} {'wall speed-up':>14}")
    for r in rows:
        print(f"{r['job']:<16} {r['compute_1']:>11.2f} {r['compute_2']:>12.2f} {r['compute_1'] / r['compute_2']:>8.2f}× "
              f"{r['wall_1']:>11.2f} {r['wall_2']:>11.2f} {r['wall_1'] / r['wall_2']:>13.2f}×")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
