"""``lossatlas import``: a run file from checkpoints a user already has.

``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` — a file that needs
arbitrary objects unpickled is refused, never executed. ``.safetensors`` files are read with
safetensors. Accepted layouts: a plain state_dict, ``{"state_dict": ...}`` (Lightning),
``{"model": ...}`` (nanoGPT), ``{"model_state_dict": ...}``; the ``_orig_mod.`` prefix of
``torch.compile`` and the ``module.`` prefix of DDP are stripped.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import torch

from lossatlas import models, store
from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.finite import NonFiniteWarning, describe_nonfinite, nonfinite_counts
from lossatlas.losses import LOSSES

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PREFIXES = ("_orig_mod.", "module.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict held in a ``.pt``/``.pth``/``.safetensors`` file, unwrapped and de-prefixed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); copy or save the checkpoint again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types, which differ across versions
            raise UserError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = _first_line(exc)
            raise UserError(
                f"{path}: refused — the file needs arbitrary Python objects unpickled, which could run code "
                f"({first}); re-save only the tensors (torch.save(model.state_dict(), ...)) or convert it to .safetensors"
            ) from None
        except Exception as exc:  # torch raises many types on a corrupt or foreign file
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)}); check that the file is "
                            "complete (an empty or cut-off copy fails like this)") from None
    return strip_prefixes(unwrap(raw, path))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty), at most 160 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint: the dict itself or one of ``WRAPPER_KEYS``."""
    if isinstance(raw, Mapping):
        if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            return dict(raw)
        for key in WRAPPER_KEYS:
            inner = raw.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise UserError(
        f"{path}: no state_dict found (expected a dict of tensors, or one under {', '.join(repr(k) for k in WRAPPER_KEYS)})"
    )


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.``/``module.`` prefixes shared by every key."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    # torch.compile inside a wrapper: "model._orig_mod.x"
    return {k.replace("._orig_mod.", "."): v for k, v in state.items()}


def step_from_name(path: str | Path, pattern: str | None = None) -> int:
    """The training step in a file name: the last integer in the stem, or ``pattern``'s first group."""
    if pattern is not None and not pattern:
        raise UserError("--step-pattern is empty; give a regex with one group around the step number, e.g. 'ckpt_(\\d+)'")
    stem = Path(path).name if pattern else Path(path).stem
    if pattern:
        try:
            match = re.search(pattern, stem)
        except re.error as exc:
            raise UserError(f"--step-pattern {pattern!r} is not a valid regular expression ({exc})") from None
        if not match or not match.groups():
            raise UserError(f"{path}: --step-pattern {pattern!r} does not match (it needs one group around the step number)")
        found = match.group(1)
        if found is None or not found.isdigit():
            raise UserError(f"{path}: --step-pattern {pattern!r} gives {found!r} for the step, not a number; put the "
                            "group around the digits only, e.g. 'ckpt_(\\d+)'")
        return int(found)
    numbers = re.findall(r"\d+", stem)
    if not numbers:
        raise UserError(f"{path}: no step number in the file name; rename it (e.g. ckpt_1000.pt) or give --step-pattern")
    return int(numbers[-1])


def import_checkpoints(paths: Iterable[str | Path], output: str | Path, *, model_spec: dict | str,
                       data_spec: dict | str | None = None, loss: str | None = None,
                       step_pattern: str | None = None, overwrite: bool = False) -> list[int]:
    """Write a run file holding the given checkpoints; returns the imported steps."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no checkpoint files given; pass one or more .pt/.pth/.safetensors files")
    if loss is not None:
        check_choice("loss (--loss)", loss, LOSSES, error=UserError)
    output = Path(output)
    for p in paths:  # --force or not: the output must never replace a checkpoint it is made from
        if store.same_file(p, output):
            raise UserError(f"{output}: the output is also an input checkpoint ({p}); writing it would destroy the "
                            "checkpoint before it is read; choose another output path (e.g. -o run.h5)")
    if output.is_dir():
        raise UserError(f"{output}: is a directory; pass a file path for the run")
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --force (overwrite=True) to replace it")
    if store.writer_attached(output):
        raise UserError(f"{output}: another process is writing this run; stop it or write to another file")
    spec = models.normalize_spec(model_spec)
    dspec = models.normalize_spec(data_spec) if data_spec is not None else None
    if dspec is not None:
        models.check_builder(dspec, "data")  # a name no probe could build is refused now, not at every probe
    model = models.build_model(spec)
    param_names = {n for n, _ in model.named_parameters()}
    buffer_names = set(model.state_dict()) - param_names  # persistent buffers
    by_step: dict[int, Path] = {}
    for p in paths:
        step = step_from_name(p, step_pattern)
        if step in by_step:
            raise UserError(f"{p} and {by_step[step]} both have step {step}; give --step-pattern to tell them apart")
        by_step[step] = p
    from lossatlas.analysis.runner import load_state  # the key/shape check with a clear message

    # built under a temporary name and renamed when complete: a failed import leaves no half-written run,
    # and --force replaces an existing output only with the finished new one
    with store.written_aside(output, overwrite=overwrite) as staging:
        with store.RunWriter(staging, model_spec=spec, data_spec=dspec, loss=loss,
                             attrs={"imported_from": json.dumps([str(p) for p in paths][:50])}) as writer:
            for step in sorted(by_step):
                state = load_state_dict(by_step[step])
                load_state(model, state, source=str(by_step[step]))  # validates keys and shapes
                bad = nonfinite_counts(state)
                if bad:  # imported all the same: a diverged checkpoint is worth keeping; probes refuse it
                    warnings.warn(f"{by_step[step]}: checkpoint at step {step} holds {describe_nonfinite(bad)}; "
                                  "imported; probes refuse it unless given --allow-nonfinite",
                                  NonFiniteWarning, stacklevel=2)
                params = {k: v for k, v in state.items() if k in param_names}
                buffers = {k: v for k, v in state.items() if k in buffer_names and k not in param_names}
                writer.write_checkpoint(step, params, buffers)
    return sorted(by_step)
