"""Child process for tests/store/test_store.py's crash test: writes checkpoints in a tight loop.

Usage: python _store_writer_child.py RUN_PATH. After each ``write_checkpoint`` returns (the
checkpoint is flushed) it prints ``ckpt <step>``; the parent SIGKILLs it mid-loop. The tensors of
step i are ``expected_state(i)``, so the parent can check every surviving checkpoint bit for bit.
"""

from __future__ import annotations

import sys

import torch

from lossatlas.store import RunWriter


def expected_state(i: int) -> tuple[dict, dict]:
    """Params and buffers of checkpoint ``i``: seeded random tensors in four float dtypes + an int."""
    g = torch.Generator().manual_seed(i)
    params = {
        "w32": torch.randn(64, 256, generator=g),
        "w64": torch.randn(32, 32, generator=g, dtype=torch.float64),
        "w16": torch.randn(128, generator=g).half(),
        "wbf": torch.randn(128, generator=g).bfloat16(),
    }
    buffers = {"num_batches_tracked": torch.tensor(i, dtype=torch.int64)}
    return params, buffers


def main(path: str) -> None:
    with RunWriter(path, model_spec={"name": "crash-test"}, loss="mse", flush_every=1000) as w:
        for i in range(100_000):
            w.log(i, {"loss": float(i), **({"late": -float(i)} if i >= 2 else {})})  # a late name: SWMR restarts
            params, buffers = expected_state(i)
            w.write_checkpoint(i, params, buffers, attrs={"epoch": i / 10})
            print(f"ckpt {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
