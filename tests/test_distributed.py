"""Probes under torchrun (2 ranks, gloo on loopback) give the single-process results: the surface bit for bit,
the spectrum, trace and density to floating-point reduction order."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lossatlas.distributed import chunks_for_rank
from lossatlas.estimators import hutchinson_trace
from lossatlas.estimators._checks import probe_vectors
from lossatlas.store import ResultsStore

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_chunks_partition_the_grid():
    parts = [chunks_for_rank(23, 4, r, 3) for r in range(3)]
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(23))
    assert list(parts[1][:4]) == [4, 5, 6, 7]  # whole chunks move between ranks


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_surface_under_torchrun_equals_single_process(tiny_run, tmp_path):
    args = ["surface", str(tiny_run), "--xrange", "-1", "1", "5", "--yrange", "-1", "1", "4", "--chunk-size", "2",
            "--no-quadratic-check", "--max-examples", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    single = tmp_path / "single.h5"
    multi = tmp_path / "multi.h5"
    subprocess.run([sys.executable, "-m", "lossatlas.cli", *args, "--results", str(single)], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "lossatlas.cli", *args,
                           "--results", str(multi)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with ResultsStore(single, mode="r") as a, ResultsStore(multi, mode="r") as b:
        (ra, _), (rb, _) = a.latest("surface", 20), b.latest("surface", 20)
    assert ra.values["loss"].shape == (4, 5)
    assert np.array_equal(ra.values["loss"], rb.values["loss"])  # bit for bit
    assert np.array_equal(ra.values["accuracy"], rb.values["accuracy"])


def _torchrun(args, env, timeout=300):
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "lossatlas.cli", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_hessian_and_sweep_under_torchrun_equal_single_process(tiny_run, tmp_path):
    """Data-parallel HVPs (all-reduced) give the single-process spectrum to reduction order; a checkpoint
    sweep dealt out across ranks gives every step's result bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    hess = ["hessian", str(tiny_run), "--top-k", "3", "--trace", "--trace-matvecs", "30", "--density",
            "--num-steps", "20", "--num-probes", "2", "--dtype", "float64", "--batch-size", "100"]
    sweep = ["loss", str(tiny_run), "--steps", "all"]
    single, multi = tmp_path / "single.h5", tmp_path / "multi.h5"
    for args in (hess, sweep):
        subprocess.run([sys.executable, "-m", "lossatlas.cli", *args, "--results", str(single)], check=True,
                       env=env, capture_output=True, timeout=300)
        proc = _torchrun([*args, "--results", str(multi)], env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    with ResultsStore(single, mode="r") as a, ResultsStore(multi, mode="r") as b:
        (ha, _), (hb, _) = a.latest("hessian", 20), b.latest("hessian", 20)
        np.testing.assert_allclose(hb.values["top_eigenvalues"], ha.values["top_eigenvalues"], rtol=1e-9)
        # trace and density: probe vectors split across ranks, each over the full data
        for name in ("trace", "trace_stderr", "density_nodes", "density_weights"):
            np.testing.assert_allclose(hb.values[name], ha.values[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(hb.values["density"], ha.values["density"], rtol=1e-6, atol=1e-12)
        assert hb.meta["matvecs"] == ha.meta["matvecs"]
        for step in (0, 5, 10, 15, 20):
            (la, _), (lb, _) = a.latest("loss", step), b.latest("loss", step)
            assert la.scalar("loss") == lb.scalar("loss") and la.scalar("accuracy") == lb.scalar("accuracy")


KILLER = '''
import os
import torch


class Killer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        if os.environ.get("RANK") == "1":
            os._exit(3)  # a rank that dies mid-computation
        return self.fc(x.flatten(1))


def build():
    return Killer()
'''


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_a_dying_rank_fails_the_command_and_leaves_results_as_they_were(tmp_path):
    from lossatlas.train import TrainConfig, train

    (tmp_path / "killer_model.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sys.path.insert(0, str(tmp_path))
    try:
        run = tmp_path / "run.h5"
        train(TrainConfig(model={"factory": "killer_model:build"}, data={"name": "digits"}, steps=4,
                          checkpoint_every=2), str(run))
    finally:
        sys.path.remove(str(tmp_path))
    results = tmp_path / "run.results.h5"
    subprocess.run([sys.executable, "-m", "lossatlas.cli", "loss", str(run), "--steps", "0"], check=True, env=env,
                   capture_output=True, timeout=120)
    before = results.read_bytes()
    proc = _torchrun(["hessian", str(run), "--steps", "all", "--top-k", "1"], env, timeout=180)
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr or "exitcode" in proc.stderr
    assert results.read_bytes() == before  # no half-written result marked complete


def test_probe_vectors_do_not_depend_on_how_they_are_split():
    cpu = torch.device("cpu")
    whole = probe_vectors(50, range(6), "normal", 3, torch.float64, cpu)
    torch.testing.assert_close(probe_vectors(50, [4, 1], "normal", 3, torch.float64, cpu), whole[:, [4, 1]], rtol=0, atol=0)
    A = torch.diag(torch.linspace(-1, 2, 50, dtype=torch.float64)) + 0.1
    a, b = hutchinson_trace(A, 20, block=16, seed=2), hutchinson_trace(A, 20, block=3, seed=2)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-13)  # sample k is probe k, whatever the blocks


ESTIMATES = """
import sys

import numpy as np
import torch
from torch import nn

from lossatlas.curvature import HessianOperator
from lossatlas.distributed import Distributed
from lossatlas.estimators import hutchinson_trace, hutchpp_trace, slq_density


def estimates(dist):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)
    x, y = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (60,), generator=g)
    op = HessianOperator(model, [(x[:32], y[:32]), (x[32:], y[32:])], "cross_entropy")
    d = slq_density(op, num_probes=3, num_steps=25, grid_len=400, seed=4, dist=dist)
    h = hutchinson_trace(op, 21, block=8, seed=5, dist=dist)
    pp = hutchpp_trace(op, 30, seed=6, dist=dist)
    return {"nodes": d.nodes, "weights": d.weights, "density": d.density, "grid": d.grid,
            "hutchinson": [h.value, h.stderr, h.matvecs], "hutchpp": [pp.value, pp.stderr, pp.matvecs],
            "matvecs": [op.matvecs]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    dist = Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    np.savez(f"{sys.argv[1]}.{dist.rank}.npz", **estimates(dist))
    torch.distributed.destroy_process_group()
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_density_and_trace_with_probes_split_across_ranks_equal_single_process(tmp_path):
    """SLQ (3 runs over 2 ranks), Hutchinson (blocks of 8 split 4 + 4) and Hutch++ (each product's columns split)."""
    script = tmp_path / "estimates.py"
    script.write_text(ESTIMATES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = importlib.util.spec_from_file_location("estimates", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from lossatlas.distributed import Distributed

    single = module.estimates(Distributed())
    for rank in (0, 1):  # every rank assembles the whole answer
        got = np.load(tmp_path / f"out.{rank}.npz")
        for name in ("nodes", "weights", "density", "grid", "hutchinson", "hutchpp"):
            np.testing.assert_allclose(got[name], single[name], rtol=1e-10, atol=1e-12, err_msg=f"rank {rank}: {name}")
        assert got["nodes"].shape == (3, 25) and got["hutchinson"][2] == 21 and got["hutchpp"][2] == 30
        assert 0 < got["matvecs"][0] < single["matvecs"][0]  # each rank applied only its share
