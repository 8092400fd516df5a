"""Train a reference model through the Recorder: the engine of ``lossatlas train`` and the demo."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lossatlas import models
from lossatlas.errors import UserError
from lossatlas.probes.batches import as_batches
from lossatlas.probes.losses import LOSSES, batch_loss
from lossatlas.progress import progress
from lossatlas.recorder import Recorder

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


@dataclass
class TrainConfig:
    """Everything ``lossatlas train`` needs; stored in the run file's attrs as JSON."""

    model: dict = field(default_factory=lambda: {"name": "mlp"})
    data: dict = field(default_factory=lambda: {"name": "digits"})
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    warmup: int = 0
    batch_size: int = 128  # 0 = full-batch gradient descent
    steps: int = 500
    checkpoint_every: int | None = 50
    log_spaced: int | None = None
    grad_clip: float | None = None
    instability: bool = False  # log attention/output-logit, activation and Adam statistics
    seed: int = 0

    def validate(self) -> None:
        """Raise UserError naming the first bad setting."""
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 0:
            raise UserError("steps and lr must be positive and batch_size ≥ 0 (0 means full batch)")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """lr at ``step`` (1-based) under the configured schedule (linear warm-up, then the schedule)."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule in ("cosine", "warmup_cosine"):
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** (3 * step // (cfg.steps + 1)))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, output: str, *, overwrite: bool = False, recorder_kwargs: dict | None = None) -> str:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.steps`` steps, writing ``output`` through the Recorder."""
    cfg.validate()
    model_spec = models.normalize_spec(cfg.model)
    data_spec = models.normalize_spec(cfg.data)
    model = models.build_model(model_spec)
    data = as_batches(models.build_data(data_spec), None)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    n = x_all.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(cfg, model.parameters())
    z_loss = float(getattr(model, "z_loss", 0.0) or 0.0)
    attrs: dict[str, Any] = {"train_config": _json(asdict(cfg))}
    kw = dict(checkpoint_every=cfg.checkpoint_every if cfg.log_spaced is None else None,
              log_spaced=cfg.log_spaced, max_steps=cfg.steps, overwrite=overwrite, attrs=attrs,
              instability=cfg.instability)
    kw.update(recorder_kwargs or {})
    with Recorder(output, model, opt, model_spec=model_spec, data_spec=data_spec, loss=cfg.loss, **kw) as rec:
        rec.checkpoint(0)
        order = torch.randperm(n, generator=gen)
        cursor = 0
        model.train()
        for step in progress(range(1, cfg.steps + 1), total=cfg.steps, desc="train"):
            if cfg.batch_size == 0 or cfg.batch_size >= n:
                xb, yb = x_all, y_all
            else:
                if cursor + cfg.batch_size > n:
                    order, cursor = torch.randperm(n, generator=gen), 0
                idx = order[cursor : cursor + cfg.batch_size]
                cursor += cfg.batch_size
                xb, yb = x_all[idx], y_all[idx]
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            out = model(xb)
            loss = batch_loss(cfg.loss, out, yb)
            total = loss
            if z_loss:
                total = loss + z_loss * torch.logsumexp(out.float(), dim=-1).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            rec.step(step, loss=loss.item())
    return output


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
