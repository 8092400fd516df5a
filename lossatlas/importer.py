"""``lossatlas import``: a run file from checkpoints a user already has.

``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` — a file that needs
arbitrary objects unpickled is refused, never executed. ``.safetensors`` files are read with
safetensors. Accepted layouts: a plain state_dict, ``{"state_dict": ...}`` (Lightning),
``{"model": ...}`` (nanoGPT), ``{"model_state_dict": ...}``; the ``_orig_mod.`` prefix of
``torch.compile`` and the ``module.`` prefix of DDP are stripped.

Hugging Face folders (``save_pretrained`` output, Trainer ``checkpoint-N`` folders) bring their
own model spec (config.json, rebuilt without remote code), their log (``trainer_state.json``)
and Adam's state (``optimizer.pt``, weights-only or skipped). Their tensors, and those of a file
imported with an ``{"hf": ...}`` spec, are keyed as ``from_pretrained`` would load them: weights
tied to another filled in, a missing or extra base-model prefix fixed, the causal-mask buffers
older transformers saved dropped, and on-disk layouts that transformers 5 converts on load
converted by it; each fix is said once, as a warning, after the import.

A checkpoint dict may also carry the optimizer's state beside the model's (``{"model": ...,
"optimizer": ...}`` as nanoGPT saves it, ``"optimizer_state_dict"``, Lightning's
``"optimizer_states"``): it is imported keyed by parameter name — the optimizer's ids follow its
param_groups in order, matched against the model's ``named_parameters()`` order, the order in which
``torch.optim.Optimizer(model.parameters())`` numbers them — or skipped with a warning saying why.

``log`` (``--log FILE``) brings the training log from anywhere: CSV/TSV or JSONL rows with a
``step`` column (plus ``loss`` and any of ``lr``, ``grad_norm``, ``accuracy`` ...), TensorBoard
event files (read with the ``tensorboard`` package, an optional dependency), or a Hugging Face
``trainer_state.json``; common spellings (``train/loss``, ``learning_rate``, ``train_acc``) get the
run log's names, so ``diagnose`` and ``plot training`` read them like a recorded run's.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lossatlas import models, store
from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.finite import NonFiniteWarning, describe_nonfinite, nonfinite_counts
from lossatlas.losses import LOSSES

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim")  # beside the model's tensors
PREFIXES = ("_orig_mod.", "module.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict held in a ``.pt``/``.pth``/``.safetensors`` file, unwrapped and de-prefixed."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Mapping | None]:
    """``(state_dict, optimizer_state_dict or None)`` of a checkpoint file; the model's unwrapped and de-prefixed.

    The optimizer's state is the entry under one of ``OPTIMIZER_KEYS`` in a checkpoint dict (Lightning's
    list ``optimizer_states``: its first optimizer), as torch's ``Optimizer.state_dict()`` holds it.
    """
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
    return strip_prefixes(unwrap(raw, path)), _optimizer_entry(raw)


def _optimizer_entry(raw: object) -> Mapping | None:
    """The optimizer state_dict a checkpoint dict carries beside the model (None when it carries none)."""
    if not isinstance(raw, Mapping):
        return None
    for key in OPTIMIZER_KEYS:
        entry = raw.get(key)
        if isinstance(entry, (list, tuple)) and entry:  # Lightning: one state_dict per optimizer, the first used
            entry = entry[0]
        if isinstance(entry, Mapping):
            return entry
    return None


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


def import_checkpoints(paths: Iterable[str | Path], output: str | Path, *, model_spec: dict | str | None = None,
                       data_spec: dict | str | None = None, loss: str | None = None,
                       step_pattern: str | None = None, overwrite: bool = False, step: int | None = None,
                       log: str | Path | None = None) -> list[int]:
    """Write a run file holding the given checkpoints; returns the imported steps.

    ``paths`` are checkpoint files, or Hugging Face folders: ``save_pretrained`` output (its model
    spec comes from config.json, so ``model_spec`` may be None) and Trainer ``checkpoint-N``
    folders or their parent (steps from the names, the log from the last ``trainer_state.json``,
    Adam's state from ``optimizer.pt``). ``step`` sets the step of a lone checkpoint. ``log`` is a
    training log file (see :func:`read_log`); its rows join (and override, step by step and name by
    name) those of a Trainer folder's ``trainer_state.json``.
    """
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
    paths = expand_folders(paths)
    folders = [p for p in paths if p.is_dir()]
    if folders and len(folders) != len(paths):
        raise UserError("give either checkpoint files or Hugging Face folders (config.json inside), not both")
    if step is not None and len(paths) != 1:
        raise UserError(f"--step sets the step of one checkpoint, but {len(paths)} are given; drop --step "
                        "(steps then come from the names)")
    if model_spec is None:
        if not folders:
            raise UserError("--model is needed for checkpoint files; give the model spec (JSON) they load into, "
                            "or pass a Hugging Face save_pretrained folder, whose config.json is the spec")
        model_spec = hf_model_spec(folders[-1])
    spec = models.normalize_spec(model_spec)
    dspec = models.normalize_spec(data_spec) if data_spec is not None else None
    if dspec is not None:
        models.check_builder(dspec, "data")  # a name no probe could build is refused now, not at every probe
    extra_log = read_log(log) if log is not None else {}  # read before anything is built: a bad log fails fast
    if extra_log and not any("loss" in row for row in extra_log.values()):
        names = sorted({n for row in extra_log.values() for n in row})
        warnings.warn(f"{log}: the log has no loss (found {', '.join(names[:6])}); diagnose needs one: name the "
                      "training loss column 'loss'", stacklevel=2)
    model = models.build_model(spec)
    param_names = {n for n, _ in model.named_parameters()}
    buffer_names = set(model.state_dict()) - param_names  # persistent buffers (and tied copies of parameters)
    by_step: dict[int, Path] = {}
    for p in paths:
        s = step if step is not None else _step_of(p, step_pattern, lone=len(paths) == 1)
        if s in by_step:
            raise UserError(f"{p} and {by_step[s]} both have step {s}; give --step-pattern to tell them apart")
        by_step[s] = p
    from lossatlas.analysis.runner import load_state  # the key/shape check with a clear message

    steps = sorted(by_step)
    hf_model = bool(folders) or "hf" in spec  # a transformers model: its key layouts and tied weights apply
    notes: dict[str, list[str]] = {}  # what was fixed in the checkpoints' keys, said once after the import
    rows = trainer_log(by_step[steps[-1]]) if folders else {}
    for t, row in extra_log.items():
        rows.setdefault(t, {}).update(row)
    optimizers: dict[int, tuple | None] = {}
    for s in steps:  # read first: the run's header names the optimizer
        if folders and (by_step[s] / "optimizer.pt").is_file():
            optimizers[s] = load_optimizer(by_step[s] / "optimizer.pt", model)
    optimizer_spec = next((o[1] for o in optimizers.values() if o is not None and o[1] is not None), None)
    first = read_checkpoint(by_step[steps[0]]) if not folders else None  # its optimizer entry names the optimizer
    if first is not None and first[1] is not None:
        mapped = map_optimizer(first[1], model)
        optimizer_spec = mapped[1] if not isinstance(mapped, str) else None
    skipped: dict[str, list[str]] = {}  # why an optimizer entry was left out → the checkpoints it was left out of
    # built under a temporary name and renamed when complete: a failed import leaves no half-written run,
    # and --force replaces an existing output only with the finished new one
    with store.written_aside(output, overwrite=overwrite) as staging:
        with store.RunWriter(staging, model_spec=spec, data_spec=dspec, loss=loss, optimizer=optimizer_spec,
                             attrs={"imported_from": json.dumps([str(p) for p in paths][:50])}) as writer:
            for s in steps:
                source = by_step[s]
                opt = optimizers.get(s)
                if source.is_dir():
                    state = load_hf_weights(source)
                else:  # one file at a time (the first one was read already), its optimizer entry mapped to names
                    (state, raw_opt), first = (first if s == steps[0] and first is not None
                                               else read_checkpoint(source)), None
                    mapped = map_optimizer(raw_opt, model) if raw_opt is not None else None
                    if isinstance(mapped, str):
                        skipped.setdefault(mapped, []).append(str(source))
                    opt = mapped if isinstance(mapped, tuple) else None
                if hf_model:
                    state = converted_layout(model, fill_tied(model, fit_hf_keys(model, state, notes)), notes)
                load_state(model, state, source=str(source))  # validates keys and shapes
                bad = nonfinite_counts(state)
                if bad:  # imported all the same: a diverged checkpoint is worth keeping; probes refuse it
                    warnings.warn(f"{source}: checkpoint at step {s} holds {describe_nonfinite(bad)}; "
                                  "imported; probes refuse it unless given --allow-nonfinite",
                                  NonFiniteWarning, stacklevel=2)
                params = {k: v for k, v in state.items() if k in param_names}
                buffers = {k: v for k, v in state.items() if k in buffer_names and k not in param_names}
                lrs = [row["lr"] for t, row in sorted(rows.items()) if t <= s and "lr" in row]
                writer.write_checkpoint(s, params, buffers, optimizer_state=opt[0] if opt else None,
                                        attrs={"lr": lrs[-1]} if lrs else None)
            for t in sorted(rows):
                writer.log(t, rows[t])
    for why, sources in skipped.items():
        more = f" and {len(sources) - 1} more checkpoint(s)" if len(sources) > 1 else ""
        warnings.warn(f"{sources[0]}{more}: optimizer state skipped ({why}); the checkpoints are imported without it",
                      stacklevel=2)
    for what, keys in notes.items():
        warnings.warn(f"{paths[0] if len(paths) == 1 else paths[0].parent}: {what} ({', '.join(keys[:3])}"
                      f"{' …' if len(keys) > 3 else ''})", stacklevel=2)
    return steps


def _step_of(path: Path, pattern: str | None, *, lone: bool) -> int:
    """A checkpoint's step: ``checkpoint-N`` folders give N, a lone other folder 0, files their name."""
    match = _TRAINER_DIR.match(path.name) if path.is_dir() else None
    if match and pattern is None:
        return int(match.group(1))
    if path.is_dir() and lone and pattern is None:
        return 0
    return step_from_name(path, pattern)


# --- Hugging Face folders: ``save_pretrained`` output and Trainer ``checkpoint-N`` folders ---------------------

_TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")
_NOT_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
# (Auto class, transformers' table of the architectures it builds, name suffixes for when that table is absent)
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
     ("ForSequenceClassification",)),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", ("ForImageClassification",)),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("ForTokenClassification",)),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", ("ForQuestionAnswering",)),
)
# log_history keys kept, with their name in the run's log; ``eval_*`` keys are kept as they are
_LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "epoch": "epoch"}


def is_hf_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: a directory holding ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def expand_folders(paths: list[Path]) -> list[Path]:
    """Inputs with each Trainer output folder (no config.json, ``checkpoint-N`` inside) replaced by its checkpoints."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir() or is_hf_folder(p):
            out.append(p)
            continue
        inner = sorted((d for d in p.iterdir() if _TRAINER_DIR.match(d.name) and is_hf_folder(d)),
                       key=lambda d: int(_TRAINER_DIR.match(d.name).group(1)))  # type: ignore[union-attr]
        if not inner:
            raise UserError(f"{p}: a directory with neither a config.json (a save_pretrained folder) nor "
                            "checkpoint-N folders (a Trainer output); pass checkpoint files or such a folder")
        out.extend(inner)
    return out


def read_json(path: Path, what: str) -> dict:
    """A JSON object read from ``path``; UserError naming ``what`` when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a readable {what} ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a {what} must hold a JSON object, got {type(value).__name__}")
    return value


def auto_class_for(architecture: str | None) -> str:
    """The ``AutoModel*`` class that builds ``architecture`` (e.g. GPT2LMHeadModel → AutoModelForCausalLM)."""
    if not architecture:
        return "AutoModel"
    try:
        from transformers.models.auto import modeling_auto as tables
    except ImportError:
        tables = None
    for auto_class, table, _ in _AUTO_CLASSES:
        names = getattr(tables, table, {}) if tables is not None else {}
        for v in names.values():
            if architecture == v or (isinstance(v, (tuple, list)) and architecture in v):
                return auto_class
    for auto_class, _, suffixes in _AUTO_CLASSES:
        if architecture.endswith(suffixes):
            return auto_class
    return "AutoModel"


def hf_model_spec(folder: Path) -> dict:
    """``{"hf": {"auto_class": ..., "config": ...}}`` from a folder's config.json (configuration only)."""
    config = read_json(folder / "config.json", "Hugging Face config.json")
    if not isinstance(config.get("model_type"), str):
        raise UserError(f"{folder / 'config.json'}: no 'model_type'; it is not a transformers model config")
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    return {"hf": {"auto_class": auto_class_for(arch),
                   "config": {k: v for k, v in config.items() if k not in _NOT_CONFIG}}}


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder: one file, or the shards named by its index."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return load_state_dict(folder / single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: no 'weight_map' of tensor name → shard file; save the model again")
        state: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(weight_map.values()):
            if Path(shard).name != shard:  # shards live in the folder itself, never elsewhere
                raise UserError(f"{index}: shard {shard!r} is not a file name inside {folder}")
            state.update(load_state_dict(folder / shard))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise UserError(f"{index}: tensors {', '.join(missing[:5])} are in no shard; the folder is incomplete")
        return state
    raise UserError(f"{folder}: no model.safetensors, sharded model-*.safetensors with model.safetensors.index.json, "
                    "or pytorch_model.bin; save the model with save_pretrained")


# Causal-mask buffers that older transformers kept in the state_dict (GPT-2's ``attn.bias``, a (1, 1, n, n)
# lower-triangular mask, and ``attn.masked_bias``, the scalar -1e4): today's models build their masks themselves.
_MASK_BUFFER = re.compile(r"(?:^|\.)(?:attn|attention|self_attn|crossattention)\.(?:bias|masked_bias)$")


def fit_hf_keys(model: torch.nn.Module, state: dict[str, torch.Tensor],
                notes: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors keyed as ``model`` names them, as ``from_pretrained`` would load them.

    Two fixes, each applied only to keys ``model`` lacks: the base-model prefix (``transformer.`` for
    GPT-2, ``model.`` for Llama, ``bert.`` ...) added to a base model's keys loaded into a model with a
    head (old hub GPT-2 files hold ``h.0.attn.c_attn.weight``), or removed for the reverse; and mask
    tensors dropped — the legacy causal masks (``attn.bias``/``attn.masked_bias`` of 0 or 4 dimensions)
    and what the model class itself declares safe to ignore (``_keys_to_ignore_on_load_unexpected``,
    names that are not mask names only).
    Each fix is recorded in ``notes`` (message → keys) for the caller to say once.
    """
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and not all(k in expected for k in state):
        head = prefix + "."
        model_has = any(k.startswith(head) for k in expected)
        state_has = any(k.startswith(head) for k in state)
        if model_has and not state_has and any(head + k in expected for k in state):
            moved = [k for k in state if head + k in expected or (_MASK_BUFFER.search(k) and k not in expected)]
            state = {(head + k if k in moved else k): v for k, v in state.items()}
            _note(notes, f"added the '{head}' prefix to a base model's keys", moved)
        elif state_has and not model_has and any(k[len(head):] in expected for k in state if k.startswith(head)):
            moved = [k for k in state if k.startswith(head) and k not in expected]
            state = {(k[len(head):] if k in moved else k): v for k, v in state.items()}
            _note(notes, f"removed the '{head}' prefix the model does not use", moved)
    extra = [k for k in state if k not in expected]
    masks = [k for k in extra if _MASK_BUFFER.search(k) and state[k].dim() in (0, 4)]  # a scalar or (1, 1, n, n)
    _note(notes, "ignored causal-mask buffers that older transformers saved in the state_dict; the model "
                 "builds its masks itself", masks)
    patterns = _ignored_by_class(model)
    # what the class says from_pretrained drops (old rotary inv_freq buffers, unused heads); a tensor named like a
    # mask but not shaped like one is no mask, and stays an error
    ignored = [k for k in extra if not _MASK_BUFFER.search(k) and any(p.search(k) for p in patterns)]
    _note(notes, f"ignored tensors that {type(model).__name__} declares unused (as from_pretrained does)", ignored)
    dropped = set(masks) | set(ignored)
    return {k: v for k, v in state.items() if k not in dropped}


def _ignored_by_class(model: torch.nn.Module) -> list[re.Pattern]:
    """The patterns of the keys that a transformers model class lets ``from_pretrained`` drop unread."""
    declared = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None)
    return [re.compile(p) for p in declared if isinstance(p, str)] if isinstance(declared, (list, tuple)) else []


def converted_layout(model: torch.nn.Module, state: dict[str, torch.Tensor],
                     notes: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """``state`` renamed (or split/fused) from a checkpoint's on-disk layout to ``model``'s, by transformers itself.

    transformers 5 saves some architectures under their original checkpoint names (ViT's
    ``encoder.layer.0.attention.attention.query`` for the module ``layers.0.attention.q_proj``) and
    converts them on load; the conversion is left to ``from_pretrained(None, config=..., state_dict=...)``,
    which builds no remote code and reads no file. ``state`` is returned unchanged when its keys already
    are the model's, when it holds a key that ``from_pretrained`` would drop unread, or when the
    conversion leaves a key missing, unexpected or of the wrong shape (the key check that follows names
    them).
    """
    expected = model.state_dict()
    if set(state) == set(expected) or not hasattr(type(model), "from_pretrained"):
        return state
    patterns = _ignored_by_class(model)
    if any(p.search(k) for k in state for p in patterns):  # from_pretrained would drop it without a word
        return state
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_error()  # its load report is read below, not printed
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded, info = type(model).from_pretrained(None, config=model.config, state_dict=dict(state),
                                                       output_loading_info=True)
    except Exception:  # any refusal: the key check that follows explains the mismatch
        return state
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
        return state
    out = {k: v.detach() for k, v in loaded.state_dict().items()}
    if set(out) != set(expected):
        return state
    _note(notes, "renamed the checkpoint's keys to the model's with transformers' own conversion (as "
                 "from_pretrained does)", sorted(k for k in state if k not in expected))
    return out


def _note(notes: dict[str, list[str]] | None, what: str, keys: list[str]) -> None:
    """Record ``keys`` under the message ``what`` (each key once)."""
    if notes is not None and keys:
        found = notes.setdefault(what, [])
        found.extend(k for k in keys if k not in found)


def fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus each key the file left out because the model ties it to another (e.g. lm_head to wte)."""
    expected = model.state_dict()
    out = dict(state)
    for k, t in expected.items():
        if k in out:
            continue
        for j, s in expected.items():  # the same storage in the rebuilt model: a tied weight
            if j in state and t.numel() and s.data_ptr() == t.data_ptr() and s.shape == t.shape:
                out[k] = state[j]
                break
    return out


def trainer_log(folder: Path) -> dict[int, dict[str, float]]:
    """``trainer_state.json``'s log_history as rows by step: loss, lr, grad_norm, epoch and eval_* entries."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return {}
    return _trainer_rows(path)


def _trainer_rows(path: Path) -> dict[int, dict[str, float]]:
    """The rows of one ``trainer_state.json`` file (see :func:`trainer_log`)."""
    history = read_json(path, "trainer_state.json").get("log_history")
    if not isinstance(history, list):
        raise UserError(f"{path}: 'log_history' must be a list of log entries")
    rows: dict[int, dict[str, float]] = {}
    for entry in history:
        step = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            continue
        for key, value in entry.items():
            name = _LOG_KEYS.get(key, key if key.startswith("eval_") else None)
            if name and isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.setdefault(step, {})[name] = float(value)
    return rows


# --- training logs from anywhere: CSV/TSV, JSONL, TensorBoard event files, trainer_state.json ------------------

# common spellings → the run log's names (what the Recorder writes, and diagnose / plot training read)
_LOG_ALIASES = {
    "loss": "loss", "train_loss": "loss", "training_loss": "loss", "train/loss": "loss", "loss/train": "loss",
    "train_loss_step": "loss", "lr": "lr", "learning_rate": "lr", "train/learning_rate": "lr", "train/lr": "lr",
    "lr-sgd": "lr", "lr-adam": "lr", "lr-adamw": "lr", "grad_norm": "grad_norm", "gradient_norm": "grad_norm",
    "train/grad_norm": "grad_norm", "accuracy": "accuracy", "acc": "accuracy", "train_acc": "accuracy",
    "train_accuracy": "accuracy", "train/acc": "accuracy", "train/accuracy": "accuracy",
}
_STEP_COLUMNS = ("step", "global_step", "iteration", "iter", "iter_num")
_NOT_LOGGED = ("epoch_float", "wall_time", "walltime", "timestamp", "time")  # clocks are not training signals


def log_name(raw: str) -> str:
    """The run log's name for a logged quantity: an alias above, or the name with '/' and spaces as '_'."""
    key = raw.strip().lower()
    return _LOG_ALIASES.get(key, re.sub(r"[/\s]+", "_", raw.strip()))


def read_log(path: str | Path) -> dict[int, dict[str, float]]:
    """A training log file as rows by step: ``{step: {name: value}}``, names as :func:`log_name` gives them.

    Formats, by name and content: a Hugging Face ``trainer_state.json`` (its log_history, as in a Trainer
    folder); ``.csv``/``.tsv`` with a header row; ``.jsonl``/``.ndjson`` (one JSON object a line) or a
    ``.json`` list of objects; a TensorBoard event file (``events.out.tfevents.*``) or a folder of them
    (scalars, read with the ``tensorboard`` package). Rows need a step column (``step``, ``global_step``,
    ``iteration``, ``iter``, ``iter_num``) holding non-negative integers; rows of one step merge (the
    last value of a name wins); empty cells are not logged; a column holding text is left out with a
    warning. Refused with one line when nothing numeric besides the step is found.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such log file; give a CSV/JSONL file, a TensorBoard event file or folder, "
                        "or a trainer_state.json")
    if path.is_dir():
        if (path / "trainer_state.json").is_file():
            return _nonempty(_trainer_rows(path / "trainer_state.json"), path)
        if any(path.rglob("*tfevents*")):
            return _nonempty(_tensorboard_rows(path), path)
        raise UserError(f"{path}: a folder with no trainer_state.json and no TensorBoard event files "
                        "(events.out.tfevents.*); give the log file itself")
    if "tfevents" in path.name:
        return _nonempty(_tensorboard_rows(path), path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _read_json_any(path)
        if isinstance(data, Mapping) and "log_history" in data:
            return _nonempty(_trainer_rows(path), path)
        if not isinstance(data, list):
            raise UserError(f"{path}: a JSON log must be a list of objects with a 'step' (or a trainer_state.json "
                            "with 'log_history'); write one row per step")
        return _nonempty(_records(data, path), path)
    if suffix in (".jsonl", ".ndjson"):
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {number} is not JSON ({err.msg}); write one JSON object a line") from None
        return _nonempty(_records(records, path), path)
    if suffix in (".csv", ".tsv", ".txt"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            text = f.read()
        delimiter = "\t" if suffix == ".tsv" or ("\t" in text.split("\n", 1)[0] and "," not in text.split("\n", 1)[0]) else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        return _nonempty(_records(rows, path, text_cells=True), path)
    raise UserError(f"{path}: unknown log format {path.suffix or '(no suffix)'!r}; give a .csv, .tsv, .jsonl, "
                    "trainer_state.json, or a TensorBoard events.out.tfevents.* file")


def _read_json_any(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); check the file") from None


def _records(records: list, path: Path, *, text_cells: bool = False) -> dict[int, dict[str, float]]:
    """Rows by step from dicts (CSV rows when ``text_cells``: numbers as text, '' for not logged)."""
    if not records:
        return {}
    if not all(isinstance(r, Mapping) for r in records):
        raise UserError(f"{path}: every log row must be an object like {{\"step\": 10, \"loss\": 2.3}}")
    columns = list(dict.fromkeys(k for r in records for k in r if isinstance(k, str)))
    step_col = next((c for c in columns if c.strip().lower() in _STEP_COLUMNS), None)
    if step_col is None:
        raise UserError(f"{path}: no step column (one of {', '.join(_STEP_COLUMNS)}) among "
                        f"{', '.join(columns[:8]) or 'no columns'}; add the training step of each row")
    rows: dict[int, dict[str, float]] = {}
    text_columns: list[str] = []
    for number, record in enumerate(records, 1):
        raw_step = record.get(step_col)
        if raw_step in (None, ""):
            continue  # a row logged by epoch only: no step to put it at
        value = _number(raw_step, text_cells)
        if value is None or not math.isfinite(value) or value < 0 or value != int(value):
            raise UserError(f"{path}: row {number} has step {raw_step!r}, not a non-negative integer; "
                            "the step column must count training steps")
        row = rows.setdefault(int(value), {})
        for column, cell in record.items():
            if column == step_col or not isinstance(column, str) or column.strip().lower() in _NOT_LOGGED \
                    or cell in (None, "") or column in text_columns:
                continue
            number_value = _number(cell, text_cells)
            if number_value is None:
                text_columns.append(column)
                continue
            row[log_name(column)] = number_value
    if text_columns:
        for row in rows.values():  # a column is numbers throughout or left out: no half-logged signals
            for column in text_columns:
                row.pop(log_name(column), None)
        warnings.warn(f"{path}: column(s) {', '.join(text_columns[:5])} hold text, not numbers; left out of the log",
                      stacklevel=3)
    return {t: r for t, r in rows.items() if r}


def _number(cell: Any, text: bool) -> float | None:
    """A cell as a float (NaN/inf kept: a divergence is worth importing); None when it is not a number."""
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        return float(cell)
    if text and isinstance(cell, str):
        try:
            return float(cell.strip())
        except ValueError:
            return None
    return None


def _tensorboard_rows(path: Path) -> dict[int, dict[str, float]]:
    """The scalars of a TensorBoard event file (or a folder of them) as rows by step, read with tensorboard's reader."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UserError(f"{path}: reading TensorBoard event files needs the tensorboard package; "
                        "pip install tensorboard (or export the scalars to CSV and pass that)") from None
    files = sorted(path.rglob("*tfevents*")) if path.is_dir() else [path]
    rows: dict[int, dict[str, float]] = {}
    for file in files:  # each file on its own: a folder of runs (one per subfolder) is read whole
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})  # 0: keep every scalar, not a sample
        try:
            acc.Reload()
        except Exception as exc:  # a truncated or foreign file: tensorboard raises its own error types
            raise UserError(f"{file}: not a readable TensorBoard event file ({_first_line(exc)})") from None
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                if event.step >= 0:
                    rows.setdefault(int(event.step), {})[log_name(tag)] = float(event.value)
    return rows


def _nonempty(rows: dict[int, dict[str, float]], path: Path) -> dict[int, dict[str, float]]:
    if not rows:
        raise UserError(f"{path}: the log holds no numeric values with a step; it needs a step column and a loss "
                        "(e.g. step,loss,lr)")
    return rows


def _decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names in Trainer's two optimizer groups: with weight decay (not bias or norm), then without."""
    norm_params = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                   for n, _ in mod.named_parameters(recurse=False)}
    no_decay = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n in names if n not in norm_params and not no_decay.search(n.lower())]
    return decay, [n for n in names if n not in decay]


def load_optimizer(path: Path, model: torch.nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """An ``optimizer.pt`` (a torch optimizer state_dict) keyed by parameter name, and its spec; None with a warning.

    Read with ``weights_only=True``; mapped by :func:`map_optimizer`.
    """
    def skip(why: str) -> None:
        warnings.warn(f"{path}: optimizer state skipped ({why}); the checkpoint is imported without it", stacklevel=3)

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled object, a corrupt file: nothing is executed, the state is left out
        skip(_first_line(exc))
        return None
    mapped = map_optimizer(raw, model)
    if isinstance(mapped, str):
        skip(mapped)
        return None
    return mapped


def map_optimizer(raw: object, model: torch.nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None] | str:
    """A torch optimizer state_dict keyed by parameter name, and its spec; or the reason it cannot be (a str).

    ``Optimizer.state_dict()`` numbers the parameters 0, 1, … in the order of its param_groups and,
    within a group, of the parameters given to it; they are matched to ``model.named_parameters()``
    in order (the optimizer built as ``Optimizer(model.parameters())``), or to Trainer's decay/no-decay
    split when its two groups match it. Every state tensor must have its parameter's shape (scalars
    such as ``step`` excepted). The spec names Adam/AdamW (``exp_avg_sq`` in the state; AdamW when a
    group has weight decay) or SGD (``momentum`` in the groups) with the constructor's hyper-parameters.
    """
    groups = raw.get("param_groups") if isinstance(raw, Mapping) else None
    states = raw.get("state") if isinstance(raw, Mapping) else None
    if not isinstance(groups, list) or not isinstance(states, Mapping) or \
            not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return "not a torch optimizer state_dict (no 'state' and 'param_groups')"
    ids = [i for g in groups for i in g["params"]]
    if not ids:
        return "its param_groups list no parameters"
    params = dict(model.named_parameters())
    orders = [list(params)]
    decay, no_decay = _decay_split(model)
    if len(groups) == 2 and len(groups[0]["params"]) == len(decay):
        orders.insert(0, decay + no_decay)
    for names in orders:
        if len(names) != len(ids):
            continue
        by_name = {}
        for i, name in zip(ids, names):
            st = states.get(i, states.get(str(i), {}))  # a JSON round trip turns the ids into strings
            tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
                       for k, v in (st.items() if isinstance(st, Mapping) else ())
                       if isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))}
            if any(v.dim() and v.shape != params[name].shape for v in tensors.values()):
                break
            if tensors:
                by_name[name] = tensors
        else:
            return by_name, _optimizer_spec(groups, by_name)
    return (f"its {len(ids)} parameter ids do not match the model's {len(params)} parameters "
            "in named_parameters() order by count and shape")


def _optimizer_spec(groups: list, by_name: Mapping[str, Mapping[str, torch.Tensor]]) -> dict | None:
    """``{"name": "Adam" | "AdamW" | "SGD", "defaults": {...}}`` read from the param_groups (None when unknown)."""
    # the constructor's lr: a torch LR scheduler keeps it as "initial_lr" and overwrites "lr"
    g = {**groups[0], "lr": groups[0].get("initial_lr", groups[0].get("lr"))}
    if any("exp_avg_sq" in v for v in by_name.values()):
        decayed = any(_number_or_list(gr.get("weight_decay")) for gr in groups)
        name, keys = ("AdamW" if decayed else "Adam"), ("lr", "betas", "eps", "weight_decay")
    elif "momentum" in g:
        name, keys = "SGD", ("lr", "momentum", "dampening", "weight_decay")
    else:
        return None
    defaults: dict[str, Any] = {k: _number_or_list(g[k]) for k in keys if _number_or_list(g.get(k)) is not None}
    if name == "SGD" and isinstance(g.get("nesterov"), bool):
        defaults["nesterov"] = g["nesterov"]
    return {"name": name, "defaults": defaults}


def _number_or_list(value: object) -> float | list[float] | None:
    """A JSON-able hyper-parameter: a number or a list of numbers (tensors read as such); None otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None
