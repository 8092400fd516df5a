"""``lossatlas demo``: the main job on the embedded default, end to end, in about two minutes.

Trains the reference MLP (64-128-128-10, 26k parameters) on scikit-learn's digits through the
Recorder, then runs every probe on the run, diagnoses the loss curve, writes a figure per result
kind and the HTML report, and prints where each file is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lossatlas.errors import UserError


def run_demo(out: str | Path = "demo_out", *, steps: int = 600, overwrite: bool = False) -> dict[str, Path]:
    """Write the demo's run, results, figures and report into ``out``; returns their paths."""
    from lossatlas.analysis.diagnose import diagnose_command
    from lossatlas.analysis.kinds import plot_kinds
    from lossatlas.analysis.reporting import plot_command, report_command
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.analysis.tracking import track_eigenspaces
    from lossatlas.probes.collapse import NeuralCollapse
    from lossatlas.probes.connectivity import Interpolate
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.sharpness import Sharpness
    from lossatlas.probes.surface import Surface
    from lossatlas.probes.trajectory import Trajectory
    from lossatlas.probes.uniformity import Uniformity
    from lossatlas.progress import status
    from lossatlas.store import ResultsStore, RunReader
    from lossatlas.train import TrainConfig, train

    if not str(out).strip():
        raise UserError("--out is empty; give the folder to write the demo into, e.g. --out demo_out")
    # every setting is checked before the output folder is made: a refused demo leaves nothing behind
    cfg = TrainConfig(model={"name": "mlp"}, data={"name": "digits"}, optimizer="sgd", lr=0.05, momentum=0.9,
                      batch_size=64, steps=steps, checkpoint_every=max(1, steps // 6) if isinstance(steps, int) else 1,
                      seed=0)
    out = Path(out)
    run_path, results_path = out / "run.h5", out / "run.results.h5"
    if not overwrite and any(p.exists() for p in (run_path, results_path, out / "report.html")):
        raise UserError(f"{out} already holds a demo; pass --force to overwrite it or --out to choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and results_path.exists():
        results_path.unlink()  # results of an earlier demo run belong to that run
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    paths: dict[str, Path] = {"run": run_path, "results": results_path}
    t0 = time.perf_counter()

    status(f"[demo] training the reference MLP on digits for {steps} steps")
    train(cfg, str(run_path), overwrite=overwrite)
    last = f"{steps}"

    def probe(p, steps_sel: str, **kw) -> None:
        status(f"[demo] {p.name} at steps {steps_sel}")
        run_probe(run_path, p, RunOptions(steps=steps_sel, progress=status, **kw))

    probe(Loss(), "all")
    probe(HessianProbe(top_k=5, tol=1e-4), "all", max_examples=1024)
    spectrum = HessianProbe(top_k=5, bottom_k=3, tol=1e-4, trace=True, density=True, num_steps=60, blocks="layers")
    probe(spectrum, last, max_examples=1024)
    probe(Sharpness(measures=("grad_norm", "sam", "adaptive_sam", "average_case", "fisher_rao"), lambda_max=True,
                    max_examples=512), "all")
    probe(Surface(dims=2, xrange=(-1.0, 1.0, 21), yrange=(-1.0, 1.0, 21)), last, max_examples=512)
    probe(Interpolate(to_step=0, alphas=(-0.25, 1.25, 31), layerwise=True), last, max_examples=512)
    with RunReader(run_path) as reader:
        checkpoints = len(reader.steps())
    if checkpoints >= 3:  # the trajectory's PCA plane needs three checkpoints
        probe(Trajectory(grid=15), last, max_examples=512)
    else:
        status(f"[demo] no trajectory: the run has {checkpoints} checkpoints and its PCA plane needs 3 "
               "(train for more --steps)")
    probe(NeuralCollapse(), "all")
    probe(Uniformity(), "all")
    status("[demo] tracking the top Hessian eigenspace across checkpoints")
    track_eigenspaces(run_path, steps="all", k=3, max_examples=1024)

    text, diagnosis = diagnose_command(run_path)
    (out / "diagnosis.txt").write_text(text + "\n")
    (out / "diagnosis.json").write_text(json.dumps(diagnosis, indent=1))
    paths["diagnosis"] = out / "diagnosis.txt"
    from lossatlas.viz.dynamics import spikes_figure
    from lossatlas.viz.style import save_figure

    for ext in ("png", "pdf"):
        paths[f"spikes.{ext}"] = save_figure(spikes_figure(diagnosis), figures / f"spikes.{ext}")

    with ResultsStore(results_path, mode="r") as stored:
        probes_run = {e["probe"] for e in stored.entries()}
    chosen = {"hessian": spectrum.config_hash()}  # of two hessian configurations, the full spectrum (its key)
    for kind in plot_kinds():
        if kind != "training" and kind not in probes_run:
            status(f"[demo] no {kind} result: the demo does not run that probe, so it draws no {kind} figure")
            continue
        for ext in ("png", "pdf"):
            paths[f"{kind}.{ext}"] = plot_command(run_path, kind, output=figures / f"{kind}.{ext}", overwrite=True,
                                                  select=chosen.get(kind))
    paths["surface.html"] = plot_command(run_path, "surface", output=figures / "surface.html", overwrite=True)
    paths["report"] = report_command(run_path, output=out / "report.html", overwrite=True)

    print(f"lossatlas demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  run file      {run_path}")
    print(f"  results       {results_path}")
    print(f"  diagnosis     {paths['diagnosis']}")
    print(f"  figures       {figures}/ ({len([p for k, p in paths.items() if '.' in k])} files)")
    print(f"  report        {paths['report']}")
    return paths
