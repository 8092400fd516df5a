"""Train a reference model through the Recorder: the engine of ``lossatlas train`` and the demo."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from lossatlas import models
from lossatlas.batches import as_batches
from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.finite import NonFiniteWarning
from lossatlas.losses import LOSSES, batch_loss
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (and its ``lossatlas train`` flag)."""
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), (dict, str)):
                raise UserError(f"{name} (--{name}) must be a spec like {{\"name\": ..., \"kwargs\": {{...}}}} or a "
                                f"registered name, got {getattr(self, name)!r}")
        for name, known in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            check_choice(f"{name} (--{name})", getattr(self, name), known, error=UserError)
        _number(self, "lr", minimum=0.0, strict=True)
        _number(self, "momentum", minimum=0.0)
        _number(self, "weight_decay", minimum=0.0)
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise UserError(f"betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
        _integer(self, "steps", minimum=1)
        _integer(self, "warmup", minimum=0)
        _integer(self, "batch_size", minimum=0, hint="0 means full-batch gradient descent")
        _integer(self, "checkpoint_every", minimum=1, optional=True, hint="leave it out for no periodic checkpoints")
        _integer(self, "log_spaced", minimum=1, optional=True)
        if self.log_spaced is not None and self.log_spaced > self.steps + 1:
            raise UserError(f"log_spaced (--log-spaced) asks for {self.log_spaced} checkpoints but a run of {self.steps} "
                            f"steps has at most {self.steps + 1} (steps 0 … {self.steps}); ask for fewer")
        _number(self, "grad_clip", minimum=0.0, strict=True, optional=True, hint="leave it out for no clipping")
        _integer(self, "seed", minimum=0)
        if not isinstance(self.instability, bool):
            raise UserError(f"instability must be true or false, got {self.instability!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(cfg: TrainConfig, name: str, *, minimum: float, strict: bool = False, optional: bool = False,
            hint: str = "") -> None:
    """A finite number above (``strict``) or at least ``minimum``; None too when ``optional``."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f"≥ {minimum:g}"
        raise UserError(f"{name} ({_flag(name)}) must be a finite number {bound}, got {value!r}"
                        + (f"; {hint}" if hint else ""))


def _integer(cfg: TrainConfig, name: str, *, minimum: int, optional: bool = False, hint: str = "") -> None:
    """An integer ≥ ``minimum``; None too when ``optional``."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} ({_flag(name)}) must be an integer ≥ {minimum}, got {value!r}"
                        + (f"; {hint}" if hint else ""))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate at ``step`` (1-based) under the configured schedule (linear warm-up, then the schedule)."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule in ("cosine", "warmup_cosine"):
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** (3 * step // (cfg.steps + 1)))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """SGD with momentum, Adam or AdamW over ``params`` with the configured lr, betas and weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, output: str, *, overwrite: bool = False, recorder_kwargs: dict | None = None) -> str:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.steps`` steps, writing ``output`` through the Recorder.

    The first non-finite training loss gives one ``NonFiniteWarning``; training goes on and records it.
    """
    cfg.validate()
    model_spec = models.normalize_spec(cfg.model)
    data_spec = models.normalize_spec(cfg.data)
    model = models.build_model(model_spec)
    data = as_batches(models.build_data(data_spec), None)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    n = x_all.shape[0]
    _check_model_fits(model, x_all, y_all, cfg)  # before the run file is made
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(cfg, model.parameters())
    z_loss = float(getattr(model, "z_loss", 0.0) or 0.0)
    attrs: dict[str, Any] = {"train_config": _json(asdict(cfg))}
    kw = dict(checkpoint_every=cfg.checkpoint_every if cfg.log_spaced is None else None,
              log_spaced=cfg.log_spaced, max_steps=cfg.steps, overwrite=overwrite, attrs=attrs,
              instability=cfg.instability)
    kw.update(recorder_kwargs or {})
    diverged = False
    # after a divergence the telemetry divides NaN by NaN: the one warning below says it plainly instead
    with np.errstate(invalid="ignore", divide="ignore"), \
            Recorder(output, model, opt, model_spec=model_spec, data_spec=data_spec, loss=cfg.loss, **kw) as rec:
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
            if not diverged and not math.isfinite(loss.item()):
                diverged = True  # training goes on and records the divergence; say it once
                warnings.warn(f"{output}: the training loss became {loss.item()} at step {step}: the run diverged; "
                              "lower --lr, or add --grad-clip or --warmup; `lossatlas diagnose` shows what moved "
                              "first", NonFiniteWarning, stacklevel=2)
    return output


def _check_model_fits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
    """Refuse (UserError) a model that does not fit the data, before any file is written.

    One forward pass and loss on two examples, in eval mode and without gradients.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch_loss(cfg.loss, model(x[:2]), y[:2])
    except (ValueError, RuntimeError, IndexError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model {_compact(cfg.model)} does not fit the data {_compact(cfg.data)} "
                        f"(loss {cfg.loss}): {msg}; fix --model (e.g. its input or output width) or --data") from None
    finally:
        model.train(was_training)


def _compact(spec: Any) -> str:
    import json

    return json.dumps(spec, separators=(",", ":"), default=str)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
