"""Peak memory of one gradient, one Hessian-vector product per path, and a top-1 Lanczos run, on the CPU.

Each measurement runs in a fresh subprocess, as in ``tests/test_memory_plan.py``: the model, the data and
the operator's copies (``op.point()``) exist first; then the heap is trimmed (``malloc_trim``), the
resident high-water mark is reset (``/proc/self/clear_refs``), and the peak is VmHWM minus the resident
size at that moment. ``MALLOC_MMAP_THRESHOLD_=65536`` keeps glibc from holding freed blocks resident, so
the resident size follows the live tensors.

Rows: ``gradient`` (``op.loss_and_gradient()``, the floor's unit); ``hvp db lean`` (double backward,
``graph_cache="off"``); ``hvp db cached`` (two products; the first builds and keeps the graph);
``hvp fr`` (forward-over-reverse, one vector); ``hvp fd`` (finite differences of gradients);
``top-1 …``: ``lanczos_eigs(op, k=1, max_iter=S, tol=1e-14)`` (S block steps, all taken), whose
basis is an array of min(S, 32) rows of P values allocated up front (grown by doubling past 32 rows;
``lossatlas.memory._basis_rows``). The floor of issue 19: top-1 peak ≤ gradient peak + basis bytes;
``over floor`` is the top-1 peak minus that, in P-vectors (P·8 bytes).

Run: ``python benchmarks/bench_memory.py [--steps 20]``; results in ``benchmarks/results/bench_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from lossatlas.memory import _basis_rows

CASES = {  # label: (width, depth, examples): MLP 128 → width × depth → 10, float64
    "MLP 1.1M, 512 ex (parameters dominate)": (1000, 2, 512),
    "MLP 0.1M, 8k ex (activations dominate)": (256, 2, 8192),
}
ACTIONS = ("gradient", "hvp_lean", "hvp_cached", "hvp_fr", "hvp_fd", "top1_lean", "top1_cached", "top1_fd")

_CHILD = r"""
import ctypes, gc, json, sys, torch
from torch import nn
from lossatlas.curvature import HessianOperator
from lossatlas.curvature.base import _warm_up
from lossatlas.estimators import lanczos_eigs

torch.set_num_threads(1)
width, depth, n, action, steps = json.loads(sys.argv[1])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

layers, d = [], 128
for _ in range(depth):
    layers += [nn.Linear(d, width), nn.Tanh()]
    d = width
model = nn.Sequential(*layers, nn.Linear(d, 10)).double()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(n, 128, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))]
what = action.split("_")[1] if "_" in action else "lean"
path = {"lean": "double_backward", "cached": "double_backward", "fr": "forward_over_reverse",
        "fd": "finite_difference"}[what]
op = HessianOperator(model, data, "cross_entropy", path=path, graph_cache="off" if what == "lean" else "on",
                     check_deterministic=False, coalesce_examples=0)
op.point()
_warm_up("double_backward"); _warm_up("forward_over_reverse")  # one-off imports outside the peak
v = torch.randn(op.num_params, generator=g, dtype=torch.float64)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
if action == "gradient":
    op.loss_and_gradient()
elif action.startswith("hvp"):
    for _ in range(2 if what == "cached" else 1):
        op @ v
else:
    lanczos_eigs(op, k=1, max_iter=steps, tol=1e-14)
print(json.dumps({"P": op.num_params, "peak": status("VmHWM") - base}))
"""


def measure(width: int, depth: int, n: int, action: str, steps: int) -> dict:
    """One action's peak in a fresh subprocess (bytes)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([width, depth, n, action, steps])], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Lanczos steps of the top-1 runs (all taken)")
    parser.add_argument("--actions", default=",".join(ACTIONS))
    parser.add_argument("--cases", default="", help="only the models whose label contains this text")
    args = parser.parse_args()
    actions = args.actions.split(",")
    mib = 2**20
    print(f"Peak resident growth in MiB (fresh process per cell; float64; top-1: {args.steps} Lanczos steps)")
    header = ("| model | P | basis MiB | " + " | ".join(actions)
              + " | floor: gradient + basis | over floor (P-vectors): lean / cached / fd |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, (width, depth, n) in CASES.items():
        if args.cases not in label:
            continue
        res = {a: measure(width, depth, n, a, args.steps) for a in actions}
        P = next(iter(res.values()))["P"]
        rows, most = _basis_rows(1, args.steps, P)  # the basis array, and the most rows alive while it grows
        basis = most * P * 8
        grad = res.get("gradient", {}).get("peak", 0)
        cells = " | ".join(f"{res[a]['peak'] / mib:.1f}" for a in actions)
        over = " / ".join(f"{(res[a]['peak'] - grad - basis) / (P * 8):.1f}" if a in res else "?"
                          for a in ("top1_lean", "top1_cached", "top1_fd"))
        print(f"| {label} | {P:,} | {basis / mib:.1f} | {cells} | {(grad + basis) / mib:.1f} | {over} |", flush=True)


if __name__ == "__main__":
    main()
