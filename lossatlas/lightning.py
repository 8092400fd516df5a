"""A one-line PyTorch Lightning adapter for the Recorder (Lightning is imported lazily).

Example:
    trainer = Trainer(callbacks=[lossatlas.lightning.RecorderCallback("run.h5", model_spec=..., checkpoint_every=100)])

The run's checkpoints must load into the model that ``model_spec`` builds, so the callback records
the module whose parameter and buffer names that model has: usually the network the
LightningModule wraps (``self.model = MyNet()`` records ``0.weight``, not ``model.0.weight``), or
the LightningModule itself when the spec builds it (a factory returning the LightningModule).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lossatlas.errors import UserError
from lossatlas.recorder import Recorder


def _lightning_callback_base() -> type:
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(module).Callback
        except ImportError:
            continue
    raise ImportError("RecorderCallback needs PyTorch Lightning: pip install lightning")


def recorded_module(pl_module: nn.Module, module: str | None = "auto",
                    model_spec: Any = None) -> tuple[nn.Module, str]:
    """``(module, name)``: the part of ``pl_module`` whose checkpoints the run stores ("" for ``pl_module`` itself).

    ``module``: a dotted attribute path (``"model"``, ``"net.backbone"``); None for the LightningModule
    itself; ``"auto"`` (default) for the module whose state_dict keys and shapes equal those of the model
    ``model_spec`` builds (the LightningModule or any submodule, built on the meta device, so no
    memory is spent), or, without a spec, the only child holding every parameter and buffer (else
    the LightningModule). A spec no submodule matches is refused with one line naming the keys.
    """
    if module is None:
        return pl_module, ""
    if module != "auto":
        found: Any = pl_module
        for part in module.split("."):
            found = getattr(found, part, None)
        if not isinstance(found, nn.Module):
            raise UserError(f"RecorderCallback(module={module!r}): the LightningModule has no submodule {module!r}; "
                            "give the attribute that holds the network, e.g. module='model'")
        return found, module
    keys = set(pl_module.state_dict())
    if model_spec is not None:
        wanted = _spec_keys(model_spec)
        if wanted is not None:
            for name, sub in pl_module.named_modules():  # the LightningModule first, then outer to inner
                if _shapes(sub) == wanted:
                    return sub, name
            raise UserError(f"RecorderCallback: no part of {type(pl_module).__name__} has the tensors of the model_spec's "
                            f"model (it has {_listed(wanted)}; the LightningModule has {_listed(_shapes(pl_module))}); "
                            "give the inner network's spec, or module='attribute'")
    children = [(n, m) for n, m in pl_module.named_children() if any(True for _ in m.state_dict())]
    if len(children) == 1:
        name, child = children[0]
        if keys == {f"{name}.{k}" for k in child.state_dict()}:
            return child, name
    return pl_module, ""


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each state_dict key of ``module`` with its tensor's shape."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _listed(shapes: dict[str, tuple[int, ...]]) -> str:
    """The first three keys with their shapes, for an error line."""
    items = [f"{k} {list(v)}" for k, v in list(shapes.items())[:3]]
    return ", ".join(items) + (" …" if len(shapes) > 3 else "")


def _spec_keys(model_spec: Any) -> dict[str, tuple[int, ...]] | None:
    """The state_dict keys and shapes of the model a spec builds (on the meta device); None when it cannot be."""
    from lossatlas import models

    try:
        with torch.device("meta"):
            return _shapes(models.build_model(model_spec))
    except Exception:  # a factory that cannot build on the meta device: no check, no choice by keys
        return None


def RecorderCallback(path: str, *, module: str | None = "auto", **recorder_kwargs: Any):  # noqa: N802
    """A Lightning ``Callback`` that records the run into ``path`` through a ``Recorder``.

    The trainer's first optimizer is the optimizer; the step is ``trainer.global_step``; the logged
    loss is the training step's returned loss. The model recorded is the part of the LightningModule
    that ``model_spec`` builds (see :func:`recorded_module`; ``module`` picks it by attribute name),
    so ``lossatlas hessian run.h5`` loads its checkpoints; its attribute name is stored in the run's
    attrs as ``lightning_module``.
    """
    base = _lightning_callback_base()

    class _RecorderCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.recorder: Recorder | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
            model, name = recorded_module(pl_module, module, recorder_kwargs.get("model_spec"))
            kwargs = {**recorder_kwargs, "attrs": {**dict(recorder_kwargs.get("attrs") or {}), "lightning_module": name}}
            self.recorder = Recorder(path, model, optimizer, **kwargs)
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
