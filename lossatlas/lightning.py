"""A one-line PyTorch Lightning adapter for the Recorder (Lightning is imported lazily).

Example:
    trainer = Trainer(callbacks=[lossatlas.lightning.RecorderCallback("run.h5", model_spec=..., checkpoint_every=100)])
"""

from __future__ import annotations

import importlib
from typing import Any

from lossatlas.recorder import Recorder


def _lightning_callback_base() -> type:
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(module).Callback
        except ImportError:
            continue
    raise ImportError("RecorderCallback needs PyTorch Lightning: pip install lightning")


def RecorderCallback(path: str, **recorder_kwargs: Any):  # noqa: N802 - reads like a class
    """A Lightning ``Callback`` that records the run into ``path`` through a ``Recorder``.

    The LightningModule is the model, the trainer's first optimizer the optimizer; the step is
    ``trainer.global_step``; the logged loss is the training step's returned loss.
    """
    base = _lightning_callback_base()

    class _RecorderCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.recorder: Recorder | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
            self.recorder = Recorder(path, pl_module, optimizer, **recorder_kwargs)
            self.recorder.checkpoint(int(trainer.global_step))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.recorder is None:
                return
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            value = float(loss.detach()) if hasattr(loss, "detach") else (float(loss) if loss is not None else None)
            self.recorder.step(int(trainer.global_step), loss=value)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.recorder is not None:
                self.recorder.close()
                self.recorder = None

        on_exception = on_train_end

    return _RecorderCallback()
