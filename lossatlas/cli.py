"""The ``lossatlas`` command: one subcommand per job.

Exit codes: 0 success; 2 bad input, with one line ``lossatlas: error: what is wrong; how to fix it``
on stderr (also for an output that cannot be written: a missing or read-only folder, a full disk);
1 an internal error, with its traceback. Warnings are one line each, ``lossatlas: warning: ...``.
Probe subcommands are built from the registered probe dataclasses, so the API and the CLI cannot drift.

``--json`` output is strict JSON (RFC 8259): a NaN or ±inf number is written as ``null`` and the
top-level member ``"nonfinite"`` maps the JSON Pointer of each such value (e.g.
``/steps/0/values/lambda_max``) to ``"nan"``, ``"inf"`` or ``"-inf"``; ``{}`` when every number
is finite (``lossatlas.finite.strict_json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Sequence

from lossatlas._version import __version__
from lossatlas.errors import UserError

COMMON = {"steps", "step", "data", "batch_size", "max_examples", "max_tokens", "results", "dtype", "device", "force", "json", "quiet", "run",
          "model", "trust_factory", "allow_nonfinite", "loss", "output"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Warnings are held until the command ends: printed after it succeeds, dropped when it fails with its one
    error line (exit 2), so that line is all a refused command prints.
    """
    from lossatlas.finite import NonFiniteWarning

    held: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *rest, **kw: held.append(_warning_line(message))
            warnings.simplefilter("always", NonFiniteWarning)  # every diverged checkpoint, not the first only
            parser = build_parser()
            args = parser.parse_args(list(argv) if argv is not None else None)
            from lossatlas import progress

            progress.set_quiet(bool(getattr(args, "quiet", False)))
            if not hasattr(args, "func"):
                parser.print_help()
                raise UserError("no subcommand given; choose one of the subcommands listed above "
                                "(e.g. `lossatlas demo`), or see `lossatlas --help`")
            code = int(args.func(args) or 0)
        if code != 2:  # exit 2 has printed its own one error line
            _print_lines(held)
        return code
    except UserError as exc:
        print(f"lossatlas: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _print_lines(held)
        print("lossatlas: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the file system refused: a missing or read-only folder, a full disk, a folder for a file
        print(f"lossatlas: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except BaseException:  # an internal error: its traceback follows what was warned before it
        _print_lines(held)
        raise


def _one_line(text: str) -> str:
    """A message on one line: its lines joined with '; '."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _os_error_line(exc: OSError) -> str:
    """``PATH: what the system said; what to check``."""
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    return f"{where}: {what}; {_os_fix(exc)}" if where else f"{what}; {_os_fix(exc)}"


def _os_fix(exc: OSError) -> str:
    """What to do about an OSError, by its errno."""
    import errno

    return {errno.ENOSPC: "free some disk space or write elsewhere",
            errno.EACCES: "check the folder's permissions or write elsewhere",
            errno.EPERM: "check the folder's permissions or write elsewhere",
            errno.EROFS: "write to a writable file system",
            errno.ENOENT: "check the path, and create the folder first if it is missing",
            errno.EISDIR: "give a file path, not a folder",
            errno.ENOTDIR: "a part of the path is a file, not a folder: check the path"}.get(
        exc.errno, "check the path and the folder's permissions")


def _warning_line(message: Warning | str) -> str:
    """A warning as one line (the CLI's stderr holds only lossatlas: lines)."""
    return f"lossatlas: warning: {_one_line(str(message))}"


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``lossatlas`` argument parser: one sub-command per action, one per registered probe."""
    import lossatlas.probes.registry  # noqa: F401  (registers every probe)
    from lossatlas.probes import PROBES

    parser = _Parser(prog="lossatlas", description="Loss landscapes, curvature and training dynamics from checkpoints.")
    parser.add_argument("--version", action="version", version=f"lossatlas {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="train the reference MLP on digits and run every probe and figure")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    p.add_argument("--force", action="store_true", help="overwrite files in the output folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a reference model through the Recorder")
    p.add_argument("config", nargs="?", help="optional JSON file (or JSON text) of training settings; flags override it")
    p.add_argument("-o", "--output", required=True, help="the run file to write")
    p.add_argument("--model", help='model spec, e.g. \'{"name": "mlp", "kwargs": {"widths": [64, 128, 10]}}\'')
    p.add_argument("--data", help='data spec, e.g. \'{"name": "digits"}\'')
    p.add_argument("--loss")
    p.add_argument("--optimizer", help="sgd | adam | adamw")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", help="constant | cosine | warmup_cosine | step")
    p.add_argument("--warmup", type=int)
    p.add_argument("--batch-size", type=int, help="0 = full-batch gradient descent")
    p.add_argument("--steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-spaced", type=int, help="this many log-spaced checkpoints instead of every k steps")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--instability", action="store_true", default=None,
                   help="also log attention/output-logit, activation and Adam statistics")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("import", help="make a run file from existing .pt/.pth/.safetensors checkpoints or "
                                      "Hugging Face folders (save_pretrained, Trainer checkpoint-N)")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, save_pretrained folders, or a Trainer output "
                                                  "folder holding checkpoint-N folders")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model", help="model spec (JSON) that the checkpoints load into (a Hugging Face folder's "
                                   "config.json is used when not given)")
    p.add_argument("--step", type=_int_at_least(0), help="the step of a lone checkpoint (default: from its name; "
                                                         "0 for a lone save_pretrained folder)")
    p.add_argument("--data", help="data spec (JSON)")
    p.add_argument("--loss", help="cross_entropy | mse | half_sse | causal_lm")
    p.add_argument("--step-pattern", help="regex with one group around the step number in the file name")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("info", help="what a run file holds, and whether a writer is attached")
    p.add_argument("run", help="a run file (.h5), or a results file (.results.h5: its entries)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="read every checkpoint and result and check its checksum (also the run's results file); "
                        "exit code 2 if any is damaged")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("diagnose", help="loss spikes and divergence: what moved first, the likely cause, the fix")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print JSON only on stdout")
    p.add_argument("--sensitivity", type=_positive_float, default=6.0, help="spike threshold in robust sigmas (default 6)")
    p.add_argument("--window", type=_int_at_least(5), default=100,
                   help="steps of history for the noise level, ≥ 5 (default 100)")
    p.add_argument("--no-curvature", action="store_true", help="skip λ_max at the checkpoints around each spike")
    _add_spec_flags(p, data=True)
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("track", help="top-k Hessian eigenpairs across checkpoints, warm-started, with overlaps")
    p.add_argument("run")
    p.add_argument("--steps", default="all")
    p.add_argument("--top-k", type=_int_at_least(1), default=5, help="eigenpairs per checkpoint (default 5)")
    p.add_argument("--curvature", default="hessian", help="hessian | ggn | fisher | empirical_fisher")
    p.add_argument("--tol", type=_positive_float, default=1e-4)
    p.add_argument("--data", help="data spec (JSON) to use instead of the run's own")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256)
    p.add_argument("--max-examples", type=_int_at_least(1))
    p.add_argument("--results", help="results file (default: RUN.results.h5)")
    p.add_argument("--json", action="store_true")
    _add_allow_nonfinite(p)
    _add_spec_flags(p)
    p.set_defaults(func=_cmd_track)

    from lossatlas.analysis.kinds import plot_kinds

    p = sub.add_parser("plot", help="one figure of a stored result (PDF/PNG/SVG via matplotlib, HTML via plotly)")
    p.add_argument("run")
    p.add_argument("kind", help=f"one of: {', '.join(plot_kinds())}")
    p.add_argument("--step", type=int, help="the checkpoint (default: every stored step, or the last)")
    p.add_argument("-o", "--output", required=True, help="FILE.pdf | .png | .svg | .html")
    p.add_argument("--results", help="results file (default: RUN.results.h5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="one self-contained HTML report of the run and every stored result")
    p.add_argument("run")
    p.add_argument("-o", "--output", required=True, help="report.html")
    p.add_argument("--results", help="results file (default: RUN.results.h5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_report)

    from lossatlas import export

    export.add_parser(sub)
    for name in sorted(PROBES):
        _add_probe_parser(sub, PROBES[name])
    return parser


def _add_spec_flags(p: argparse.ArgumentParser, *, data: bool = False) -> None:
    """--model (and --data) to pass a spec instead of the run's; --trust-factory for a file this user did not sign."""
    if data:
        p.add_argument("--data", help="data spec (JSON) to use instead of the run's own")
    p.add_argument("--model", help="model spec (JSON) to use instead of the run's own")
    p.add_argument("--trust-factory", action="store_true",
                   help="import a factory named in the run file's specs even if you did not write the file")


def _add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="compute on checkpoints holding NaN/inf (default: refuse them, naming the tensors)")


# -- argument types: each refuses a bad value at parse time, as one line ------------------------

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _device_arg(text: str) -> str:
    """A device torch can use here: cpu, cuda[:N] when CUDA is available, mps when MPS is."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s); use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return text


def _results_arg(path: str | None) -> str | None:
    if path is not None and Path(path).is_dir():
        raise UserError(f"--results {path} is a folder; give a results file path, e.g. {Path(path) / 'run.results.h5'}")
    return path


@contextlib.contextmanager
def _writing(output: str):
    """An OSError while writing ``output`` (through a temporary file next to it) names ``output`` itself."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or Path(exc.filename).parent != Path(output).absolute().parent:
            raise
        raise UserError(f"{output}: cannot write it ({exc.strerror or exc}); {_os_fix(exc)}") from None


def _with_prefix(name: str, exc: BaseException) -> str:
    """``name: message``, without repeating a prefix the message already has."""
    text = str(exc)
    return text if text.startswith(name) else f"{name}: {text}"


# -- probe subcommands ---------------------------------------------------------------------------

def _add_probe_parser(sub, cls) -> None:
    doc = (cls.__doc__ or cls.name).strip().splitlines()[0]
    p = sub.add_parser(cls.name, help=cls.summary or doc, description=doc)
    p.add_argument("run", help="the run file (.h5)")
    p.add_argument("--steps", "--step", dest="steps", default="last", help="all | last | first | 1000 | 100,200 | 0:5000:500")
    p.add_argument("--data", help="data spec (JSON) to use instead of the run's own")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256)
    p.add_argument("--max-examples", type=_int_at_least(1), metavar="N",
                   help="use N examples: the first N, or a seeded subset of N for tokens/hf_dataset/image_folder "
                        "data specs (recorded in the results)")
    p.add_argument("--max-tokens", type=_int_at_least(1), metavar="N",
                   help="token data specs (tokens, hf_dataset): a seeded subset of at most N tokens, recorded in "
                        "the results")
    p.add_argument("--results", help="results file (default: RUN.results.h5 next to the run)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="compute in this precision")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu | cuda | cuda:N | mps (default: cpu)")
    p.add_argument("--loss", help="the loss instead of the run's own: cross_entropy | mse | half_sse | causal_lm | "
                                  "model (the model's own outputs.loss, from the labels of dict batches)")
    p.add_argument("--output", help="the model output the probe uses, e.g. start_logits (default: logits)")
    _add_allow_nonfinite(p)
    p.add_argument("--force", action="store_true", help="recompute even if a stored result exists")
    p.add_argument("--json", action="store_true", help="print JSON only on stdout")
    p.add_argument("--quiet", action="store_true")
    _add_spec_flags(p)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = f.name if f.name not in COMMON else f"{cls.name}_{f.name}"
        kwargs = _argparse_kwargs(hints.get(f.name, str), f)
        p.add_argument("--" + flag.replace("_", "-"), dest=f"probe__{f.name}", default=argparse.SUPPRESS, **kwargs)
    p.set_defaults(func=_cmd_probe, probe_cls=cls)


def _argparse_kwargs(hint: Any, f: dataclasses.Field) -> dict:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    default = f.default if f.default is not dataclasses.MISSING else None
    help_default = f"(default: {default!r})"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_default}
    if hint in (int, float):
        return {"type": hint, "help": help_default}
    if origin is typing.Literal:
        return {"choices": list(args), "help": help_default}
    if origin in (tuple, list) and args and all(a in (int, float, str) or a is Ellipsis for a in args):
        item = next(a for a in args if a is not Ellipsis)
        return {"type": item, "nargs": "+", "help": help_default}
    if hint is str:
        return {"type": str, "help": help_default}
    return {"type": _json_arg, "help": f"JSON {help_default}"}


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_probe(args: argparse.Namespace) -> int:
    from lossatlas import progress
    from lossatlas.analysis.runner import RunOptions, run_probe

    cls = args.probe_cls
    settings = {k[len("probe__"):]: v for k, v in vars(args).items() if k.startswith("probe__")}
    for k, v in settings.items():
        if isinstance(v, list):
            settings[k] = tuple(v)
    try:
        probe = cls(**settings)
    except (ValueError, TypeError) as exc:
        raise UserError(_with_prefix(cls.name, exc)) from None
    options = RunOptions(steps=args.steps, results_path=_results_arg(args.results), data=_spec_arg(args.data, "--data"),
                         model=_spec_arg(args.model, "--model"), trust_factory=args.trust_factory,
                         batch_size=args.batch_size, max_examples=args.max_examples, max_tokens=args.max_tokens,
                         dtype=args.dtype, device=args.device, force=args.force, progress=progress.status,
                         allow_nonfinite=args.allow_nonfinite, loss=args.loss, output=args.output)
    try:
        report = run_probe(_existing(args.run), probe, options)
    except ValueError as exc:  # a probe's refusal of this checkpoint or data (too few examples, no such layer, …)
        raise UserError(_with_prefix(cls.name, exc)) from None
    except RuntimeError as exc:
        import torch

        if not isinstance(exc, torch.linalg.LinAlgError):  # a solver that did not converge: said plainly
            raise
        cause = ("the checkpoint's NaN/inf values reached it (--allow-nonfinite)" if args.allow_nonfinite
                 else "the matrix is degenerate at this checkpoint")
        routine = str(exc).split(":", 1)[0].strip() or "a linear-algebra routine"
        raise UserError(f"{cls.name}: {routine} failed to converge: {cause}; pick another checkpoint "
                        "or other examples") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 alone reports (and writes)
    if args.json:
        from lossatlas.finite import strict_json

        print(strict_json({"probe": report.probe, "key": report.key, "results": str(report.results_path),
                           "steps": [_outcome_json(o) for o in report.outcomes]}, default=_json_default))
    else:
        for o in report.outcomes:
            print(_outcome_line(o))
        print(f"results: {report.results_path}")
    return 0


def _outcome_json(o) -> dict:
    r = o.result
    scalars = {k: float(v) for k, v in r.values.items() if v.ndim == 0 and v.dtype.kind in "fiub"}
    arrays = {k: list(v.shape) for k, v in r.values.items() if v.ndim > 0}
    return {"step": o.step, "status": o.status, "values": scalars, "arrays": arrays, "meta": r.meta}


def _outcome_line(o) -> str:
    r = o.result
    parts = []
    for k, v in r.values.items():
        if v.ndim == 0 and v.dtype.kind in "fiub":
            parts.append(f"{k}={float(v):.6g}")
        elif v.ndim == 1 and v.size <= 8 and v.dtype.kind == "f":
            parts.append(f"{k}=[{', '.join(f'{x:.4g}' for x in v)}]")
    return f"step {o.step} ({o.status}): " + " ".join(parts)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


# -- the other subcommands -----------------------------------------------------------------------

def _existing(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file; check the path")
    if p.is_dir():
        raise UserError(f"{path} is a folder; give the run file (.h5) inside it")
    return path


def _spec_arg(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    candidate = Path(text)
    if not text.lstrip().startswith("{") and candidate.suffix == ".json" and candidate.is_file():
        text = candidate.read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        if text.replace("_", "").isalnum():
            return {"name": text}
        raise UserError(f"{flag} {text!r} is not JSON; write e.g. '{{\"name\": \"mlp\", \"kwargs\": {{}}}}' or a registered name") from None
    if not isinstance(spec, dict):
        raise UserError(f"{flag} must be a JSON object like {{\"name\": ..., \"kwargs\": {{...}}}}")
    return spec


def _cmd_train(args: argparse.Namespace) -> int:
    from lossatlas.train import TrainConfig, train

    values: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.config is not None:
        path = Path(args.config)
        if path.is_file():
            from lossatlas.store import same_file

            if same_file(path, args.output):
                raise UserError(f"{args.output}: the output is also the training config it was given; writing the run "
                                "there would destroy the config; choose another output path (e.g. -o run.h5)")
        text = path.read_text() if path.is_file() else args.config
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{args.config}: not a JSON file or JSON text of training settings") from None
        if not isinstance(values, dict):
            raise UserError(f"{args.config}: training settings must be a JSON object like {{\"lr\": 0.1, \"steps\": 500}}")
        _check_train_settings(values, fields)
        TrainConfig(**values)  # the file's own values are checked too, even those the flags below replace
    for name in ("loss", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup", "batch_size",
                 "steps", "checkpoint_every", "log_spaced", "grad_clip", "instability", "seed"):
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    if args.model is not None:
        values["model"] = _spec_arg(args.model, "--model")
    if args.data is not None:
        values["data"] = _spec_arg(args.data, "--data")
    _check_train_settings(values, fields)
    cfg = TrainConfig(**values)
    train(cfg, args.output, overwrite=args.force)
    print(f"run: {args.output}")
    return 0


def _check_train_settings(values: dict[str, Any], fields: set[str]) -> None:
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")


def _cmd_import(args: argparse.Namespace) -> int:
    from lossatlas.importer import import_checkpoints

    steps = import_checkpoints(args.checkpoints, args.output, model_spec=_spec_arg(args.model, "--model"),
                               data_spec=_spec_arg(args.data, "--data"), loss=args.loss,
                               step_pattern=args.step_pattern, overwrite=args.force, step=args.step)
    print(f"imported {len(steps)} checkpoint(s) (steps {steps[0]}…{steps[-1]}) into {args.output}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from lossatlas import store

    path = _existing(args.run)
    try:
        kind = store.file_kind(path)
    except UserError:
        kind = None  # not a readable lossatlas file: the run reader below says what is wrong with it
    if kind == "results":
        return _info_results(path, args)
    with store.RunReader(path, damaged_ok=args.verify) as reader:  # --verify lists a truncated file's checkpoints
        steps = reader.steps()
        log = reader.log([]) if reader.truncated is None else {"step": []}
        info = {
            "path": str(reader.path), "model": reader.model_spec, "data": reader.data_spec, "loss": reader.loss,
            "optimizer": reader.optimizer, "checkpoints": len(steps),
            "steps": [steps[0], steps[-1]] if steps else [], "log_rows": int(len(log["step"])),
            "last_logged_step": int(log["step"][-1]) if len(log["step"]) else None,
            "log_names": reader.log_names() if reader.truncated is None else [], "size_bytes": reader.size_bytes(),
            "writer_attached": reader.writer_attached(),
        }
        checks = reader.verify() if args.verify else {}
        truncated = reader.truncated
    results_path = store.default_results_path(path)
    results = _verify_results(results_path) if args.verify and results_path.exists() else None
    if args.verify:
        info["verify"] = {"checkpoints": {str(s): v for s, v in checks.items()},
                          "truncated": {"size": truncated[0], "expected": truncated[1]} if truncated else None,
                          "results_file": str(results_path) if results is not None else None,
                          "results": results}
    if args.json:
        print(json.dumps(info, default=_json_default))
    else:
        print(f"run        {info['path']}")
        print(f"model      {json.dumps(info['model'])}")
        print(f"data       {json.dumps(info['data'])}")
        print(f"loss       {info['loss']}   optimizer {json.dumps(info['optimizer'])}")
        span = f"steps {steps[0]} … {steps[-1]}" if steps else "none yet"
        print(f"checkpoints {len(steps)} ({span})")
        if truncated:
            print(f"log        unreadable: the file is truncated ({truncated[0]} of {truncated[1]} bytes)")
        else:
            print(f"log        {info['log_rows']} rows up to step {info['last_logged_step']}; "
                  f"{len(info['log_names'])} series")
        print(f"size       {info['size_bytes'] / 1e6:.2f} MB")
        print(f"writer     {'attached (the run is live)' if info['writer_attached'] else 'none'}")
        if args.verify:
            intact = sum(v == "ok" for v in checks.values())
            print(f"verify     {intact} of {len(checks)} checkpoints intact")
            for s, v in checks.items():
                print(f"           step {s:<10} {v}")
            if results is not None:
                _print_results_checks(results_path, results)
    return _verify_exit(path, checks, results_path, results, truncated)


def _verify_results(path: Path) -> list[dict]:
    """Every entry of a results file with its checksum status; one "unreadable" entry when the file is."""
    from lossatlas import store

    try:
        return store.ResultsStore(path, mode="r").verify()
    except UserError as exc:
        return [{"probe": None, "key": None, "step": None, "status": f"damaged: {exc}"}]


def _print_results_checks(path: Path, results: list[dict]) -> None:
    intact = sum(e["status"] == "ok" for e in results)
    print(f"results    {path}: {intact} of {len(results)} entries intact")
    for e in results:
        where = f"{e['probe']}/{e['key']} step {e['step']}" if e["probe"] is not None else "the file"
        print(f"           {where:<40} {e['status']}")


def _verify_exit(path: str, checks: dict, results_path: Path | None, results: list[dict] | None,
                 truncated: tuple[int, int] | None = None) -> int:
    """Exit code 2, with one line on stderr, when the run is truncated or a checkpoint or a result is damaged."""
    bad_steps = [s for s, v in checks.items() if v.startswith("damaged")]
    bad_results = [e for e in results or [] if e["status"].startswith("damaged")]
    parts = [f"{path}: the file is truncated ({truncated[0]} of {truncated[1]} bytes)"] if truncated else []
    if bad_steps:
        listed = ", ".join(map(str, bad_steps[:10])) + (" …" if len(bad_steps) > 10 else "")
        parts.append(f"{path}: {len(bad_steps)} of {len(checks)} checkpoints are damaged (steps {listed})")
    if bad_results:
        parts.append(f"{results_path}: {len(bad_results)} of {len(results or [])} results are damaged")
    if not parts:
        return 0
    fix = "restore the damaged file from a copy" + (" or recompute the damaged results with the probe's --force"
                                                   if bad_results else "")
    print(f"lossatlas: error: {'; '.join(parts)}; {fix}", file=sys.stderr)
    return 2


def _info_results(path: str, args: argparse.Namespace) -> int:
    """``info RESULTS``: its entries per probe and config key; with ``--verify`` every entry's checksum status."""
    from lossatlas import store

    if not args.verify:
        entries = store.ResultsStore(path, mode="r").entries()
        groups: dict[tuple[str, str], list[dict]] = {}
        for e in entries:
            groups.setdefault((e["probe"], e["key"]), []).append(e)
        summary = [{"probe": p, "key": k, "steps": sorted((e["step"] for e in es), key=lambda s: (s is None, s or 0)),
                    "partial": sum(e["status"] == "partial" for e in es)} for (p, k), es in sorted(groups.items())]
        if args.json:
            print(json.dumps({"path": path, "kind": "results", "entries": len(entries), "results": summary}))
            return 0
        print(f"results    {path}")
        print(f"entries    {len(entries)} ({len(summary)} probe settings)")
        for s in summary:
            steps = [x for x in s["steps"] if x is not None]
            span = f"steps {steps[0]} … {steps[-1]} ({len(s['steps'])})" if steps else "no step"
            partial = f", {s['partial']} partial" if s["partial"] else ""
            print(f"           {s['probe'] + '/' + s['key']:<40} {span}{partial}")
        return 0
    checks = store.ResultsStore(path, mode="r").verify()
    if args.json:
        print(json.dumps({"path": path, "kind": "results", "entries": len(checks), "verify": {"results": checks}},
                         default=_json_default))
    else:
        _print_results_checks(Path(path), checks)
    return _verify_exit(path, {}, Path(path), checks)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from lossatlas.analysis.diagnose import checkpoint_sharpness, diagnose_command

    path = _existing(args.run)
    curvature = None if args.no_curvature else checkpoint_sharpness(
        path, trust_factory=args.trust_factory, model=_spec_arg(args.model, "--model"),
        data=_spec_arg(args.data, "--data"))
    text, data = diagnose_command(path, as_json=args.json, sensitivity=args.sensitivity, window=args.window,
                                  curvature_fn=curvature)
    print(text)  # with --json: strict JSON (diagnose_command)
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from lossatlas.analysis.tracking import track_eigenspaces

    try:
        res = track_eigenspaces(_existing(args.run), steps=args.steps, k=args.top_k, curvature=args.curvature,
                                tol=args.tol, data=_spec_arg(args.data, "--data"), batch_size=args.batch_size,
                                max_examples=args.max_examples, results_path=_results_arg(args.results),
                                model=_spec_arg(args.model, "--model"), trust_factory=args.trust_factory,
                                allow_nonfinite=args.allow_nonfinite)
    except ValueError as exc:  # a setting the tracker refuses (curvature, k above the parameter count, …)
        raise UserError(_with_prefix("track", exc)) from None
    steps = res.values["steps"]
    if args.json:
        from lossatlas.finite import strict_json

        print(strict_json({"steps": steps, "top_eigenvalues": res.values["top_eigenvalues"],
                           "overlap": res.values["overlap"], "matvecs": res.values["matvecs"]}))
        return 0
    for i, step in enumerate(steps):
        eig = ", ".join(f"{v:.4g}" for v in res.values["top_eigenvalues"][i])
        ov = res.values["overlap"][i]
        print(f"step {int(step)}: top [{eig}]  overlap {'-' if ov != ov else f'{ov:.3f}'}  "
              f"({int(res.values['matvecs'][i])} HVPs)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from lossatlas.analysis.reporting import plot_command

    with _writing(args.output):
        path = plot_command(_existing(args.run), args.kind, step=args.step, output=args.output, overwrite=args.force,
                            results_path=_results_arg(args.results))
    print(f"figure: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lossatlas.analysis.reporting import report_command

    with _writing(args.output):
        path = report_command(_existing(args.run), output=args.output, overwrite=args.force,
                              results_path=_results_arg(args.results))
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lossatlas.demo import run_demo

    run_demo(args.out, steps=args.steps, overwrite=args.force)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
