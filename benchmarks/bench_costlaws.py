"""Cost laws, measured: how the time and memory of top-5, trace and a surface grow with parameters and examples.

Two sweeps, every configuration in its own subprocess (CPU float32, random initialization, eval mode):

- **parameters** P at a fixed data set: the MLP family 64-w-w-10 on N_P Gaussian inputs (w = 128 gives the
  reference MLP's 26k parameters) and GPT-2 (``transformers``, eager attention) at several widths on 8
  random sequences of 128 tokens;
- **examples** N (256 → 4096 in the full run) for the 26k MLP.

Per configuration, each in turn with the resident-set high-water mark reset before it (``malloc_trim`` then
``/proc/self/clear_refs`` 5, sampled every 5 ms): one gradient (time t_g, peak memory m_g above the model and
data); ``lanczos_eigs(op, 5, tol=1e-3)`` (time, products, peak); ``trace_estimate(op, num_matvecs=M)`` (the
default estimator, a fixed budget of M products; time, peak); a G×G surface with the ``surface`` probe (time per
point, peak). Exponents: least squares of log(cost) on log(P) (or log(N)) within each family,
cost ∝ P^a (or N^b).

Extrapolation to 1B and 7B parameters on 8 GPUs (the README table): GPU throughput relative to this CPU is not
measurable here, so time is given as gradient-equivalents (products × one product's cost in gradients, from the
GPT-2 sweep) and as CPU-seconds through the measured constant c = t_g / (P · tokens), i.e. t ≈ c·P·tokens per
gradient, divided by 8 for 8 devices splitting the examples; products follow the fitted exponent of products
on P from the GPT-2 sweep; memory per GPU = (the fitted gradient peak at P + 4 bytes × P for the parameters +
the Lanczos basis, products × 4P bytes) / 8, i.e. parameters, activations and basis fully sharded (FSDP with
vectors sharded like the parameters). These are assumptions, stated beside the table.

Run: ``python benchmarks/bench_costlaws.py [--small]`` (prints the exponents and the table, writes
benchmarks/results/bench_costlaws.md). ``--small`` runs a few-minute configuration (26k → ~1M parameters,
256 → 1024 examples, tiny GPT-2 widths).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_scale import FlatCE, Logits, PeakRSS, timed, warm_imports  # noqa: E402  (the shared measurement helpers)

GPUS = 8
TOKENS = 8 * 128  # the GPT-2 sweep's data: 8 sequences of 128 tokens
FULL = dict(
    mlp_widths=[128, 512, 2048, 8192],  # 26k, 0.3M, 4.3M, 67M parameters
    gpt2_widths=[64, 192, 384, 768],  # 12 layers, vocabulary 50257: 3.3M … 124M parameters
    gpt2_layers=12, gpt2_vocab=50257,
    examples=[256, 512, 1024, 2048, 4096], n_fixed=1024, trace_matvecs=32, grid=11,
)
SMALL = dict(
    mlp_widths=[128, 256, 512, 1024],  # 26k … 1.1M parameters
    gpt2_widths=[32, 64, 128],  # 2 layers, vocabulary 2048
    gpt2_layers=2, gpt2_vocab=2048,
    examples=[256, 512, 1024], n_fixed=512, trace_matvecs=16, grid=9,
)


def build(kind: str, size: int, n: int, cfg: dict) -> tuple[nn.Module, list]:
    """(model, batches): the MLP 64-w-w-10 on n Gaussian inputs, or GPT-2 of width ``size`` on 8×128 tokens."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, size), nn.ReLU(), nn.Linear(size, size), nn.ReLU(), nn.Linear(size, 10))
        x = torch.randn(n, 64, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        return model.eval(), [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]
    import transformers

    transformers.logging.set_verbosity_error()
    c = transformers.GPT2Config(n_layer=cfg["gpt2_layers"], n_embd=size, n_head=max(1, size // 64),
                                vocab_size=cfg["gpt2_vocab"])
    c._attn_implementation = "eager"
    model = Logits(transformers.GPT2LMHeadModel(c)).eval()
    seq = torch.randint(0, c.vocab_size, (8, 129), generator=gen)
    return model, [(seq[:, :-1], seq[:, 1:])]


def _reset_mark() -> None:
    """Give freed heap back to the kernel and reset the high-water mark to the current resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(kind: str, size: int, n: int, cfg: dict, threads: int) -> dict:
    """Every cost of one configuration, in this process."""
    from lossatlas.curvature import HessianOperator
    from lossatlas.estimators import lanczos_eigs, trace_estimate
    from lossatlas.probes.base import ProbeContext
    from lossatlas.probes.surface import Surface

    torch.set_num_threads(threads)
    model, batches = build(kind, size, n, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = dict(P=sum(p.numel() for p in params), N=n)
    warm_imports()  # one-off imports of the first double backward and torch.func call, not a cost of P or N
    with torch.no_grad():
        model(batches[0][0][:1])  # warm-up on one example

    def grad():
        for x, y in batches:
            torch.autograd.grad(FlatCE()(model(x), y) * (len(x) / n if kind == "mlp" else 1.0), params)

    def top5():
        res = lanczos_eigs(HessianOperator(model, batches, "cross_entropy"), 5, tol=1e-3, return_eigenvectors=False)
        out["top5_products"] = int(res.matvecs)

    def trace():
        est = trace_estimate(HessianOperator(model, batches, "cross_entropy"), num_matvecs=cfg["trace_matvecs"])
        out["trace_products"] = int(est.matvecs)

    def surface():
        g = cfg["grid"]
        Surface(dims=2, xrange=(-1.0, 1.0, g)).run(ProbeContext(model=model, data=batches, loss="cross_entropy"))

    for name, fn in (("grad", grad), ("top5", top5), ("trace", trace), ("surface", surface)):
        _reset_mark()
        with PeakRSS() as mem:
            out[f"{name}_time"] = timed(fn)
        out[f"{name}_peak"] = mem.extra
    out["grad_time"] = min(out["grad_time"], timed(grad))  # a second, warm gradient
    out["surface_time"] /= cfg["grid"] ** 2  # per point
    return out


def run(kind: str, size: int, n: int, cfg: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    spec = json.dumps(dict(kind=kind, size=size, n=n, cfg=cfg, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--job", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {size} n={n} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(kind=kind, size=size)
    print(f"  {kind:4s} size {size:5d} N {n:5d} P {res['P']:>11,}: gradient {res['grad_time']:.3f}s, "
          f"top-5 {res['top5_time']:.2f}s/{res['top5_products']} products, trace {res['trace_time']:.2f}s, "
          f"surface {res['surface_time'] * 1e3:.1f} ms/point; peaks (MiB) {res['grad_peak'] / 2**20:.1f} / "
          f"{res['top5_peak'] / 2**20:.1f} / {res['trace_peak'] / 2**20:.1f} / {res['surface_peak'] / 2**20:.1f}",
          file=sys.stderr, flush=True)
    return res


COSTS = ["grad_time", "top5_time", "trace_time", "surface_time", "top5_products",
         "grad_peak", "top5_peak", "trace_peak", "surface_peak"]


def exponent(xs, ys) -> tuple[float, float]:
    """(a, log c) of the least-squares line log y = a log x + log c (NaN if fewer than 2 positive points)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = (xs > 0) & (ys > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    a, c = np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)
    return float(a), float(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="a few-minute configuration (provisional numbers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_costlaws.md"))
    args = parser.parse_args()
    if args.job:
        s = json.loads(args.job)
        print(json.dumps(measure(s["kind"], s["size"], s["n"], s["cfg"], s["threads"])))
        return
    cfg = SMALL if args.small else FULL
    t0 = time.perf_counter()
    mlp = [run("mlp", w, cfg["n_fixed"], cfg, args.threads) for w in cfg["mlp_widths"]]
    gpt = [run("gpt2", w, 8, cfg, args.threads) for w in cfg["gpt2_widths"]]
    ex = [run("mlp", 128, n, cfg, args.threads) for n in cfg["examples"]]
    lines = ["| cost | MLP: exponent of P | GPT-2: exponent of P | MLP 26k: exponent of N |", "|---|---|---|---|"]
    fits = {}
    for c in COSTS:
        a_m = exponent([r["P"] for r in mlp], [r[c] for r in mlp])[0]
        a_g, logc = exponent([r["P"] for r in gpt], [r[c] for r in gpt])
        b = exponent([r["N"] for r in ex], [r[c] for r in ex])[0]
        fits[c] = (a_g, logc)
        lines.append(f"| {c} | {a_m:.2f} | {a_g:.2f} | {b:.2f} |")
    raw = ["| family | P | N | gradient (s) | top-5 (s, products) | trace (s) | surface (ms/point) | peak MiB: "
           "gradient / top-5 / trace / surface |", "|---|---|---|---|---|---|---|---|"]
    for r in mlp + gpt + ex:
        raw.append(f"| {r['kind']} {r['size']} | {r['P']:,} | {r['N']} | {r['grad_time']:.3f} | {r['top5_time']:.2f}, "
                   f"{r['top5_products']} | {r['trace_time']:.2f} | {r['surface_time'] * 1e3:.1f} | "
                   f"{r['grad_peak'] / 2**20:.1f} / {r['top5_peak'] / 2**20:.1f} / {r['trace_peak'] / 2**20:.1f} / "
                   f"{r['surface_peak'] / 2**20:.1f} |")
    # constants from the largest GPT-2 measured: seconds per gradient per parameter-token, top-5 cost per product
    big = max(gpt, key=lambda r: r["P"])
    c_sec = big["grad_time"] / (big["P"] * TOKENS)
    per_product = float(np.median([r["top5_time"] / r["top5_products"] / r["grad_time"] for r in gpt]))
    trace_per_product = float(np.median([r["trace_time"] / r["trace_products"] / r["grad_time"] for r in gpt]))
    a_prod, logc_prod = fits["top5_products"]
    span = max(r["P"] for r in gpt) / min(r["P"] for r in gpt)
    fitted = len(gpt) >= 4 and span >= 100 and np.isfinite(a_prod)  # extrapolate the count only from a wide sweep
    Ps = np.array([r["P"] for r in gpt], float)
    slope = float(np.polyfit(Ps, [r["grad_peak"] for r in gpt], 1)[0])  # marginal bytes of a gradient's peak per parameter
    bpp = max(4.0, slope)  # at least the gradient itself (4 bytes per parameter)
    proj = ["| model | task | products | gradient-equivalents | CPU-seconds at c·P·tokens / 8 | memory per GPU |",
            "|---|---|---|---|---|---|"]
    for label, P in (("1B", 1e9), ("7B", 7e9)):
        prods = float(np.exp(logc_prod) * P**a_prod) if fitted else float(big["top5_products"])
        for task, products, cost in (("top-5 (tol 1e-3)", prods, per_product),
                                     (f"trace ({cfg['trace_matvecs']} products)", cfg["trace_matvecs"], trace_per_product),
                                     ("one gradient", 0, 1.0)):
            geq = products * cost if products else 1.0
            basis = products * 4 * P if task.startswith("top") else 0.0
            mem = (bpp * P + 4 * P + basis) / GPUS
            proj.append(f"| {label} | {task} | {products:.0f} | {geq:.0f} | {geq * c_sec * P * TOKENS / GPUS:,.0f} | "
                        f"{mem / 2**30:.1f} GiB |")
    count = (f"top-5 products ∝ P^{a_prod:.2f} (GPT-2 fit over {span:.0f}× in P)" if fitted else
             f"top-5 products as measured at the largest GPT-2 ({big['top5_products']}; the sweep spans {span:.0f}× in "
             f"P, too little to extrapolate the fitted P^{a_prod:.2f})")
    assumptions = (
        f"Assumptions: {TOKENS} tokens (8 sequences of 128) as in the GPT-2 sweep; c = {c_sec:.3e} s per gradient per "
        f"parameter-token, measured on this CPU ({args.threads} threads) with GPT-2 at P = {big['P']:,}; GPU "
        f"throughput relative to this CPU is not measurable here, so the seconds are this CPU's, divided by {GPUS} "
        f"for {GPUS} devices splitting the work perfectly — multiply by (CPU FLOP/s ÷ GPU FLOP/s) for a GPU. "
        f"Gradient-equivalents: a top-5 costs {per_product:.2f} gradients per product and a trace "
        f"{trace_per_product:.2f} (whole-run time / products / gradient time, median over the GPT-2 sweep: operator "
        f"set-up, path timing and Lanczos bookkeeping included); {count}. Memory per GPU = ({bpp:.0f} bytes per "
        f"parameter for a gradient's peak (the marginal slope over the GPT-2 sweep, at least the 4-byte gradient) + "
        f"4P parameters + products × 4P for the Lanczos basis) / {GPUS}: everything sharded (FSDP, the vectors "
        f"sharded like the parameters), activations at the sweep's {TOKENS} tokens.")
    kind = "SMALL configuration (provisional)" if args.small else "full sweep"
    text = (f"# bench_costlaws — {kind}\n\nCPU float32, {args.threads} threads, torch {torch.__version__}; "
            f"`python benchmarks/bench_costlaws.py {' '.join(sys.argv[1:])}` ({time.perf_counter() - t0:.0f} s).\n\n"
            "## Exponents (cost ∝ P^a or N^b, log-log least squares)\n\n" + "\n".join(lines)
            + "\n\n## Measurements\n\n" + "\n".join(raw)
            + f"\n\n## What 1B and 7B models would need on {GPUS} GPUs\n\n" + "\n".join(proj) + "\n\n" + assumptions + "\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
