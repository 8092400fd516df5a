import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 16, 10]}}
DIGITS = {"name": "digits"}


@pytest.fixture(autouse=True, scope="session")
def _private_config_dir(tmp_path_factory):
    """Signing keys go to a fresh folder, never the real ~/.config."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path_factory.mktemp("lossatlas-config")))
        yield


@pytest.fixture
def tiny_run(tmp_path):
    """A run file from 20 SGD steps of a small MLP on digits, checkpoints every 5 steps (and step 0)."""
    from lossatlas.train import TrainConfig, train

    path = tmp_path / "run.h5"
    cfg = TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=20, batch_size=64, checkpoint_every=5)
    train(cfg, str(path))
    return path


@pytest.fixture(params=[(a, loss) for a in ("mlp", "cnn", "transformer") for loss in ("cross_entropy", "mse")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def reference_case(request):
    """A float64 MLP / small CNN / tiny transformer (≤ 159 parameters) × cross-entropy / MSE on unequal
    batches of 7, 5 and 3 examples (sequences), for checks against the dense references in reference.py."""
    from reference import build_case

    return build_case(*request.param)
