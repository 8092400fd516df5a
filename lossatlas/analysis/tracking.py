"""Top Hessian eigenspaces tracked across a run's checkpoints, warm-started from the previous checkpoint.

At each selected checkpoint t the top-k eigenpairs (λ_t, V_t) of the curvature operator are computed
by Lanczos with full reorthogonalization (``lossatlas.probes.spectrum.top_eigenpairs``, relative Ritz
residual ≤ 1e-4 by default), started from the previous checkpoint's eigenvectors: a start vector in
span(V_{t−1}) already holds most of the top eigenspace when the curvature changes slowly, so far fewer
matvecs are needed than from a random start. The overlap of consecutive top eigenspaces,
‖V_{t−1}ᵀ V_t‖_F² / k ∈ [0, 1] (1: the same subspace), measures how fast the top subspace rotates
(Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace").
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lossatlas import store, trust
from lossatlas.analysis.runner import _dtype, default_results_path, load_batches, load_model
from lossatlas.analysis.steps import select_steps
from lossatlas.batches import fingerprint, to_device
from lossatlas.checks import check_choice
from lossatlas.curvature import CURVATURES, make_operator
from lossatlas.finite import nonfinite_counts
from lossatlas.memory import (
    BASIS_DEVICES,
    LanczosWork,
    MemoryPlan,
    Planner,
    check_plan,
    compute_dtype,
    default_max_iter,
)
from lossatlas.probes.base import Result
from lossatlas.probes.spectrum import TOL, top_eigenpairs

PROBE_NAME = "hessian_tracking"
WARM_STARTS: tuple[str, ...] = ("sum", "block", "none")


def subspace_overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ V‖_F² / k for orthonormal (P, k) bases: 1 for the same subspace, 0 for orthogonal ones."""
    k = min(U.shape[1], V.shape[1])
    return float((U.T.to(torch.float64) @ V.to(torch.float64)).pow(2).sum() / k)


def _warm_vector(prev: torch.Tensor | None, warm_start: str, eigenvalues: np.ndarray | None):
    """The Lanczos start from the previous eigenvectors: their sum (one vector) or the block itself."""
    if prev is None or warm_start == "none":
        return None
    if warm_start == "block":
        return prev
    # each direction weighted equally, so every previous top direction is in the Krylov space from step 1
    return prev.sum(dim=1)


def track_eigenspaces(
    run_path: str | Path,
    *,
    steps: str | Sequence[int] | None = "all",
    k: int = 5,
    curvature: str = "hessian",
    tol: float = TOL,
    max_iter: int | None = None,
    warm_start: str = "sum",
    compare_cold: bool = False,
    data: dict | str | None = None,
    batch_size: int | None = 256,
    max_examples: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    mode: str = "eval",
    seed: int = 0,
    results_path: str | Path | None = None,
    save: bool = True,
    model: dict | str | None = None,
    trust_factory: bool = False,
    allow_nonfinite: bool = False,
    basis_device: str | None = None,
) -> Result:
    """Top-k eigenpairs at successive checkpoints, warm-started, with the overlap of consecutive eigenspaces.

    Args:
        run_path: the run file.
        steps: step selection as for the runner ("all", "last", "0:500:100" or a list).
        k: eigenpairs per checkpoint.
        curvature: "hessian", "ggn", "fisher" or "empirical_fisher".
        tol: relative Ritz residual for Lanczos.
        max_iter: most Lanczos steps (None: the estimator's default).
        warm_start: "sum" (start from the sum of the previous eigenvectors; one vector),
            "block" (block Lanczos from the previous eigenvectors) or "none" (random starts).
        compare_cold: also run a random-start Lanczos at every step and store its matvecs as
            "cold_matvecs" (doubles the cost; shows what warm starting saves).
        data: data spec override (default: the run's data spec).
        batch_size: examples per batch, as the runner batches them.
        max_examples: use at most this many examples (None: all).
        dtype: the operator's dtype by name, e.g. ``"float64"`` (None: the model's).
        device: the device the model, the data and the operator live on.
        mode: ``"eval"`` or ``"train"``, the mode the operator evaluates the model in.
        seed: the seed of the random starts.
        results_path: the results file (default: ``run.results.h5`` next to the run).
        save: write the Result to the results file (probe "hessian_tracking", key = hash of the settings).
        model: model spec override (the caller's own; default: the run's).
        trust_factory: import a factory named by the run's specs even if this user did not sign the file.
        allow_nonfinite: accept checkpoints holding NaN/inf, each giving a NaN row (0 matvecs) after which
            the next checkpoint starts cold (default: refuse them, naming the tensors).
        basis_device: where the Lanczos basis lives: None (``device``), "cpu" or "disk" (memory-mapped);
            the same numbers, so not part of the key.

    Before the first checkpoint's products the memory plan of one checkpoint's Lanczos run is printed on
    stderr and a UserError refuses a run whose estimated peak does not fit the available memory
    (``lossatlas.memory``). A float16/bfloat16 checkpoint is analysed in float32.

    Returns:
        A Result with values "steps" ("step",), "top_eigenvalues" ("step", "k"), "overlap" ("step",)
        (NaN at the first step), "matvecs" ("step",), "two_over_lr" ("step",) when the run logged lr,
        and "cold_matvecs" when ``compare_cold``; meta has the total matvecs saved.
    """
    check_choice("curvature", curvature, CURVATURES)
    check_choice("warm_start", warm_start, WARM_STARTS)
    if basis_device is not None:
        check_choice("basis_device", basis_device, BASIS_DEVICES)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    config = {"k": k, "curvature": curvature, "tol": tol, "max_iter": max_iter, "warm_start": warm_start,
              "compare_cold": compare_cold, "data": data, "batch_size": batch_size, "max_examples": max_examples,
              "dtype": dtype, "mode": mode, "seed": seed}
    torch_dtype = _dtype(dtype)
    with store.RunReader(run_path) as reader:
        data_spec = data if data is not None else reader.data_spec
        for spec in (model if model is not None else reader.model_spec, data_spec):
            trust.require_trusted(spec, trust_factory=trust_factory)  # before any work or import
        chosen = select_steps(steps, reader.steps())
        loss = reader.loss or "cross_entropy"
        batches = load_batches(data_spec, batch_size=batch_size, max_examples=max_examples,
                               trust_factory=trust_factory)
        data_fp = fingerprint(batches)
        batches = to_device(batches, device, torch_dtype)
        eigs, overlaps, matvecs, cold, lrs = [], [], [], [], []
        prev: torch.Tensor | None = None
        plan = None
        for step in chosen:
            net = load_model(reader, step, dtype=torch_dtype, device=device, trust_factory=trust_factory,
                             model_spec=model, allow_nonfinite=allow_nonfinite)
            num_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
            if k > num_params:  # there are only P eigenpairs: refuse before any Hessian product
                raise ValueError(f"k={k} eigenpairs asked for, but the model has only {num_params} parameters; "
                                 f"use k ≤ {num_params}")
            lr = reader.checkpoint_attrs(step).get("lr")
            lrs.append(float(lr) if lr is not None and math.isfinite(float(lr)) else float("nan"))
            if nonfinite_counts(dict(net.named_parameters())):  # only with allow_nonfinite
                # the curvature at a NaN/inf point is undefined: a NaN row, and the next checkpoint starts cold
                eigs.append(np.full(k, np.nan))
                overlaps.append(float("nan"))
                matvecs.append(0)
                cold.extend([0] if compare_cold else [])
                prev = None
                continue
            op = make_operator(curvature, net, batches, loss, mode=mode, dtype=compute_dtype(torch_dtype, net),
                               device=device)
            if plan is None:  # one checkpoint's run, planned once: every checkpoint has the same shapes
                plan = _plan(op, net, batches, k, max_iter, warm_start, compare_cold, basis_device)
            v0 = _warm_vector(prev, warm_start, None)
            res = top_eigenpairs(op, k, tol=tol, max_iter=max_iter, v0=v0, seed=seed, basis_device=basis_device)
            V = res.eigenvectors  # (P, k)
            V = V / torch.linalg.vector_norm(V, dim=0, keepdim=True)
            overlaps.append(float("nan") if prev is None else subspace_overlap(prev, V))
            eigs.append(res.eigenvalues)
            matvecs.append(res.matvecs)
            if compare_cold:
                cold_res = top_eigenpairs(op, k, tol=tol, max_iter=max_iter, seed=seed, return_eigenvectors=False,
                                          basis_device=basis_device)
                cold.append(cold_res.matvecs)
            prev = V
        results_file = Path(results_path) if results_path else default_results_path(run_path)
        run_fp = reader.fingerprint()

    values = {
        "steps": np.asarray(chosen, dtype=np.int64),
        "top_eigenvalues": np.stack(eigs),
        "overlap": np.asarray(overlaps, dtype=np.float64),
        "matvecs": np.asarray(matvecs, dtype=np.int64),
    }
    dims = {"steps": ("step",), "top_eigenvalues": ("step", "k"), "overlap": ("step",), "matvecs": ("step",)}
    lrs_a = np.asarray(lrs)
    if np.isfinite(lrs_a).any():
        values["two_over_lr"] = np.where(lrs_a > 0, 2.0 / np.where(lrs_a > 0, lrs_a, 1.0), np.nan)
        dims["two_over_lr"] = ("step",)
    meta: dict[str, Any] = {"loss": loss, "curvature": curvature, "mode": mode, "seed": seed,
                            "dtype": dtype or "model", "total_matvecs": int(sum(matvecs))}
    if plan is not None:
        meta["memory_plan"] = plan.as_meta()
    if compare_cold:
        values["cold_matvecs"], dims["cold_matvecs"] = np.asarray(cold, dtype=np.int64), ("step",)
        # the first step has no warm start: count the savings from the second step on
        meta["matvecs_saved"] = int(sum(cold[1:]) - sum(matvecs[1:]))
    key = hashlib.sha256(json.dumps({"probe": PROBE_NAME, "config": config}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    meta["key"] = key
    result = Result(probe=PROBE_NAME, config=config, step=None, values=values, dims=dims, meta=meta)
    if save:
        with store.ResultsStore(results_file, run_fingerprint=run_fp) as results:
            results.write(result, key=key, status="complete", data_fingerprint=data_fp)
    return result


def _plan(op: Any, net: torch.nn.Module, batches: Sequence[Any], k: int, max_iter: int | None, warm_start: str,
          compare_cold: bool, basis_device: str | None) -> MemoryPlan:
    """The memory plan of one checkpoint: a block-k Lanczos run for ``warm_start="block"``, else b = 1."""
    P = op.shape[0]
    k = min(k, P)
    work = []
    for b in ((k if warm_start == "block" else 1), *((1,) if compare_cold else ())):
        steps = default_max_iter(k, b, P) if max_iter is None else min(P // b, max_iter)
        work.append(LanczosWork(runs=1, block=b, steps=steps, ritz_vectors=k))
    plan = Planner(op, net, batches).plan(work, basis_device=basis_device, offer=("basis_device", "max_examples"))
    return check_plan(plan, PROBE_NAME)


__all__ = ["track_eigenspaces", "subspace_overlap", "PROBE_NAME"]
