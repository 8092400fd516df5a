import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 16, 10]}}
DIGITS = {"name": "digits"}


@pytest.fixture
def tiny_run(tmp_path):
    """A run file from 20 SGD steps of a small MLP on digits, checkpoints every 5 steps (and step 0)."""
    from lossatlas.train import TrainConfig, train

    path = tmp_path / "run.h5"
    cfg = TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=20, batch_size=64, checkpoint_every=5)
    train(cfg, str(path))
    return path
