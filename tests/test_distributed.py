"""The same surface command under torchrun (2 ranks, gloo on loopback) gives the single-process surface bit for bit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lossatlas.probes.distributed import chunks_for_rank
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
