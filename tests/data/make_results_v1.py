"""How tests/data/results_v1.results.h5 was made: run at commit 71a4948, with the results layout from before
every axis carried an HDF5 dimension scale (a value whose axes were partly labelled, as "block_top_eigenvalues"
with a coordinate on "block" but not on "k", made xarray refuse the whole group).

Run from the repository root: ``python tests/data/make_results_v1.py tests/data/results_v1.results.h5``. Running it
today writes the current layout, so the committed file is the one to test against; ``synthetic_results`` rebuilds
its synthetic entries exactly, for the tests to compare the values read back.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SYNTHETIC_KEY = "synthetic"


def synthetic_results():
    """Results with every stored dtype and axis labelling: scalars, bools, strings, partly labelled 2-D, step None."""
    from lossatlas.probes.base import Result

    blocks = Result(probe="hessian_blocks", config={"block_k": 2, "blocks": "layers", "flags": [True, None]}, step=5,
                    values={"block_top_eigenvalues": np.array([[4.0, 1.5], [0.25, 0.125], [3.0, -1.0]]),
                            "converged": np.array([[True, False], [True, True], [False, True]]),
                            "kind": np.array(["weight", "bias", "weight"]), "count": np.int64(7),
                            "residual": np.float32(0.5)},
                    dims={"block_top_eigenvalues": ("block", "k"), "converged": ("block", "k"), "kind": ("block",)},
                    coords={"block": np.array(["layers.0", "layers.2", "head/out"])}, meta={"note": "synthetic"})
    surface = Result(probe="surface", config={"dims": 2, "xrange": [-1.0, 1.0, 4], "yrange": [-0.5, 0.5, 3]},
                     step=10, values={"loss": np.arange(12.0).reshape(3, 4) ** 1.5 / 7.0,
                                      "accuracy": np.linspace(0.0, 1.0, 12).reshape(3, 4),
                                      "direction_x": np.linspace(-1, 1, 6), "direction_y": np.linspace(2, 3, 6)},
                     dims={"loss": ("y", "x"), "accuracy": ("y", "x"), "direction_x": ("param",),
                           "direction_y": ("param",)},
                     coords={"x": np.linspace(-1.0, 1.0, 4), "y": np.linspace(-0.5, 0.5, 3)}, meta={"quadratic": None})
    track = Result(probe="track", config={"k": 2}, step=None,
                   values={"eigenvalues": np.array([[3.0, 2.0], [4.0, 2.5]]), "overlap": np.array([0.9])},
                   dims={"eigenvalues": ("checkpoint", "k"), "overlap": ("pair",)},
                   coords={"checkpoint": np.array([0, 5])}, meta={})
    return [blocks, surface, track]


def main(out: str) -> None:
    from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
    from lossatlas.probes.collapse import NeuralCollapse
    from lossatlas.probes.connectivity import Interpolate
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.sharpness import Sharpness
    from lossatlas.probes.surface import Surface
    from lossatlas.store import ResultsStore, RunReader
    from lossatlas.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run.h5"
        train(TrainConfig(model={"name": "mlp", "kwargs": {"widths": [64, 4, 10]}}, data={"name": "digits"},
                          lr=0.1, steps=10, batch_size=64, checkpoint_every=5), str(run))
        for probe, steps in [
            (HessianProbe(top_k=2, bottom_k=1, blocks="layers", block_k=1), "last"),
            (Sharpness(measures=("grad_norm", "sam"), max_examples=64), "last"),
            (NeuralCollapse(layers="depth"), "last"),
            (Surface(dims=2, xrange=(-1.0, 1.0, 4), yrange=(-0.5, 0.5, 3), quadratic_check=False), "last"),
            (Interpolate(to_step=10, alphas=(0.0, 1.0, 3)), [0]),
        ]:
            run_probe(run, probe, RunOptions(steps=steps, max_examples=64))
        with ResultsStore(default_results_path(run), run_fingerprint=RunReader(run).fingerprint()) as store:
            for r in synthetic_results():
                store.write(r, key=SYNTHETIC_KEY, elapsed_s=1.5)
        shutil.copyfile(default_results_path(run), out)


if __name__ == "__main__":
    main(sys.argv[1])
