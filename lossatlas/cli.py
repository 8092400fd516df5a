"""The ``lossatlas`` command: one subcommand per job.

Exit codes: 0 success; 2 bad input, with one line ``lossatlas: error: what is wrong; how to fix it``
on stderr (also for an output that cannot be written: a missing or read-only folder, a full disk);
1 an internal error, with its traceback. Warnings are one line each, ``lossatlas: warning: ...``.
Probe subcommands are built from the registered probe dataclasses, so the API and the CLI cannot drift.

``--json`` output is strict JSON (RFC 8259): a NaN or ±inf number is written as ``null`` and the
top-level member ``"nonfinite"`` maps the JSON Pointer of each such value (e.g.
``/steps/0/values/lambda_max/data``) to ``"nan"``, ``"inf"`` or ``"-inf"``; ``{}`` when every number
is finite (``lossatlas.finite.strict_json``).

Every probe command and ``track`` print one schema (``lossatlas.store.json_view.result_json``)::

    {"probe": "hessian", "key": "6fd2f6d1cae8", "label": "hessian · ggn · class=3 · 256 examples",
     "name": "class3", "results": "run.results.h5",
     "steps": [{"probe": ..., "key": ..., "label": ..., "name": ..., "step": 20, "status": "computed",
                "values": {"top_eigenvalues": {"dims": ["k"], "shape": [5], "data": [0.77, ...]}, ...},
                "coords": {"block": {"dims": ["block"], "shape": [3], "data": ["layers.0", ...]}, ...},
                "config": {...settings...}, "meta": {...how it was computed...}}],
     "nonfinite": {}}

``values`` holds every stored number with its dimension names and shape (a 0-d value's ``data`` is the
number); ``coords`` the coordinates of those dimensions (block names, grid axes, α, checkpoint steps). A
vector over all parameters (dimension ``param``: directions, eigenvectors) has ``data`` null and says so in
``omitted``. ``track`` gives one entry with ``step`` null whose values run along the dimension ``step``.
``info RESULTS --json`` lists each stored configuration (label, name, key, settings, steps, written);
``diagnose --json`` its findings.

A stored configuration is named by its *label* (``hessian · ggn · class=3 · 256 examples``: the settings
that differ from the defaults, the data size, a non-default loss or output) and, optionally, by the user
(``--name``); ``plot``, ``report`` and ``export`` take ``--select NAME|LABEL|KEY`` and refuse to guess
between several configurations of one probe.
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
            parser = build_parser(probes=_wants_probes(argv))
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


READ_COMMANDS = frozenset({"info", "plot", "report"})  # they read stored files: no probe parser (nor torch) needed


def _wants_probes(argv: Sequence[str] | None) -> bool:
    """False when the subcommand is one of READ_COMMANDS: the probe subcommands (which import torch) are not built."""
    args = list(sys.argv[1:] if argv is None else argv)
    return next((a for a in args if not a.startswith("-")), None) not in READ_COMMANDS


def build_parser(*, probes: bool = True) -> argparse.ArgumentParser:
    """The ``lossatlas`` argument parser: one sub-command per action, one per registered probe."""
    if probes:
        import lossatlas.probes.registry  # noqa: F401  (registers every probe; imports torch)
    from lossatlas.probes import PROBES

    parser = _Parser(prog="lossatlas", description="Loss landscapes, curvature and training dynamics from checkpoints.")
    parser.add_argument("--version", action="version", version=f"lossatlas {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="train the reference MLP on digits and run every probe and figure")
    p.add_argument("--out", default="demo_out", metavar="FOLDER", help="output folder (default: demo_out).")
    p.add_argument("--steps", type=int, default=600, metavar="N", help="training steps (default: 600).")
    p.add_argument("--force", action="store_true", help="overwrite files in the output folder.")
    p.add_argument("--quiet", action="store_true", help="print no progress lines.")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a reference model through the Recorder")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="optional JSON file (or JSON text) of training settings; the flags below override it.")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="the run file to write (.h5).")
    p.add_argument("--model", metavar="SPEC",
                   help='model spec, e.g. \'{"name": "mlp", "kwargs": {"widths": [64, 128, 10]}}\' (default: the '
                        'reference MLP).')
    p.add_argument("--data", metavar="SPEC", help='data spec, e.g. \'{"name": "digits"}\' (default: digits).')
    p.add_argument("--loss", metavar="LOSS", help="cross_entropy | mse | half_sse | causal_lm (default: cross_entropy).")
    p.add_argument("--optimizer", metavar="sgd|adam|adamw", help="the optimizer (default: sgd).")
    p.add_argument("--lr", type=float, metavar="X", help="the (peak) learning rate η.")
    p.add_argument("--momentum", type=float, metavar="X", help="SGD momentum β (heavy ball).")
    p.add_argument("--weight-decay", type=float, metavar="X", help="weight decay (decoupled for adamw).")
    p.add_argument("--schedule", metavar="constant|cosine|warmup_cosine|step", help="the learning-rate schedule.")
    p.add_argument("--warmup", type=int, metavar="N", help="warm-up steps of warmup_cosine.")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per step; 0 = full-batch gradient descent.")
    p.add_argument("--steps", type=int, metavar="N", help="training steps.")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="store a checkpoint every K steps.")
    p.add_argument("--log-spaced", type=int, metavar="N",
                   help="this many log-spaced checkpoints instead of every K steps.")
    p.add_argument("--grad-clip", type=float, metavar="X", help="clip the gradient norm to X (default: no clipping).")
    p.add_argument("--instability", action="store_true", default=None,
                   help="also log attention/output-logit, activation and Adam statistics.")
    p.add_argument("--seed", type=int, metavar="SEED", help="seed of the initialisation and the batch order.")
    p.add_argument("--force", action="store_true", help="overwrite an existing output.")
    p.add_argument("--quiet", action="store_true", help="print no progress lines.")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("import", help="make a run file from existing .pt/.pth/.safetensors checkpoints or "
                                      "Hugging Face folders (save_pretrained, Trainer checkpoint-N)")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, save_pretrained folders, or a Trainer output "
                                                  "folder holding checkpoint-N folders")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="the run file to write (.h5).")
    p.add_argument("--model", metavar="SPEC",
                   help="model spec (JSON text or a .json file) that the checkpoints load into, e.g. "
                        "'{\"factory\": \"nets:build\", \"kwargs\": {\"width\": 256}}' (a Hugging Face folder's "
                        "config.json is used when not given).")
    p.add_argument("--step", type=_int_at_least(0), metavar="N",
                   help="the step of a lone checkpoint (default: from its name; 0 for a lone save_pretrained folder).")
    p.add_argument("--data", metavar="SPEC",
                   help="data spec (JSON text or a .json file) the probes evaluate on, e.g. '{\"name\": \"digits\"}'.")
    p.add_argument("--loss", metavar="LOSS", help="the training loss: cross_entropy, mse, half_sse or causal_lm.")
    p.add_argument("--step-pattern", metavar="REGEX",
                   help="regex with one group around the step number in the file name, e.g. 'ckpt_(\\d+)' "
                        "(default: the last number in the name).")
    p.add_argument("--log", metavar="FILE",
                   help="the training log, so that diagnose and plot training work: a CSV/TSV or JSONL file with a "
                        "step column and loss (optionally lr, grad_norm, accuracy, ...), a TensorBoard event file "
                        "or folder (needs pip install tensorboard), or a Hugging Face trainer_state.json.")
    p.add_argument("--force", action="store_true", help="replace the run file if it exists.")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("info", help="what a run file holds, and whether a writer is attached")
    p.add_argument("run", metavar="FILE",
                   help="a run file (.h5), or a results file (.results.h5: its configurations, each with its label, "
                        "name, settings, steps and when it was written).")
    p.add_argument("--json", action="store_true", help="print JSON only on stdout.")
    p.add_argument("--verify", action="store_true",
                   help="read every checkpoint and result and check its checksum (also the run's results file); "
                        "exit code 2 if any is damaged.")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("diagnose", help="loss spikes and divergence: what moved first, the likely cause, the fix")
    p.add_argument("run", metavar="RUN", help="the run file (.h5).")
    p.add_argument("--json", action="store_true", help="print JSON only on stdout (strict JSON).")
    p.add_argument("--sensitivity", type=_positive_float, default=6.0, metavar="Z",
                   help="spike threshold in robust sigmas (default: 6).")
    p.add_argument("--window", type=_int_at_least(5), default=100, metavar="N",
                   help="steps of history for the noise level, ≥ 5 (default: 100).")
    p.add_argument("--no-curvature", action="store_true", help="skip λ_max at the checkpoints around each spike.")
    _add_spec_flags(p, data=True)
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("track", help="top-k Hessian eigenpairs across checkpoints, warm-started, with overlaps")
    p.add_argument("run", metavar="RUN", help="the run file (.h5).")
    p.add_argument("--steps", default="all", metavar="SEL",
                   help="the checkpoints: all | last | first | 1000 | 100,200 | START:STOP:EVERY (default: all).")
    p.add_argument("--top-k", type=_int_at_least(1), default=5, metavar="K", help="eigenpairs per checkpoint (default: 5).")
    p.add_argument("--curvature", default="hessian", metavar="hessian|ggn|fisher|empirical_fisher",
                   help="the curvature matrix (default: hessian).")
    p.add_argument("--tol", type=_positive_float, default=1e-4, metavar="X",
                   help="relative Ritz residual ‖Hv − λv‖ ≤ tol·|λ| at which Lanczos stops (default: 1e-4).")
    p.add_argument("--data", metavar="SPEC", help="data spec (JSON) to use instead of the run's own.")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N",
                   help="examples per batch (default: 256).")
    p.add_argument("--max-examples", type=_int_at_least(1), metavar="N", help="use the first N examples (default: all).")
    p.add_argument("--basis-device", choices=["cpu", "disk"],
                   help="keep the Lanczos basis in host memory or memory-mapped on disk (default: beside the operator).")
    p.add_argument("--results", metavar="FILE", help="results file (default: RUN.results.h5).")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout, in the schema of `lossatlas --help`.")
    _add_allow_nonfinite(p)
    _add_spec_flags(p)
    p.set_defaults(func=_cmd_track)

    from lossatlas.analysis.kinds import plot_kinds

    p = sub.add_parser("plot", help="one figure of a stored result (PDF/PNG/SVG via matplotlib, HTML via plotly)")
    p.add_argument("run", metavar="RUN", help="the run file (.h5).")
    p.add_argument("kind", metavar="KIND", help=f"what to draw, one of: {', '.join(plot_kinds())}.")
    p.add_argument("--step", type=int, metavar="N", help="the checkpoint (default: every stored step, or the last).")
    p.add_argument("--select", metavar="NAME|LABEL|KEY",
                   help="the configuration to draw when several of the probe are stored: its --name, its label or "
                        "its config key, as `lossatlas info RUN.results.h5` lists them (refused without it then).")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.pdf | .png | .svg | .html.")
    p.add_argument("--results", metavar="FILE", help="results file (default: RUN.results.h5).")
    p.add_argument("--force", action="store_true", help="overwrite an existing output.")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="one self-contained HTML report of the run and every stored result")
    p.add_argument("run", metavar="RUN", help="the run file (.h5).")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write, e.g. report.html.")
    p.add_argument("--select", metavar="NAME|LABEL|KEY", action="append",
                   help="show only this configuration of its probe (repeat for several; default: every stored "
                        "configuration, each its own card titled with its label).")
    p.add_argument("--results", metavar="FILE", help="results file (default: RUN.results.h5).")
    p.add_argument("--force", action="store_true", help="overwrite an existing output.")
    p.set_defaults(func=_cmd_report)

    from lossatlas import export

    export.add_parser(sub)
    for name in sorted(PROBES) if probes else ():
        _add_probe_parser(sub, PROBES[name])
    for p in sub.choices.values():
        _finish_help(p)
    return parser


# the help of an option another module adds without one, by its dest
_COMMON_HELP = {"output": "the file to write.", "force": "overwrite an existing output.",
                "quiet": "print no progress lines.", "json": "print JSON only on stdout.",
                "help": "show this help message and exit."}


def _finish_help(p: argparse.ArgumentParser) -> None:
    """Every option's help a sentence: a missing one from _COMMON_HELP, a missing full stop added."""
    for action in p._actions:
        if action.help is None and action.dest in _COMMON_HELP:
            action.help = _COMMON_HELP[action.dest]
        if isinstance(action.help, str) and action.help and action.help[-1] not in ".)!?":
            action.help += "."


def _add_spec_flags(p: argparse.ArgumentParser, *, data: bool = False) -> None:
    """--model (and --data) to pass a spec instead of the run's; --trust-factory for a file this user did not sign."""
    if data:
        p.add_argument("--data", metavar="SPEC", help="data spec (JSON) to use instead of the run's own.")
    p.add_argument("--model", metavar="SPEC", help="model spec (JSON) to use instead of the run's own.")
    p.add_argument("--trust-factory", action="store_true",
                   help="import a factory named in the run file's specs even if you did not write the file.")


def _add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="compute on checkpoints holding NaN/inf (default: refuse them, naming the tensors).")


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
    summary = (cls.summary or _first_sentence(cls.__doc__ or cls.name)).rstrip(".")
    p = sub.add_parser(cls.name, help=summary, description=_description(cls),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="the run file (.h5).")
    p.add_argument("--steps", "--step", dest="steps", default="last", metavar="SEL",
                   help="the checkpoints to compute at: all | last | first | 1000 | 100,200 | START:STOP:EVERY "
                        "(default: last).")
    p.add_argument("--name", metavar="NAME",
                   help="a name for this configuration, stored with its results; plot/report/export --select NAME "
                        "picks it (a name another configuration of this probe holds is refused).")
    p.add_argument("--data", metavar="SPEC", help="data spec (JSON or a .json file) to use instead of the run's own, "
                                                  "e.g. '{\"name\": \"digits\"}'.")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N",
                   help="examples per batch of the fixed data set (default: 256).")
    p.add_argument("--max-examples", type=_int_at_least(1), metavar="N",
                   help="use N examples: the first N, or a seeded subset of N for tokens/hf_dataset/image_folder "
                        "data specs (recorded in the results and shown in their label).")
    p.add_argument("--max-tokens", type=_int_at_least(1), metavar="N",
                   help="token data specs (tokens, hf_dataset): a seeded subset of at most N tokens, recorded in "
                        "the results.")
    p.add_argument("--results", metavar="FILE", help="results file (default: RUN.results.h5 next to the run).")
    p.add_argument("--dtype", choices=["float32", "float64"], metavar="float32|float64",
                   help="load the checkpoint and compute in this precision (default: the checkpoint's own).")
    p.add_argument("--device", type=_device_arg, default="cpu", metavar="DEVICE",
                   help="where to compute: cpu | cuda | cuda:N | mps (default: cpu).")
    p.add_argument("--loss", metavar="LOSS",
                   help="the loss instead of the run's own: cross_entropy | mse | half_sse | causal_lm | model (the "
                        "model's own outputs.loss, from the labels of dict batches).")
    p.add_argument("--output", metavar="NAME",
                   help="the model output the probe uses, e.g. start_logits (default: logits).")
    _add_allow_nonfinite(p)
    if cls.name == "hessian":
        p.add_argument("--fsdp", action="store_true",
                       help="models larger than one device: under torchrun, shard the model with FSDP2 and use "
                            "finite-difference products with a measured error bound (top-k, trace, density).")
    p.add_argument("--force", action="store_true", help="recompute even if a stored result exists.")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout, in the schema of `lossatlas --help` (values with "
                        "dimension names, coordinates, settings and meta).")
    p.add_argument("--quiet", action="store_true", help="print no progress lines.")
    _add_spec_flags(p)
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    group = p.add_argument_group(f"{cls.name} settings", "the probe's own settings (its dataclass fields)")
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("python_only"):  # callables (metric_fns): the Python API only
            continue
        flag = f.name if f.name not in COMMON else f"{cls.name}_{f.name}"
        kwargs = _argparse_kwargs(hints.get(f.name, str), f, cls, docs)
        group.add_argument("--" + flag.replace("_", "-"), dest=f"probe__{f.name}", default=argparse.SUPPRESS, **kwargs)
    p.set_defaults(func=_cmd_probe, probe_cls=cls)


def _first_sentence(doc: str) -> str:
    """The first paragraph of a docstring as one line."""
    return " ".join(_paragraphs(doc)[:1]) or ""


def _paragraphs(doc: str) -> list[str]:
    import inspect

    text = inspect.cleandoc(doc or "")
    return [" ".join(line.strip() for line in block.splitlines()) for block in text.split("\n\n") if block.strip()]


def _description(cls) -> str:
    """A probe subcommand's description: its docstring's prose paragraphs whole (its settings are listed below)."""
    import inspect

    keep = []
    for block in inspect.cleandoc(cls.__doc__ or cls.name).split("\n\n"):
        head = block.lstrip().split(":", 1)[0]
        if head in _DOC_SECTIONS:
            break  # the settings section: each setting's help shows it
        import textwrap

        keep.append(textwrap.fill(" ".join(line.strip() for line in block.splitlines()), width=100))
    return "\n\n".join(keep)


_DOC_SECTIONS = ("Attributes", "Args", "Arguments", "Settings")
_DOC_ENTRY = __import__("re").compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*/\s*[A-Za-z_][\w]*)*)\s*:\s+(?P<text>.*)$")


def _field_docs(cls) -> dict[str, str]:
    """Per-setting help from the Google-style ``Attributes:``/``Args:`` section of ``cls`` and its bases' docstrings.

    An entry ``a / b: text`` documents both; ``a: text; b: text`` on one line, each; continuation lines
    (indented deeper) join their entry. A subclass's entry wins over its base's.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        lines = __import__("inspect").cleandoc(doc).splitlines()
        inside, entry_indent, current = False, None, None
        for line in lines:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if stripped.rstrip(":") in _DOC_SECTIONS and stripped.endswith(":"):
                inside, entry_indent, current = True, None, None
                continue
            if not inside:
                continue
            if not stripped:
                continue
            if entry_indent is None:
                entry_indent = indent
            if indent < entry_indent or (indent == 0 and entry_indent == 0 and not _DOC_ENTRY.match(stripped)):
                inside = False
                continue
            m = _DOC_ENTRY.match(stripped) if indent == entry_indent else None
            if m:
                current = []
                for piece in _split_entries(stripped):
                    pm = _DOC_ENTRY.match(piece)
                    names = [n.strip() for n in pm.group("names").split("/")]
                    current = names
                    for n in names:
                        out[n] = pm.group("text").strip()
            elif current:
                for n in current:
                    out[n] = f"{out[n]} {stripped}"
    return out


def _split_entries(line: str) -> list[str]:
    """``a: text; b: more`` as ["a: text", "b: more"] (a ``; name:`` starts another entry)."""
    import re

    parts = re.split(r";\s+(?=[A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*\s*:\s)", line)
    return [p for p in parts if _DOC_ENTRY.match(p)] or [line]


# per-setting help of the probes whose docstrings describe their settings in prose (probe.field, or field)
_SETTING_HELP = {
    "mode": "the module's train/eval flag while the probe evaluates it (BatchNorm, dropout)",
    "collapse.module": "the module whose input holds the penultimate features (None: the last nn.Linear, whose "
                       "weight and bias are the classifier)",
    "collapse.layers": "also NC1 and nearest-class-centre accuracy per layer: \"depth\" (the input of every "
                       "Linear/Conv) or module names as a JSON list (default none)",
    "collapse.nc1_variant": "the NC1 variant: tr(Σ_W Σ_B⁺)/C by pseudo-inverse (pinv) or SVD, the quotient "
                            "tr Σ_W / tr Σ_B, or the class-distance normalized variance (cdnv)",
    "collapse.max_examples": "examples streamed through the model (None: all of the data set)",
    "collapse.batch_size": "examples per forward pass of the stream (None: the data set's own batches)",
    "collapse.minority_threshold": "classes with fewer examples than this are \"minority\" classes (None: "
                                   "below the median count)",
    "interpolate.to_step": "the other checkpoint of the straight path θ(α) = (1 − α)θ_a + αθ_b (required)",
    "interpolate.alphas": "the grid of α: MIN MAX NUM, evenly spaced; the barriers need α = 0 and 1 in it",
    "interpolate.dir_type": "what moves along the path: states (parameters and buffers, as Li et al. advise) or "
                            "weights (parameters only)",
    "bn": "BatchNorm statistics along the path: keep (the checkpoint's) or recompute (fresh statistics from "
          "the first --bn-batches batches at every point)",
    "bn_batches": "batches used to recompute BatchNorm statistics with --bn recompute (None: all)",
    "interpolate.layerwise": "also the barriers of moving one layer at a time and the first-k/last-k layers",
    "tol": "relative Ritz residual ‖Hv − λv‖ ≤ tol·|λ| at which Lanczos stops",
    "max_iter": "the most Lanczos steps (None: the estimator's default)",
    "chunk_size": "points evaluated together in one vectorised pass (None: 1 on CPU, 16 on an accelerator)",
    "sharpness.measures": "which sharpness measures to compute, any of: grad_norm, fisher_rao, keskar, sam, "
                          "adaptive_sam, m_sharpness, worst_case, adaptive_worst_case, average_case, "
                          "adaptive_average_case (default all)",
    "sharpness.rho": "the radius ρ of SAM, m- and worst/average-case sharpness (0.05, as google-research/sam)",
    "sharpness.adaptive_rho": "the radius ρ of the adaptive (ASAM) measures (0.5, as SamsungLabs/ASAM)",
    "sharpness.eta": "η of the adaptive measures' scaling |w| + η (0 makes them invariant to layer rescalings)",
    "sharpness.norm": "the norm of the perturbation ball",
    "sharpness.steps": "Auto-PGD iterations of the worst-case measures",
    "sharpness.m": "examples per chunk of m-sharpness and the worst-case measures (None: all at once)",
    "sharpness.num_samples": "Monte-Carlo perturbations of the average-case measures",
    "sharpness.epsilon": "Keskar et al.'s ε, the box size relative to |w| + 1",
    "sharpness.keskar_dim": "dimension of Keskar's random subspace (None: the full parameter space)",
    "sharpness.keskar_iters": "L-BFGS-B iterations of Keskar sharpness",
    "sharpness.fisher": "the Fisher of the Fisher-Rao norm: empirical (data labels) or model (sampled labels)",
    "sharpness.rand_init": "start Auto-PGD from a random point of the ball instead of its centre",
    "sharpness.mode": "the module's train/eval flag while the measures are computed",
    "sharpness.seed": "seed of every random perturbation and start",
    "sharpness.max_examples": "examples the measures use (None: all)",
    "sharpness.batch_size": "examples per forward pass (None: the data set's own batches)",
    "sharpness.lambda_max": "also the top Hessian eigenvalue λ_max, for comparison",
    "sharpness.trace": "also the Hessian trace by Hutchinson's estimator, for comparison",
    "surface.dims": "1 for a line through the checkpoint, 2 for a plane",
    "surface.xrange": "the grid along the first direction: MIN MAX NUM points",
    "surface.yrange": "the grid along the second direction: MIN MAX NUM points (None: as --xrange)",
    "surface.directions": "where the directions come from: random (Gaussian, filter-normalised as Li et al. "
                          "2018), pca (the trajectory's principal components up to this checkpoint), "
                          "eigenvectors (the top Hessian eigenvectors, unit norm), checkpoints (towards "
                          "--x-step and --y-step) or worst (steepest loss increase within --worst-radius, by "
                          "projected gradient ascent; Chen et al. 2025)",
    "surface.norm": "how a random direction is normalised to the weights (filter: per filter, as Li et al. 2018)",
    "ignore": "biasbn zeroes the direction in biases and normalisation parameters; none keeps them",
    "surface.dir_type": "what the directions move: weights (parameters only) or states (buffers too)",
    "surface.seed": "seed of the random directions",
    "surface.x_step": "the checkpoint the first direction points to (with --directions checkpoints)",
    "surface.y_step": "the checkpoint the second direction points to (with --directions checkpoints)",
    "surface.metrics": "extra metrics evaluated on the grid, by registered name (a loss such as mse, or "
                       "top5_accuracy; lossatlas.probes.grid.register_metric adds one)",
    "surface.save_every": "store a partial surface every N points, so an interrupted run resumes",
    "surface.quadratic_check": "compare each axis with its second-order model dᵀHd and say whether the slice is "
                               "quadratic at this scale",
    "trajectory.final_step": "the checkpoint the plane is centred on (None: the last one)",
    "trajectory.dir_type": "what the PCA is taken over: weights (parameters only) or states (buffers too)",
    "trajectory.grid": "also a GRID×GRID loss surface over the trajectory's box (0: none)",
    "trajectory.margin": "how much wider than the trajectory the box of --grid is, as a fraction",
    "uniformity.module": "the module whose features are measured (None: the last nn.Linear)",
    "uniformity.capture": "take the module's input or its output as the features",
    "uniformity.mode": "the module's train/eval flag while features are taken",
    "uniformity.t": "the temperature t of the uniformity log E exp(−t‖f(x) − f(y)‖²) (Wang & Isola 2020)",
    "uniformity.alpha": "the exponent α of the alignment E‖f(x) − f(x⁺)‖^α (Wang & Isola 2020)",
    "uniformity.max_pairs_examples": "at most this many examples (a seeded subsample) for the O(N²) pairwise "
                                     "terms (None: all)",
    "uniformity.max_examples": "examples streamed through the model (None: all)",
    "uniformity.batch_size": "examples per forward pass (None: the data set's own batches)",
    "uniformity.augmentation": "how positive pairs for the alignment are made: gaussian_noise, or none (no "
                               "alignment)",
    "uniformity.noise_std": "standard deviation of the gaussian_noise augmentation",
    "uniformity.center_rankme": "centre the features before RankMe's singular values",
    "uniformity.seed": "seed of the subsample and the augmentation",
}

# the setting -> the name of the tuple of its choices, looked up in the probe's module and its bases' modules
_CHOICE_CONSTANTS = {"curvature": "CURVATURES", "mode": "MODES", "path": "PATHS", "dtype": "COMPUTE_DTYPES",
                     "graph_cache": "GRAPH_CACHE_MODES",
                     "norm": "NORMS", "ignore": "IGNORES", "dir_type": "DIR_TYPES", "bn": "BN_MODES",
                     "directions": "DIRECTION_SOURCES", "nc1_variant": "NC1_VARIANTS", "capture": "CAPTURES",
                     "augmentation": "AUGMENTATIONS", "fisher": "FISHER_TARGETS", "trace_method": "TRACE_METHODS"}
_CHOICES = {"criterion": ("residual", "eigenvalue")}
_METAVARS = {"blocks": "layers|REGEX", "subset": "class=C[,C...]", "module": "MODULE", "layers": "depth|JSON",
             "metrics": "METRIC", "measures": "MEASURE", "batch_size_scan": "SIZE", "to_step": "STEP",
             "x_step": "STEP", "y_step": "STEP", "final_step": "STEP", "seed": "SEED"}
_RANGE = ("MIN", "MAX", "NUM")


def _choices(cls, name: str) -> tuple[str, ...] | None:
    """The values a string setting accepts, from the constant its probe checks it against (None if unknown)."""
    if name in _CHOICES:
        return _CHOICES[name]
    const = _CHOICE_CONSTANTS.get(name)
    if const is None:
        return None
    for klass in cls.__mro__:
        found = getattr(sys.modules.get(klass.__module__), const, None)
        if isinstance(found, tuple) and all(isinstance(v, str) for v in found):
            return found
    return None


def _setting_help(cls, name: str, docs: dict[str, str]) -> str:
    """The help of setting ``name`` of probe ``cls``: its docstring entry, else lossatlas.cli._SETTING_HELP."""
    text = _SETTING_HELP.get(f"{cls.name}.{name}") or docs.get(name) or _SETTING_HELP.get(name)
    # argparse %-formats help strings: a literal % of a docstring ("1% of the width") is escaped
    return text.replace("``", "").replace("%", "%%").strip() if text else f"{UNDOCUMENTED} {name.replace('_', ' ')}"


UNDOCUMENTED = "the probe setting"  # the start of a setting's help when its docstring does not describe it


def undocumented_settings() -> list[str]:
    """``probe.setting`` of every registered probe setting with no help of its own (the CLI test keeps it empty)."""
    import lossatlas.probes.registry  # noqa: F401  (registers every probe)
    from lossatlas.probes import PROBES

    out = []
    for name, cls in sorted(PROBES.items()):
        docs = _field_docs(cls)
        out += [f"{name}.{f.name}" for f in dataclasses.fields(cls)
                if f.init and _setting_help(cls, f.name, docs).startswith(UNDOCUMENTED)]
    return out


def _default_text(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (tuple, list)):
        return " ".join(str(v) for v in default) if default else "none"
    return str(default)


def _sentence(text: str, default: Any) -> str:
    """``text`` as a sentence followed by its default, e.g. ``top eigenpairs. Default: 5.``."""
    text = text.rstrip().rstrip(".;,:")
    if ("default" in text.lower().split("(")[-1] and text.endswith(")")) or (default is None and "(None:" in text):
        return f"{text}."  # the text already states its default
    return f"{text}. Default: {_default_text(default)}."


def _argparse_kwargs(hint: Any, f: dataclasses.Field, cls: Any = None, docs: dict[str, str] | None = None) -> dict:
    """The argparse keywords of one probe setting: its type, nargs, metavar and a help sentence with the default."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    text = _setting_help(cls, f.name, docs or {}) if cls is not None else f.name.replace("_", " ")
    choices = _choices(cls, f.name) if cls is not None else None
    if choices and not any(c in text for c in choices[1:]):
        text = f"{text} ({' | '.join(choices)})"
    help_text = _sentence(text, default)
    metavar = _METAVARS.get(f.name) or ("|".join(choices) if choices else f.name.upper())
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if hint is int:
        return {"type": int, "help": help_text, "metavar": _METAVARS.get(f.name, "N")}
    if hint is float:
        return {"type": float, "help": help_text, "metavar": "X"}
    if origin is typing.Literal:
        return {"choices": list(args), "help": help_text, "metavar": "|".join(map(str, args))}
    if origin in (tuple, list) and args and all(a in (int, float, str) or a is Ellipsis for a in args):
        if Ellipsis in args or len(args) == 1:
            item = next(a for a in args if a is not Ellipsis)
            return {"type": item, "nargs": "+", "help": help_text, "metavar": metavar}
        # a fixed-length tuple such as (min, max, num): one value per position, each of its own type
        return {"type": str, "nargs": len(args), "help": help_text, "action": _tuple_action(list(args)),
                "metavar": _RANGE if len(args) == 3 and args[2] is int else tuple(f"V{i + 1}" for i in range(len(args)))}
    if hint is str:
        return {"type": str, "help": help_text, "metavar": metavar}
    return {"type": _json_arg, "help": help_text, "metavar": metavar}


def _tuple_action(types: list) -> type:
    """An argparse action that converts position i of a fixed-length tuple with ``types[i]``."""

    class TupleAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            out = []
            for t, v in zip(types, values):
                try:
                    out.append(t(v))
                except ValueError:
                    raise argparse.ArgumentError(self, f"{v!r} is not {'an integer' if t is int else 'a number'}; "
                                                       f"give {' '.join(self.metavar)}") from None
            setattr(namespace, self.dest, tuple(out))

    return TupleAction


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
    if args.name is not None:  # refused before any work when another configuration holds the name
        _check_name(args, probe)
    options = RunOptions(steps=args.steps, results_path=_results_arg(args.results), data=_spec_arg(args.data, "--data"),
                         model=_spec_arg(args.model, "--model"), trust_factory=args.trust_factory,
                         batch_size=args.batch_size, max_examples=args.max_examples, max_tokens=args.max_tokens,
                         dtype=args.dtype, device=args.device, force=args.force, progress=progress.status,
                         allow_nonfinite=args.allow_nonfinite, loss=args.loss, output=args.output,
                         fsdp=getattr(args, "fsdp", False))
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
    from lossatlas import store

    name = args.name
    if name is not None and report.outcomes:
        store.ResultsStore(report.results_path, mode="a").set_name(cls.name, report.key, name)
    label = _label_of_report(report)
    if args.json:
        from lossatlas.finite import strict_json
        from lossatlas.store.json_view import result_json

        steps = [result_json(o.result, key=report.key, label=label, name=name, status=o.status)
                 for o in report.outcomes]
        print(strict_json({"probe": report.probe, "key": report.key, "label": label, "name": name,
                           "results": str(report.results_path), "steps": steps}, default=_json_default))
    else:
        print(f"{label}{f' [name {name}]' if name else ''} (key {report.key})")
        for line in _outcome_lines(report.outcomes):
            print(line)
        print(f"results: {report.results_path}")
    return 0


def _check_name(args: argparse.Namespace, probe) -> None:
    """Refuse ``--name`` when another stored configuration of the probe holds it (exit 2, one line)."""
    from lossatlas import store

    path = Path(args.results) if args.results else store.default_results_path(args.run)
    if not path.exists() or path.is_dir():
        store.ResultsStore.check_name_form(args.name)
        return
    rs = store.ResultsStore(path, mode="r")
    holders = {e["key"]: e["config"] for e in rs.entries(probe.name) if e["name"] == args.name}
    same = [k for k, config in holders.items() if config == probe.config()]  # these settings already hold it
    rs.check_name(probe.name, same[0] if same else None, args.name)


def _label_of_report(report) -> str:
    """The readable label of a probe command's configuration (lossatlas.store.labels)."""
    from lossatlas.store.labels import label_of

    if not report.outcomes:
        return report.probe
    r = report.outcomes[-1].result
    own = r.config if r.probe == report.probe else {}
    return label_of(report.probe, own, r.meta, key=report.key)


def _outcome_lines(outcomes) -> list[str]:
    """One console line per checkpoint: ``step N (status): summary``.

    Checkpoints whose summaries are the same (a trajectory is one PCA of the whole run, whatever the step it is
    stored at) share one line listing their steps.
    """
    lines: list[tuple[list, list, str]] = []  # (steps, statuses, summary)
    for o in outcomes:
        text = _summary(o.result)
        if lines and lines[-1][2] == text:
            lines[-1][0].append(o.step)
            lines[-1][1].append(o.status)
        else:
            lines.append(([o.step], [o.status], text))
    out = []
    for steps, statuses, text in lines:
        what = ", ".join(sorted(set(statuses), key=statuses.index))
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
        out.append(f"{where} ({what}): {text}")
    return out


def _g(x: Any) -> str:
    """A number for the console: 4 significant digits, nan/inf as such."""
    return f"{float(x):.4g}"


def _named(r, name: str, limit: int = 8) -> str | None:
    """``name by dim: coord v, …`` of a 1-D value (``name=[…]`` without coordinates); None when it is not one."""
    import numpy as np

    v = r.values.get(name)
    if v is None or v.ndim != 1 or v.dtype.kind not in "fiub" or v.size == 0:
        return None
    dim = r.dims[name][0]
    coord = r.coords.get(dim)
    labels = [str(c) for c in coord] if coord is not None and len(coord) == v.size else None
    if dim == "group" and isinstance(r.meta.get("groups"), list) and len(r.meta["groups"]) == v.size:
        labels = [str(g) for g in r.meta["groups"]]  # the layer names behind the group indices
    if labels is None and v.size <= limit:
        return f"{name}=[{', '.join(_g(x) for x in v)}]"
    if labels is None:
        return f"{name}: {v.size} values along {dim}, max {_g(np.nanmax(v))}" if np.isfinite(v).any() else None
    numeric = coord is not None and np.asarray(coord).dtype.kind in "iuf" and dim != "group"
    shown = ", ".join(f"{dim}={c}: {_g(x)}" if numeric else f"{c}: {_g(x)}" for c, x in list(zip(labels, v))[:limit])
    return f"{name} by {dim}: {shown}" + (" …" if v.size > limit else "")


def _summary(r) -> str:
    """A useful one-line summary of a Result for the console (per probe where the generic one says little)."""
    fn = _SUMMARIES.get(r.probe)
    if fn is not None:
        try:
            return fn(r)
        except (KeyError, ValueError, IndexError, TypeError):  # an older or partial result: the generic line
            pass
    return _generic_summary(r)


def _generic_summary(r, skip: tuple[str, ...] = ()) -> str:
    parts = []
    for k, v in r.values.items():
        if k in skip:
            continue
        if v.ndim == 0 and v.dtype.kind in "fiub":
            parts.append(f"{k}={_g(v)}")
        elif v.ndim == 1:
            text = _named(r, k)
            if text is not None:
                parts.append(text)
    return " ".join(parts) if parts else "(no scalar values; see --json or `lossatlas plot`)"


def _surface_summary(r) -> str:
    import numpy as np

    loss = np.asarray(r.values["loss"], dtype=float)
    x = np.asarray(r.coords["x"], dtype=float)
    y = np.asarray(r.coords["y"], dtype=float) if "y" in r.coords and loss.ndim == 2 else None
    grid = loss if loss.ndim == 2 else loss[None, :]
    ys = y if y is not None else np.zeros(1)
    iy, ix = int(np.argmin(np.abs(ys))), int(np.argmin(np.abs(x)))
    shape = f"{len(x)}×{len(ys)} grid x∈[{_g(x[0])}, {_g(x[-1])}]" + (f", y∈[{_g(ys[0])}, {_g(ys[-1])}]"
                                                                       if y is not None else "")
    done = int(np.isfinite(grid).sum())
    parts = [shape, f"loss at the centre {_g(grid[iy, ix])}"]
    if done:
        lo = np.unravel_index(int(np.nanargmin(grid)), grid.shape)
        where = f"x={_g(x[lo[1]])}" + (f", y={_g(ys[lo[0]])}" if y is not None else "")
        parts.append(f"min {_g(np.nanmin(grid))} at ({where}), max {_g(np.nanmax(grid))}")
    if done < grid.size:
        parts.append(f"{done} of {grid.size} points evaluated")
    if "accuracy" in r.values:
        acc = np.asarray(r.values["accuracy"], dtype=float).reshape(grid.shape)
        parts.append(f"accuracy at the centre {_g(acc[iy, ix])}")
    quad = r.meta.get("quadratic") or {}
    for axis in ("x", "y"):
        verdict = (quad.get(axis) or {}).get("verdict") if isinstance(quad, dict) else None
        if verdict:
            parts.append(f"{axis}: {verdict.split(';')[0].split(':')[0]}")
    return "; ".join(parts)


def _trajectory_summary(r) -> str:
    import numpy as np

    ratio = np.asarray(r.values["explained_variance_ratio"], dtype=float)
    loss = np.asarray(r.values["loss"], dtype=float)
    steps = r.coords.get("checkpoint")
    dist = np.asarray(r.values["distance_to_plane"], dtype=float)
    span = f"{len(loss)} checkpoints" + (f" ({int(steps[0])}…{int(steps[-1])})" if steps is not None else "")
    pcs = ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(ratio))
    out = (f"PCA plane of {span} around step {r.meta.get('final_step', r.step)}: {pcs} of the variance; "
           f"loss {_g(loss[0])} → {_g(loss[-1])}; farthest from the plane {_g(np.nanmax(dist))}")
    if "loss_at_projection" in r.values:
        gap = np.nanmax(np.abs(np.asarray(r.values["loss_at_projection"], dtype=float) - loss))
        out += f"; projected loss off by at most {_g(gap)}"
    return out


def _interpolate_summary(r) -> str:
    import numpy as np

    loss = np.asarray(r.values["loss"], dtype=float)
    head = (f"{r.meta.get('from_step', r.step)} → {r.meta.get('to_step')} over {loss.size} points: "
            f"loss {_g(loss[0])} → {_g(loss[-1])}")
    parts = [head]
    for q in ("loss", "error"):
        if f"{q}_barrier" in r.values:
            mean = r.values.get(f"{q}_endpoint_mean_barrier")
            parts.append(f"{q} barrier {_g(r.values[f'{q}_barrier'])}"
                         + (f" (endpoint-mean {_g(mean)})" if mean is not None else ""))
    for kind, what in (("single", "moving one layer"), ("first", "moving the first k layers"),
                       ("last", "moving the last k layers")):
        text = _named(r, f"{kind}_loss_barrier")
        if text is not None:
            parts.append(f"{what}: {text.split(': ', 1)[-1]}")
    return "; ".join(parts)


_SUMMARIES = {"surface": _surface_summary, "trajectory": _trajectory_summary, "interpolate": _interpolate_summary}


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
                               step_pattern=args.step_pattern, overwrite=args.force, step=args.step, log=args.log)
    print(f"imported {len(steps)} checkpoint(s) (steps {steps[0]}…{steps[-1]}) into {args.output}"
          + (f", with the log of {args.log}" if args.log else ""))
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
        from lossatlas.store.labels import configurations

        entries = store.ResultsStore(path, mode="r").entries()
        configs = sorted(configurations(entries), key=lambda c: (c["probe"], c["key"]))
        summary = [_config_summary(c) for c in configs]
        if args.json:
            from lossatlas.finite import strict_json

            print(strict_json({"path": path, "kind": "results", "entries": len(entries), "results": summary}))
            return 0
        print(f"results    {path}")
        print(f"entries    {len(entries)} ({len(summary)} probe settings)")
        for c in summary:
            steps = [x for x in c["steps"] if x is not None]
            span = f"steps {steps[0]} … {steps[-1]} ({len(c['steps'])})" if steps else "no step"
            partial = f", {c['partial']} partial" if c["partial"] else ""
            named = f"  [name {c['name']}]" if c["name"] else ""
            print(f"  {c['label']}{named}")
            print(f"           key {c['probe']}/{c['key']}  {span}{partial}  written {c['written']}")
            settings = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in c["settings"].items())
            print(f"           settings {settings or '(all defaults)'}")
        return 0
    checks = store.ResultsStore(path, mode="r").verify()
    if args.json:
        print(json.dumps({"path": path, "kind": "results", "entries": len(checks), "verify": {"results": checks}},
                         default=_json_default))
    else:
        _print_results_checks(Path(path), checks)
    return _verify_exit(path, {}, Path(path), checks)


def _config_summary(c: dict) -> dict:
    """One stored configuration for ``info RESULTS``: label, name, probe, key, settings, steps, when written."""
    import datetime

    from lossatlas.store.labels import changed_settings

    last = c["entries"][-1]
    config = last["config"]
    # stored with the entry; an entry written before that has its defaults looked up in the probe (imports torch)
    settings = last.get("changed") if last.get("changed") is not None else changed_settings(c["probe"], config)
    when = datetime.datetime.fromtimestamp(c["written_at"]).isoformat(timespec="seconds") if c["written_at"] else None
    return {"label": c["label"], "name": c["user_name"], "probe": c["probe"], "key": c["key"],
            "settings": settings, "config": config, "steps": c["steps"], "written": when,
            "partial": sum(e["status"] == "partial" for e in c["entries"])}


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from lossatlas.analysis.diagnose import checkpoint_sharpness, diagnose_command

    path = _existing(args.run)
    curvature = None if args.no_curvature else checkpoint_sharpness(
        path, trust_factory=args.trust_factory, model=_spec_arg(args.model, "--model"),
        data=_spec_arg(args.data, "--data"))
    text, data = diagnose_command(path, as_json=args.json, sensitivity=args.sensitivity, window=args.window,
                                  curvature_fn=curvature)
    print(text)  # with --json: strict JSON (diagnose_command; NaN as null, named under "nonfinite")
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from lossatlas.analysis.tracking import track_eigenspaces

    try:
        res = track_eigenspaces(_existing(args.run), steps=args.steps, k=args.top_k, curvature=args.curvature,
                                tol=args.tol, data=_spec_arg(args.data, "--data"), batch_size=args.batch_size,
                                max_examples=args.max_examples, results_path=_results_arg(args.results),
                                model=_spec_arg(args.model, "--model"), trust_factory=args.trust_factory,
                                allow_nonfinite=args.allow_nonfinite, basis_device=args.basis_device)
    except ValueError as exc:  # a setting the tracker refuses (curvature, k above the parameter count, …)
        raise UserError(_with_prefix("track", exc)) from None
    steps = res.values["steps"]
    from lossatlas.store.labels import label_of

    key = res.meta.get("key")
    label = label_of(res.probe, res.config, res.meta, key=key)
    if args.json:
        from lossatlas.finite import strict_json
        from lossatlas.store import default_results_path
        from lossatlas.store.json_view import result_json

        if "step" not in res.coords:
            res.add_coord("step", steps)  # the checkpoint steps label the rows of every value
        path = Path(args.results) if args.results else default_results_path(args.run)
        print(strict_json({"probe": res.probe, "key": key, "label": label, "name": None, "results": str(path),
                           "steps": [result_json(res, key=key, label=label, status="computed")]},
                          default=_json_default))
        return 0
    print(label + (f" (key {key})" if key else ""))
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
                            results_path=_results_arg(args.results), select=args.select)
    print(f"figure: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lossatlas.analysis.reporting import report_command

    with _writing(args.output):
        path = report_command(_existing(args.run), output=args.output, overwrite=args.force,
                              results_path=_results_arg(args.results), select=args.select)
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lossatlas.demo import run_demo

    run_demo(args.out, steps=args.steps, overwrite=args.force)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
