"""Fast start: ``lossatlas info``, ``plot`` and ``report`` read files without importing torch.

Each command runs through ``lossatlas.cli.main`` in a fresh interpreter (``python -c``), which then reports whether
"torch" is in ``sys.modules``; the run and its results are made once by the module fixture (which may import
torch). The probe catalog that lets them name probes without importing them must equal the probes' own
declarations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 12, 10]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 10-step tiny-MLP run with stored loss and Hessian results."""
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.loss import Loss
    from lossatlas.train import TrainConfig, train

    d = tmp_path_factory.mktemp("fast")
    path = d / "run.h5"
    train(TrainConfig(model=TINY_MLP, data={"name": "digits"}, lr=0.05, steps=10, batch_size=32,
                      checkpoint_every=5), str(path))
    opts = RunOptions(steps="all", max_examples=128)
    run_probe(path, Loss(), opts)
    run_probe(path, HessianProbe(top_k=2, blocks="layers"), RunOptions(steps="last", max_examples=128))
    return path


def _fresh(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli_in_fresh_process(argv: list[str], cwd: Path) -> dict:
    code = ("import json, sys, time\n"
            "t = time.perf_counter()\n"
            "from lossatlas.cli import main\n"
            f"rc = main({argv!r})\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 's': time.perf_counter() - t,\n"
            "                  'modules': sorted(m for m in sys.modules if m.startswith('torch'))[:5]}))\n")
    return _fresh(code, cwd)


@pytest.mark.parametrize("command", ["info", "info_results", "plot_png", "plot_html", "report"])
def test_read_commands_do_not_import_torch(run, tmp_path, command):
    argv = {
        "info": ["info", str(run)],
        "info_results": ["info", str(run.with_suffix(".results.h5"))],
        "plot_png": ["plot", str(run), "hessian", "-o", str(tmp_path / "h.png")],
        "plot_html": ["plot", str(run), "loss", "-o", str(tmp_path / "l.html")],
        "report": ["report", str(run), "-o", str(tmp_path / "r.html")],
    }[command]
    got = _cli_in_fresh_process(argv, tmp_path)
    assert got["rc"] == 0
    assert not got["torch"], f"`lossatlas {' '.join(argv[:1])}` imported torch: {got['modules']}"


def test_info_starts_faster_than_torch_imports(run, tmp_path):
    """``info`` (interpreter start included) takes less time than importing torch alone, and under 2 s here."""
    t = time.perf_counter()
    got = _cli_in_fresh_process(["info", str(run)], tmp_path)
    info_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=120)
    torch_s = time.perf_counter() - t
    assert got["rc"] == 0 and not got["torch"]
    assert info_s < torch_s, f"info took {info_s:.2f} s, importing torch {torch_s:.2f} s"
    assert info_s < 2.0, f"info took {info_s:.2f} s"


def test_open_run_reads_without_torch(run, tmp_path):
    got = _fresh("import json, sys\nimport lossatlas\n"
                 f"r = lossatlas.open_run({str(run)!r})\n"
                 "res = r.results('hessian')\n"
                 "print(json.dumps({'steps': r.steps, 'log': len(r.log['step']), 'n': len(res),\n"
                 "                  'torch': 'torch' in sys.modules}))\n", tmp_path)
    assert got == {"steps": [0, 5, 10], "log": 10, "n": 1, "torch": False}


def test_store_reads_tensors_with_a_lazy_torch(run, tmp_path):
    """Reading metadata stays torch-free; the first checkpoint read imports torch and gives the stored bits."""
    got = _fresh("import json, sys\nfrom lossatlas.store import RunReader\n"
                 f"r = RunReader({str(run)!r})\n"
                 "shapes = r.parameter_shapes(); before = 'torch' in sys.modules\n"
                 "ck = r.checkpoint(10)\n"
                 "print(json.dumps({'before': before, 'after': 'torch' in sys.modules,\n"
                 "                  'shapes': {k: list(v) for k, v in shapes.items()},\n"
                 "                  'tensors': {k: list(t.shape) for k, t in ck.params.items()}}))\n", tmp_path)
    assert got["before"] is False and got["after"] is True
    assert got["shapes"] == got["tensors"] == {"layers.0.weight": [12, 64], "layers.0.bias": [12],
                                               "layers.2.weight": [10, 12], "layers.2.bias": [10]}


def test_bfloat16_round_trips_through_the_lazy_store(tmp_path):
    """The raw-bits path (bfloat16 has no numpy dtype) still round-trips bit for bit."""
    import torch

    from lossatlas.store.h5 import numpy_to_tensor, tensor_to_numpy

    t = torch.randn(7, 3).to(torch.bfloat16)
    arr, name = tensor_to_numpy(t, "x")
    assert name == "bfloat16" and str(arr.dtype) == "uint16"
    back = numpy_to_tensor(arr, name)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_probe_catalog_equals_the_probe_classes():
    """The torch-free catalog that plot/report/info read holds exactly each registered probe's declarations."""
    import lossatlas.probes.registry  # noqa: F401
    from lossatlas.probes import PROBES
    from lossatlas.probes.catalog import CATALOG, FIELDS

    assert set(CATALOG) == set(PROBES), set(CATALOG) ^ set(PROBES)
    order = subprocess.run([sys.executable, "-c", "import lossatlas.probes.registry\n"
                            "from lossatlas.probes import PROBES\nprint(' '.join(PROBES))"],
                           capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert list(CATALOG) == order, "the catalog lists the probes in another order than the registry registers them"
    for name, cls in PROBES.items():
        for f in FIELDS:
            assert getattr(CATALOG[name], f) == getattr(cls, f), (
                f"lossatlas/probes/catalog.py: {name}.{f} is {getattr(CATALOG[name], f)!r}, the class says "
                f"{getattr(cls, f)!r}; update the catalog")


def test_parts_merge_the_same_without_the_probe_classes(run, tmp_path):
    """plot/report merge a part's Results into its owner's from the catalog exactly as from the probe classes."""
    code = ("import json, sys\n"
            "from lossatlas.analysis.parts import with_parts\n"
            "from lossatlas.analysis.reporting import results_by_config\n"
            "from lossatlas.store import ResultsStore\n"
            f"groups = with_parts(results_by_config(ResultsStore({str(run.with_suffix('.results.h5'))!r}, mode='r')))\n"
            "out = {f'{p}/{k}': [[f[0].step, sorted(f[0].values), f[0].config] for f, _ in found if f]\n"
            "       for (p, k), found in groups.items()}\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'groups': out}, default=str))\n")
    fresh = _fresh(code, tmp_path)
    import lossatlas.probes.registry  # noqa: F401  (the classes, in this process)
    from lossatlas.analysis.parts import with_parts
    from lossatlas.analysis.reporting import results_by_config
    from lossatlas.store import ResultsStore

    groups = with_parts(results_by_config(ResultsStore(run.with_suffix(".results.h5"), mode="r")))
    here = {f"{p}/{k}": [[f[0].step, sorted(f[0].values), f[0].config] for f, _ in found if f]
            for (p, k), found in groups.items()}
    assert fresh["torch"] is False
    assert fresh["groups"] == json.loads(json.dumps(here, default=str))
    hessian = next(v for k, v in here.items() if k.startswith("hessian/"))
    assert "block_top_eigenvalues" in hessian[-1][1]  # the per-layer part is merged in
