"""Run every benchmark in turn and print its table (``make bench``); each also documents its own setup."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ["bench_hvp.py", "bench_eigs.py", "bench_top1.py", "bench_lanczos_overhead.py", "bench_surface.py",
              "bench_recorder.py", "bench_distributed.py", "bench_diagnose.py", "bench_paths.py",
              "bench_flops.py", "bench_memory.py", "bench_bounds.py", "bench_scale.py", "bench_costlaws.py"]
# the real-size comparisons take hours at full size (benchmarks/README.md): `make bench` runs their quick
# configuration; `make bench-scale` the full one
QUICK = {"bench_scale.py": ["--quick"], "bench_costlaws.py": ["--small"], "bench_bounds.py": ["--steps", "0", "--seeds", "0,1"]}


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        saved = sys.argv
        sys.argv = [name, *QUICK.get(name, [])]
        try:
            runpy.run_path(str(HERE / name), run_name="__main__")
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
