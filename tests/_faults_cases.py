"""Tables and machinery of tests/test_faults.py: fixture files, bad-input cases and a forking runner.

Each case is one ``lossatlas`` command line run in a forked child of the test process (lossatlas and
torch are imported once, so a case costs a fork), inside its own folder that holds fresh copies of
the fixture files it names, with stdout/stderr going to files and a wall-clock limit (a hang is a
failure: the child is killed). ``check`` then holds the promises of the command line:

- the exit code is the expected one, and no child dies of a signal;
- exit 2 prints exactly one non-empty stderr line, starting ``lossatlas: error:``;
- no stderr ever holds "Traceback";
- every file present before the case is byte-identical after it, except the case's declared
  outputs; a results file that may change keeps every entry it held before, bit for bit;
- no new file or folder appears except declared outputs (and those only when exit 0 is expected);
- no marker file appears (a crafted file's code must never run).

Placeholders in an argv: ``{name}`` is a fresh copy of the fixture ``LIB[name]`` in the case folder
(a run brings its ``.results.h5``); ``{missing}`` a path that does not exist, ``{dir}`` an empty
folder named like a run file, ``{new}`` the output run path, ``{nodir}`` a folder that does not
exist, ``{ro}`` a read-only folder holding a run and its results, ``{marker}`` a file that must
never appear.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY = {"name": "mlp", "kwargs": {"widths": [64, 16, 10]}}
TINY_JSON = json.dumps(TINY)
WRONG_WIDTHS = json.dumps({"name": "mlp", "kwargs": {"widths": [64, 32, 10]}})
DIGITS = {"name": "digits"}
TIMEOUT_S = float(os.environ.get("LOSSATLAS_FAULTS_TIMEOUT", "30"))  # a case that runs longer hangs
JOBS = 2  # concurrent children: the machine has 2 cores
MEMORY_LIMIT = 8 * 2**30  # address space of a child: a runaway allocation fails there, not on the machine
DAMAGE = r"damag|corrupt|truncat|checksum|integrity|unreadable|cannot open|not an HDF5|incomplete"
DISK_FULL = r"(?i)disk|space|full|ENOSPC"


def _registered_probes() -> tuple[str, ...]:
    """Every probe the command line offers (each is a subcommand), or the known ones if lossatlas fails to import."""
    try:
        import lossatlas.probes.registry  # noqa: F401  (registers every probe)
        from lossatlas.probes import PROBES as registered
    except Exception:  # noqa: BLE001 - the tests then report the import error themselves
        return ("collapse", "hessian", "interpolate", "loss", "sharpness", "surface", "trajectory", "uniformity")
    return tuple(sorted(registered))


PROBES = _registered_probes()
SUBCOMMANDS = ("demo", "train", "import", "info", "diagnose", "track", "plot", "report", "export", *PROBES)
RUN_READERS = ("info", "diagnose", "track", "plot", "report", "export", *PROBES)  # take a run file
MODEL_BUILDERS = ("diagnose", "track", *PROBES)  # rebuild the run's model and data

# fixture name -> file name in the library (a run's companions are copied with it)
LIB = {
    "run": "run.h5", "results": "run.results.h5", "other": "other.h5", "other_results": "other.results.h5",
    "text": "notes.txt", "text_h5": "notes.h5", "empty": "empty.h5", "plain_h5": "plain.h5",
    "future": "future.h5", "run_t50": "run_t50.h5", "run_t90": "run_t90.h5", "run_flip_sb": "run_flipsb.h5",
    "run_flip_data": "run_flipdata.h5", "results_t50": "results_t50.h5", "results_t90": "results_t90.h5",
    "results_flip_sb": "results_flipsb.h5", "results_flip_data": "results_flipdata.h5",
    "badjson": "badjson.h5", "listspec": "listspec.h5", "nospec": "nospec.h5", "nanrun": "nanrun.h5",
    "ckpt": "ckpt_5.pt", "ckpt20": "ckpt_20.pt", "trunc_pt": "trunc_5.pt", "empty_pt": "empty_5.pt",
    "text_pt": "text_5.pt", "list_pt": "list_5.pt", "bad_safetensors": "bad_5.safetensors",
    "config": "config.json", "png": "old.png", "html": "old.html", "demo_existing": "old_demo",
}
COMPANIONS = {"run.h5": ["run.results.h5"], "other.h5": ["other.results.h5"]}
SPECIAL = {"missing": "missing.h5", "dir": "folder.h5", "new": "new.h5", "nodir": "nodir", "marker": "PWNED"}


# -- cases ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One command line and what must hold after it."""

    table: str
    argv: list[str]
    expect: int | tuple[int, ...] = 2
    match: str | None = None  # regex the error line must match (exit 2)
    outputs: tuple[str, ...] = ()  # case-folder names that may appear or change when exit 0 is expected
    keep_entries: tuple[str, ...] = ()  # results files that may change even on failure, keeping old entries
    setup: Callable[[Path, Context], dict] | None = None  # makes extra inputs; returns more placeholders
    files: dict = field(default_factory=dict)  # placeholder -> an absolute path copied into the case folder
    sys_path: tuple[str, ...] = ()  # case-folder folders put on sys.path in the child
    env: dict = field(default_factory=dict)
    inject: str | None = None  # a fault injected in the child: "enospc:N" (the Nth HDF5 write fails)
    cwd: str | None = None  # absolute folder to run in instead of the case folder
    note: str = ""

    @property
    def expects(self) -> tuple[int, ...]:
        return self.expect if isinstance(self.expect, tuple) else (self.expect,)

    @property
    def label(self) -> str:
        return f"[{self.table}] lossatlas {' '.join(_quote(a) for a in self.argv)}" + (f"  ({self.note})" if self.note else "")


def _quote(arg: str) -> str:
    return arg if arg and re.fullmatch(r"[\w{}./:,=+-]+", arg) else repr(arg)


@dataclass
class Outcome:
    case: Case
    rc: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool
    problems: list[str]
    folder: Path

    @property
    def first_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[0] if lines else ""

    def describe(self) -> str:
        return f"{self.case.label}\n    rc={self.rc} expected {self.case.expects}; {'; '.join(self.problems)}\n" \
               f"    stderr: {self.stderr.strip().splitlines()[-1][:300] if self.stderr.strip() else '(empty)'}"


@dataclass
class Context:
    """Where the fixture library, the read-only folder and the case folders live."""

    lib: Path
    work: Path
    ro: Path | None  # read-only folder holding run.h5 and run.results.h5, or None if none can be made
    other_config: Path  # a LOSSATLAS_CONFIG_DIR with another user's signing key
    logs: Path | None = None  # where the children's stdout/stderr go (default: beside the case folders)
    counter: list = field(default_factory=lambda: [0])


# -- child processes --------------------------------------------------------------------------------------
def _reset_child_state() -> None:
    """Undo what the test runner changed in this (forked) process, so the child behaves like the CLI."""
    import logging
    import warnings

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.resetwarnings()  # Python's own defaults, not pytest's recording filters
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
    logging.root.handlers = []
    with contextlib.suppress(ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import torch

    torch.set_num_threads(1)  # one thread per child; also keeps OpenMP away from the parent's pool


def _redirect(stdout_path: Path | None, stderr_path: Path | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else null
        os.dup2(target, fd)
    # the child's own streams, open until it exits (like the interpreter's)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                       errors="backslashreplace", closefd=False)


def fork_call(fn: Callable[[], int | None], *, stdout: Path | None = None, stderr: Path | None = None,
              cwd: Path | None = None, env: dict | None = None) -> int:
    """Fork a child that runs ``fn()`` (its return value is the exit code; an exception prints a
    traceback and exits 1, as Python does); returns the child's pid, in its own process group."""
    pid = os.fork()
    if pid:
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        return pid
    code = 70
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        _redirect(stdout, stderr)
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        _reset_child_state()
        try:
            code = fn()
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the harness itself failed in the child: say so on the original stderr
        with contextlib.suppress(Exception):
            os.write(2, f"harness error in the child:\n{traceback.format_exc()}".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


def wait(pid: int, timeout: float) -> tuple[int | None, bool]:
    """(exit code or -signal, timed out) of a forked child; a child past ``timeout`` is killed."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            kill(pid)
            return None, True
        time.sleep(0.005)


def kill(pid: int) -> None:
    """SIGKILL a forked child (and its process group) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _cli(argv: list[str], sys_path: Sequence[str], inject: str | None) -> Callable[[], int]:
    def run() -> int:
        sys.path[:0] = list(sys_path)
        if inject:
            inject_fault(inject)
        from lossatlas.cli import main

        return main(argv)

    return run


def inject_fault(spec: str) -> None:
    """In a child: make the Nth HDF5 write (dataset/group/attribute creation or a dataset write) fail
    with ENOSPC, as on a full disk ("enospc:N")."""
    import h5py

    kind, _, n = spec.partition(":")
    assert kind == "enospc", spec
    left = [int(n)]

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def failing(*args: Any, **kwargs: Any) -> Any:
            left[0] -= 1
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args, **kwargs)

        setattr(owner, name, failing)

    for owner, name in ((h5py.Dataset, "__setitem__"), (h5py.Dataset, "resize"), (h5py.Group, "create_dataset"),
                        (h5py.Group, "create_group"), (h5py.Group, "move"), (h5py.AttributeManager, "__setitem__"),
                        (h5py.AttributeManager, "create")):
        wrap(owner, name)


# -- file snapshots ---------------------------------------------------------------------------------------
def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and "dir" for every folder) under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = "link" if os.path.islink(p) else sha(Path(p))
    return out


def results_entries(path: Path) -> dict[str, str]:
    """Every stored entry of a results file (``probe/key/step``) -> a hash of its datasets and attrs."""
    import h5py
    import numpy as np

    out = {}
    with h5py.File(path, "r", swmr=True) as f:
        for p, pg in f.items():
            if not isinstance(pg, h5py.Group):
                continue
            for k, kg in pg.items():
                for s, g in kg.items():
                    if s.startswith(".") or not isinstance(g, h5py.Group):
                        continue
                    h = hashlib.sha256()
                    for name in sorted(g.attrs):
                        if name in ("written_at",):
                            continue
                        h.update(f"{name}={g.attrs[name]!r}".encode())
                    for name in sorted(g):
                        ds = g[name]
                        h.update(name.encode())
                        h.update(np.ascontiguousarray(ds[()]).tobytes() if ds.dtype.kind != "O" else repr(ds[()]).encode())
                    out[f"{p}/{k}/{s}"] = h.hexdigest()
    return out


# -- running tables ---------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    case: Case
    folder: Path
    argv: list[str]
    before: dict[str, str]
    entries: dict[str, dict[str, str]]
    marker: Path
    log: Path
    start: float = 0.0


def _resolve(case: Case, folder: Path, ctx: Context) -> list[str]:
    for name in re.findall(r"\{(\w+)\}", " ".join(case.argv)):  # fixture copies first, then the setup hook
        if name in LIB and not (folder / LIB[name]).exists():
            _copy_fixture(name, folder, ctx)
    extra = case.setup(folder, ctx) if case.setup else {}
    for name, src in case.files.items():
        dst = folder / Path(src).name
        (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, dst)
        extra[name] = str(dst)

    def place(m: re.Match) -> str:
        name = m.group(1)
        if name in extra:
            return str(extra[name])
        if name == "ro":
            if ctx.ro is None:
                raise LookupError("no read-only folder")
            return str(ctx.ro)
        if name in SPECIAL:
            path = folder / SPECIAL[name]
            if name == "dir":
                path.mkdir(exist_ok=True)
            return str(path)
        if name in LIB:
            return str(folder / LIB[name])
        raise KeyError(f"unknown placeholder {{{name}}} in {case.label}")

    return [re.sub(r"\{(\w+)\}", place, a) for a in case.argv]


def _copy_fixture(name: str, folder: Path, ctx: Context) -> None:
    src, dst = ctx.lib / LIB[name], folder / LIB[name]
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    for companion in COMPANIONS.get(LIB[name], []):
        if not (folder / companion).exists():
            shutil.copy2(ctx.lib / companion, folder / companion)


def _prepare(case: Case, ctx: Context) -> _Prepared:
    ctx.counter[0] += 1
    folder = ctx.work / f"case{ctx.counter[0]:04d}"
    folder.mkdir(parents=True)
    argv = _resolve(case, folder, ctx)
    entries = {}
    for name in {*case.outputs, *case.keep_entries}:
        p = folder / name
        if p.suffix == ".h5" and p.exists():
            with contextlib.suppress(Exception):
                entries[name] = results_entries(p)
    logs = ctx.logs or ctx.work
    logs.mkdir(parents=True, exist_ok=True)
    return _Prepared(case, folder, argv, snapshot(folder), entries, folder / SPECIAL["marker"], logs / folder.name)


def run_cases(cases: Sequence[Case], ctx: Context, *, jobs: int = JOBS, timeout: float = TIMEOUT_S,
              child: Callable[[list[str], Path], Callable[[], int]] | None = None) -> list[Outcome]:
    """Run every case (at most ``jobs`` children at a time) and check each; outcomes in case order.

    ``child(argv, folder)`` gives what a child runs (default: ``lossatlas.cli.main(argv)``)."""
    queue = list(enumerate(cases))
    running: dict[int, tuple[int, _Prepared]] = {}
    outcomes: dict[int, Outcome] = {}
    while queue or running:
        while queue and len(running) < jobs:
            i, case = queue.pop(0)
            try:
                prep = _prepare(case, ctx)
            except LookupError as exc:  # e.g. no read-only folder on this machine
                outcomes[i] = Outcome(case, None, "", "", 0.0, False, [f"SKIPPED: {exc}"], ctx.work)
                continue
            env = {"MPLBACKEND": "Agg", **case.env}
            fn = child(prep.argv, prep.folder) if child else \
                _cli(prep.argv, [str(prep.folder / p) for p in case.sys_path], case.inject)
            pid = fork_call(fn,
                            stdout=prep.log.with_suffix(".out"), stderr=prep.log.with_suffix(".err"),
                            cwd=Path(case.cwd) if case.cwd else prep.folder, env=env)
            prep.start = time.monotonic()
            running[pid] = (i, prep)
        for pid in list(running):
            i, prep = running[pid]
            done, status = os.waitpid(pid, os.WNOHANG)
            timed_out = not done and time.monotonic() - prep.start > timeout
            if not done and not timed_out:
                continue
            if timed_out:
                kill(pid)
                rc = None
            else:
                rc = os.waitstatus_to_exitcode(status)
            del running[pid]
            outcomes[i] = check(prep, rc, timed_out, time.monotonic() - prep.start, timeout)
        time.sleep(0.003)
    return [outcomes[i] for i in range(len(cases))]


def check(prep: _Prepared, rc: int | None, timed_out: bool, elapsed: float, timeout: float = TIMEOUT_S) -> Outcome:
    """The promises of one finished case; the list of what broke (empty: it held)."""
    case = prep.case
    out, err = (prep.log.with_suffix(s).read_text(errors="replace") for s in (".out", ".err"))
    problems = []
    if timed_out:
        problems.append(f"HANG (killed after {timeout:.0f} s)")
    elif rc is not None and rc < 0:
        problems.append(f"died of signal {-rc}")
    elif rc not in case.expects:
        problems.append(f"exit {rc}, expected {' or '.join(map(str, case.expects))}")
    if "Traceback" in err:
        problems.append("traceback on stderr")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 2:
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines, expected 1")
        if not lines or not lines[0].startswith("lossatlas: error:"):
            problems.append("stderr does not start with 'lossatlas: error:'")
        elif case.match and 2 in case.expects and not re.search(case.match, lines[0]):
            problems.append(f"error line does not match /{case.match}/")
    if prep.marker.exists():
        problems.append("CODE EXECUTED: the marker file was written")
    after = snapshot(prep.folder)
    allowed = set(case.outputs) if 0 in case.expects else set()
    may_change = allowed | set(case.keep_entries)
    for rel, digest in prep.before.items():
        if rel not in after:
            problems.append(f"input deleted: {rel}")
        elif after[rel] != digest and rel not in may_change:
            problems.append(f"input modified: {rel}")
        elif after[rel] != digest and rel in prep.entries:
            try:
                now = results_entries(prep.folder / rel)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                problems.append(f"results file {rel} unreadable after the case ({type(exc).__name__})")
                continue
            own = case.argv[0] + "/" if rc == 0 else None  # a successful probe may replace its own entries
            lost = [k for k, v in prep.entries[rel].items() if now.get(k) != v and not (own and k.startswith(own))]
            if lost:
                problems.append(f"earlier results changed or lost in {rel}: {', '.join(lost[:3])}")
    stray = sorted(rel for rel in after if rel not in prep.before and not _allowed(rel, may_change)
                   and rel != SPECIAL["marker"])
    if stray:
        problems.append(f"stray files: {', '.join(stray[:4])}")
    return Outcome(case, rc, out, err, elapsed, timed_out, problems, prep.folder)


def _allowed(rel: str, allowed: set[str]) -> bool:
    return any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allowed)


# -- the fixture library ----------------------------------------------------------------------------------
def build_library(lib: Path) -> None:
    """Write every fixture file into ``lib`` (runs in a forked child: torch computes on one thread)."""
    import h5py
    import numpy as np
    import torch

    from lossatlas import store
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.surface import Surface
    from lossatlas.train import TrainConfig, train

    lib.mkdir(parents=True, exist_ok=True)
    run = lib / "run.h5"
    train(TrainConfig(model=TINY, data=DIGITS, lr=0.05, momentum=0.9, steps=20, batch_size=64, checkpoint_every=5),
          str(run))
    opts = {"max_examples": 64}
    run_probe(run, Loss(), RunOptions(steps="all", **opts))
    run_probe(run, HessianProbe(top_k=2), RunOptions(steps="last", **opts))
    run_probe(run, Surface(dims=1, xrange=(-1.0, 1.0, 5)), RunOptions(steps="last", **opts))
    other = lib / "other.h5"
    train(TrainConfig(model=TINY, data=DIGITS, lr=0.05, steps=5, batch_size=64, checkpoint_every=5, seed=1), str(other))
    run_probe(other, Loss(), RunOptions(steps="all", **opts))

    (lib / "notes.txt").write_text("not a run file\n")
    (lib / "notes.h5").write_text("plain text that calls itself .h5\n")
    (lib / "empty.h5").write_bytes(b"")
    with h5py.File(lib / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    run_bytes, results_bytes = run.read_bytes(), (lib / "run.results.h5").read_bytes()
    for name, data in (("run", run_bytes), ("results", results_bytes)):
        for pct in (50, 90):
            (lib / f"{name}_t{pct}.h5").write_bytes(data[: len(data) * pct // 100])
        flipped = bytearray(data)
        flipped[38] ^= 0x40  # the root object header address: the superblock checksum no longer matches
        (lib / f"{name}_flipsb.h5").write_bytes(bytes(flipped))
    flip_run_tensor(run, lib / "run_flipdata.h5")
    flip_results_value(lib / "run.results.h5", lib / "results_flipdata.h5")
    for name, attrs in (("future", {"format_version": 99}), ("badjson", {"model": "{not json"}),
                        ("listspec", {"model": "[1, 2]"}), ("nospec", {"model": "null"})):
        shutil.copy2(run, lib / f"{name}.h5")
        with h5py.File(lib / f"{name}.h5", "r+") as f:
            f.attrs.update(attrs)
    write_nan_run(run, lib / "nanrun.h5")

    reader = store.RunReader(run)
    torch.save(reader.checkpoint(5).state_dict(), lib / "ckpt_5.pt")
    torch.save(reader.checkpoint(20).state_dict(), lib / "ckpt_20.pt")
    data = (lib / "ckpt_5.pt").read_bytes()
    (lib / "trunc_5.pt").write_bytes(data[: len(data) // 2])
    (lib / "empty_5.pt").write_bytes(b"")
    (lib / "text_5.pt").write_text("not a checkpoint\n")
    torch.save([torch.zeros(3)], lib / "list_5.pt")
    (lib / "bad_5.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}garbage")
    (lib / "config.json").write_text(json.dumps({"model": TINY, "steps": 2, "batch_size": 32, "checkpoint_every": 1}))
    (lib / "old.png").write_bytes(b"\x89PNG\r\n\x1a\n an old figure")
    (lib / "old.html").write_text("<html>an old report</html>")
    (lib / "old_demo").mkdir()
    shutil.copy2(run, lib / "old_demo" / "run.h5")


def flip_run_tensor(src: Path, dst: Path) -> None:
    """A copy of a run with one bit flipped inside the stored weights of its last checkpoint."""
    import h5py

    shutil.copy2(src, dst)
    with h5py.File(dst, "r", swmr=True) as f:
        ds = f["checkpoints/params"][min(f["checkpoints/params"])]
        row = int((f["checkpoints/step"][:] >= 0).sum()) - 1
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
        offset = info.byte_offset + info.size // 2 + 1
    with open(dst, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))  # a mantissa bit: a silently different weight


def flip_results_value(src: Path, dst: Path) -> None:
    """A copy of a results file with one bit flipped in a stored value of the probe "loss"."""
    import h5py

    shutil.copy2(src, dst)
    with h5py.File(dst, "r") as f:
        group = f["loss"][next(iter(f["loss"]))]
        ds = group[max(s for s in group if not s.startswith("."))]["loss"]
        offset = ds.id.get_offset()
    with open(dst, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x04]))


def write_nan_run(src: Path, dst: Path) -> None:
    """A run written by lossatlas whose last checkpoint holds NaN weights (a diverged run)."""
    import torch

    from lossatlas import store

    reader = store.RunReader(src)
    steps = reader.steps()
    with store.RunWriter(dst, model_spec=dict(reader.model_spec), data_spec=dict(reader.data_spec),
                         loss=reader.loss) as w:
        for step in steps:
            ck = reader.checkpoint(step)
            params = dict(ck.params)
            if step == steps[-1]:
                params = {k: torch.full_like(v, float("nan")) for k, v in params.items()}
            w.write_checkpoint(step, params, ck.buffers)
        log = reader.log()
        w.log_block(log["step"], {k: v for k, v in log.items() if k != "step"})


# -- crafted malicious inputs -------------------------------------------------------------------------------
def evil_factory(kind: str, role: str = "model") -> Callable[[Path, Context], dict]:
    """A setup hook: a copy of the run whose stored ``role`` spec names a factory that writes the marker.

    ``kind``: "os" (``os:system`` running ``touch``), "module" (a module on sys.path writing the marker
    on import and on call), "foreign" (a real signature under another user's key), "forged" (a
    signature of random hex), "tampered" (signed by this user for a harmless command, then edited).
    """

    def setup(folder: Path, ctx: Context) -> dict:
        import h5py

        marker = folder / SPECIAL["marker"]
        path = folder / f"evil_{kind}_{role}.h5"
        shutil.copy2(ctx.lib / "run.h5", path)
        if kind == "module":
            pkg = folder / "evilpkg"
            pkg.mkdir()
            name = f"evil_{folder.name}"
            (pkg / f"{name}.py").write_text(
                "import pathlib\n"
                f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
                "def build(**kwargs):\n"
                f"    pathlib.Path({str(marker)!r}).write_text('called')\n"
                "    raise SystemExit(0)\n")
            spec = {"factory": f"{name}:build", "kwargs": {}}
        else:
            spec = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
        signature = None
        if kind == "foreign":
            signature = sign_with(ctx.other_config, role, spec)
        elif kind == "forged":
            signature = json.dumps({role: hashlib.sha256(b"forged").hexdigest()})
        elif kind == "tampered":
            signature = sign_with(Path(os.environ["LOSSATLAS_CONFIG_DIR"]), role,
                                  {"factory": "os:system", "kwargs": {"command": "true"}})
        with h5py.File(path, "r+") as f:
            f.attrs[role] = json.dumps(spec, sort_keys=True)
            if signature is not None:
                f.attrs["spec_signatures"] = signature
            elif "spec_signatures" in f.attrs:
                del f.attrs["spec_signatures"]
        return {"evil": str(path)}

    return setup


def sign_with(config_dir: Path, role: str, spec: dict) -> str:
    """The ``spec_signatures`` attr a RunWriter would store for ``spec`` under the key in ``config_dir``."""
    try:
        from lossatlas import trust
    except ImportError:  # no signatures yet: a random one is just as untrusted
        return json.dumps({role: hashlib.sha256(str(config_dir).encode()).hexdigest()})
    old = os.environ.get("LOSSATLAS_CONFIG_DIR")
    os.environ["LOSSATLAS_CONFIG_DIR"] = str(config_dir)
    try:
        return trust.sign_specs({role: spec})
    finally:
        if old is None:
            del os.environ["LOSSATLAS_CONFIG_DIR"]
        else:
            os.environ["LOSSATLAS_CONFIG_DIR"] = old


class _Evil:
    """Unpickling this runs ``touch MARKER`` (pickle calls os.system through __reduce__)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(kind: str) -> Callable[[Path, Context], dict]:
    """A setup hook: a checkpoint file whose unpickling would write the marker."""

    def setup(folder: Path, ctx: Context) -> dict:
        import torch

        marker = folder / SPECIAL["marker"]
        evil = _Evil(marker)
        name = {"zip": "evil_7.pt", "raw": "evil_7.pth", "nested": "evil_7.ckpt", "safetensors": "evil_7.safetensors",
                "tensor_dict": "evil_7.bin"}[kind]
        path = folder / name
        if kind == "zip":
            torch.save(evil, path)
        elif kind == "nested":
            torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "extra": evil}, path)
        elif kind == "tensor_dict":
            torch.save({"layers.0.weight": evil}, path)
        else:
            path.write_bytes(pickle.dumps(evil, protocol=2))
        return {"evil": str(path)}

    return setup


# -- the tables -------------------------------------------------------------------------------------------
PROBE_BASE = {
    "loss": {"--max-examples": ["64"]},
    "hessian": {"--max-examples": ["64"], "--top-k": ["2"]},
    "sharpness": {"--max-examples": ["64"], "--measures": ["grad_norm"]},
    "surface": {"--max-examples": ["64"], "--xrange": ["-1", "1", "3"], "--yrange": ["-1", "1", "3"]},
    "interpolate": {"--max-examples": ["64"], "--to-step": ["0"], "--alphas": ["0", "1", "3"]},
    "curve": {"--max-examples": ["64"], "--to-step": ["0"], "--curve-steps": ["2"], "--num-points": ["3"]},
    "trajectory": {"--max-examples": ["64"]},
    "collapse": {"--max-examples": ["64"]},
    "uniformity": {"--max-examples": ["64"]},
}
BASE = {
    "demo": (["demo"], {"--steps": ["1"]}),
    "train": (["train", "-o", "{new}"], {"--model": [TINY_JSON], "--steps": ["2"], "--batch-size": ["32"],
                                         "--checkpoint-every": ["1"]}),
    "import": (["import", "{ckpt}"], {"-o": ["{new}"], "--model": [TINY_JSON]}),
    "info": (["info", "{run}"], {}),
    "diagnose": (["diagnose", "{run}"], {"--no-curvature": []}),
    "track": (["track", "{run}"], {"--top-k": ["2"], "--max-examples": ["64"], "--steps": ["15,20"]}),
    "plot": (["plot", "{run}", "loss"], {"-o": ["fig.png"]}),
    "report": (["report", "{run}"], {"-o": ["report.html"]}),
    "export": (["export", "{run}"], {"--format": ["xarray"], "-o": ["out.nc"]}),
    **{p: ([p, "{run}"], PROBE_BASE.get(p, {"--max-examples": ["64"]})) for p in PROBES},
}
SKIP = None  # a value whose right answer is arguable: not tried

INT_BAD = ("abc", "1.5", "", "nan", "1e30", "-1")
FLOAT_BAD = ("abc", "", "nan", "inf", "-1")
RESULTS_BAD = {"{dir}": 2, "{text}": 2, "{empty}": 2, "{run}": 2, "{other_results}": 2, "{other}": 2,
               "{results_t50}": 2, "{results_t90}": 2, "{results_flip_sb}": 2, "{nodir}/r.h5": 2}
DATA_BAD = {"{": 2, "[1, 2]": 2, "null": 2, '{"name": "nonexistent"}': 2, '{"name": "digits", "kwargs": {"bogus": 1}}': 2,
            "nope.json": 2, '{"name": "digits", "seed": -1}': 2}
MODEL_BAD = {"{": 2, "[1]": 2, '{"name": "nonexistent"}': 2, WRONG_WIDTHS: 2,
             '{"name": "mlp", "kwargs": {"widths": [64, -1, 10]}}': 2}
COMMON_PROBE = {
    "--steps": {"x:y": 2, "7": 2, "1000000000": 2, "-1": 2, "0:20:0": 2, "5:0": 2, "nan": 2, "1e30": 2, "last": 0},
    "--data": DATA_BAD, "--model": MODEL_BAD, "--results": RESULTS_BAD,
    "--batch-size": {"0": 2, "-5": 2, "1000000000": 0},
    "--max-examples": {"0": 2, "-5": 2},
    "--device": {"bogus": 2, "cuda:99": 2, "": 2},
    "--dtype": {"float64": 0},
}
# the options every probe shares go through one code path (the runner): all their values are tried on
# these probes, a sample on the others
COMMON_IN_FULL = ("loss", "hessian", "surface")
COMMON_SAMPLE = {
    "--steps": {"x:y": 2, "7": 2}, "--data": {"{": 2, '{"name": "nonexistent"}': 2},
    "--model": {"{": 2, WRONG_WIDTHS: 2}, "--results": {"{dir}": 2, "{run}": 2, "{results_t50}": 2},
    "--batch-size": {"0": 2}, "--max-examples": {"0": 2}, "--device": {"bogus": 2}, "--dtype": {},
}
SEMANTIC: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {"--steps": {"0": 2, "-5": 2, "1000000000": SKIP},
             "--out": {"{text}": 2, "{ro}/demo": 2, "{demo_existing}": 2, "{run}": 2}},
    "train": {
        "--lr": {"0": 2, "-5": 2, "1e30": SKIP}, "--momentum": {"0": 0}, "--weight-decay": {"0": 0},
        "--warmup": {"0": 0}, "--batch-size": {"0": 0, "1000000000": 0}, "--steps": {"0": 2, "-5": 2, "1": 0},
        "--checkpoint-every": {"0": 2, "1000000000": 0}, "--log-spaced": {"0": 2, "1000000000": 2, "3": 0},
        "--grad-clip": {"0": SKIP, "1": 0}, "--seed": {"0": 0, "1000000000": 0},
        "--model": {**MODEL_BAD, WRONG_WIDTHS: 0, '{"name": "mlp", "kwargs": {"widths": [5, 10]}}': 2},
        "--data": {"{": 2, '{"name": "nonexistent"}': 2, '{"name": "digits", "kwargs": {"test_fraction": 2}}': 2},
        "--loss": {"bogus": 2}, "--optimizer": {"bogus": 2, "ADAM": 2, "adam": 0},
        "--schedule": {"bogus": 2, "cosine": 0},
        "-o": {"{dir}": 2, "{ro}/r.h5": 2, "{run}": 2, "{nodir}/r.h5": 2},
    },
    "import": {
        "-o": {"{dir}": 2, "{ro}/r.h5": 2, "{run}": 2, "{nodir}/r.h5": 2},
        "--model": MODEL_BAD, "--data": {"{": 2, '{"name": "nonexistent"}': 2, "[1]": 2},
        "--loss": {"bogus": 2, "mse": 0}, "--step-pattern": {"(": 2, "ckpt": 2, r"(\w+)\.pt": 2, r"ckpt_(\d+)": 0},
    },
    "diagnose": {"--sensitivity": {"0": 2, "-5": 2, "1e30": 0}, "--window": {"0": 2, "-5": 2, "1000000000": 0},
                 "--model": {"{": 2, "[1]": 2}, "--data": {"{": 2, "[1]": 2}},
    "track": {
        "--steps": COMMON_PROBE["--steps"] | {"last": SKIP, "15,20": 0}, "--top-k": {"0": 2, "-5": 2},
        "--curvature": {"bogus": 2, "HESSIAN": 2, "ggn": 0}, "--tol": {"0": 2, "1e30": SKIP},
        "--data": DATA_BAD, "--model": MODEL_BAD, "--batch-size": {"0": 2, "1000000000": 0},
        "--max-examples": {"0": 2}, "--results": RESULTS_BAD,
    },
    "plot": {
        "--step": {"7": 2, "1000000000": 2, "20": 0, "0": 0},
        "-o": {"{dir}": 2, "fig.xyz": 2, "fig": 2, "{png}": 2, "{nodir}/f.png": 2, "fig.svg": 0, "fig.html": 0,
               "fig.pdf": 0},
        "--results": {**RESULTS_BAD, "{missing}": 2, "{results_flip_data}": 2},
    },
    "export": {"--format": {"bogus": 2, "XARRAY": 2, "vtk": 0, "loss-landscape": 0},
               "-o": {"{dir}": 2, "{nodir}/r.nc": 2, "{run}": 2, "{html}": 2},
               "--select": {"bogus": 2, "": 2}, "--step": {"7": 2, "-1": 2}},
    "report": {"-o": {"{dir}": 2, "report.pdf": 2, "{html}": 2, "{nodir}/r.html": 2},
               "--results": {**RESULTS_BAD, "{missing}": 2, "{results_flip_data}": 2}},
    "loss": {"--mode": {"bogus": 2, "EVAL": 2, "train": 0}, "--max-examples": {"1000000000": 0}},
    "hessian": {
        "--curvature": {"bogus": 2, "HESSIAN": 2, "ggn": 0}, "--top-k": {"0": 2, "-5": 2},
        "--bottom-k": {"1": 0}, "--tol": {"0": 2, "1e30": SKIP},
        "--criterion": {"bogus": 2, "eigenvalue": 0}, "--max-iter": {"0": 2}, "--block-size": {"0": 2},
        "--trace-method": {"bogus": 2}, "--trace-matvecs": {"0": 2, "99": 2}, "--num-probes": {"0": 2},
        "--num-steps": {"0": 2, "1": 2}, "--sigma-squared": {"0": 2}, "--outlier-delta": {"0": 0},
        "--blocks": {"(": 2, "": 2, "layers": 0}, "--block-k": {"0": 2}, "--subset": {"class=abc": 2, "bogus": 2,
                                                                                      "class=": 2, "class=99": 2, "class=3": 0},
        "--mode": {"bogus": 2}, "--path": {"bogus": 2}, "--hessian-dtype": {"bogus": 2, "float64": 0},
        "--seed": {"1000000000": 0}, "--data-resamples": {"0": 2, "1": 2}, "--ci-level": {"0": 2, "1": 2, "1.5": 2, "1e30": 2},
        "--batch-size-scan": {"0": 2, "-5": 2, "abc": 2}, "--scan-batches": {"0": 2},
    },
    "sharpness": {
        "--measures": {"bogus": 2, "grad_norm grad_norm": 2, "": 2, "fisher_rao": 0}, "--rho": {"0": 2},
        "--adaptive-rho": {"0": 2}, "--eta": {"0": 0}, "--norm": {"bogus": 2}, "--sharpness-steps": {"0": 2},
        "--m": {"0": 2, "1000000000": 0}, "--num-samples": {"0": 2, "1": 2}, "--epsilon": {"0": 2},
        "--keskar-dim": {"0": 2}, "--keskar-iters": {"0": 2}, "--fisher": {"bogus": 2}, "--mode": {"bogus": 2},
        "--seed": {"1000000000": 0}, "--sharpness-max-examples": {"0": 2}, "--sharpness-batch-size": {"0": 2},
    },
    "surface": {
        "--dims": {"0": 2, "3": 2, "1": 0},
        "--xrange": {"1 2": 2, "1 -1 5": 2, "-1 1 0": 2, "nan 1 5": 2, "-1 inf 5": 2, "-1 1 2.5": 2, "a b c": 2,
                     "-1 1 5 7": 2, "0 0 5": 2},
        "--yrange": {"1 2": 2, "1 -1 5": 2, "-1 1 0": 2, "nan 1 5": 2},
        "--directions": {"bogus": 2, "checkpoints": 2, "pca": 0}, "--norm": {"bogus": 2}, "--ignore": {"bogus": 2},
        "--dir-type": {"bogus": 2}, "--seed": {"1000000000": 0}, "--bn": {"bogus": 2}, "--bn-batches": {"0": 2}, "--metrics": {"bogus": 2},
        "--chunk-size": {"0": 2}, "--save-every": {"0": 2, "1000000000": 0},
    },
    "interpolate": {
        "--to-step": {"7": 2, "1000000000": 2, "5": 0},
        "--alphas": {"0 1": 2, "1 0 5": 2, "0 1 0": 2, "nan 1 5": 2, "0 1 2.5": 2, "0 inf 3": 2},
        "--dir-type": {"bogus": 2}, "--bn": {"bogus": 2}, "--bn-batches": {"0": 2}, "--chunk-size": {"0": 2},
    },
    "trajectory": {
        "--final-step": {"7": 2, "1000000000": 2}, "--ignore": {"bogus": 2}, "--dir-type": {"bogus": 2},
        "--grid": {"1": 2, "0": 0}, "--margin": {"0": 0}, "--chunk-size": {"0": 2},
    },
    "collapse": {
        "--module": {"nonexistent": 2, "": SKIP}, "--layers": {"nonexistent": 2, "[1, 2]": 2, "depth": 0, "": SKIP},
        "--nc1-variant": {"bogus": 2}, "--collapse-max-examples": {"0": 2}, "--collapse-batch-size": {"0": 2},
        "--mode": {"bogus": 2}, "--minority-threshold": {"0": 2},
    },
    "uniformity": {
        "--module": {"nonexistent": 2, "": SKIP}, "--capture": {"bogus": 2}, "--mode": {"bogus": 2},
        "--t": {"0": 2}, "--alpha": {"0": 2}, "--max-pairs-examples": {"0": 2, "1": 2},
        "--uniformity-max-examples": {"0": 2}, "--uniformity-batch-size": {"0": 2},
        "--augmentation": {"bogus": 2}, "--noise-std": {"0": 0}, "--seed": {"1000000000": 0},
    },
}


def _kind(action) -> str:
    import argparse

    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return "flag"
    if action.choices:
        return "choice"
    t = action.type
    if t is int:
        return "int"
    if t is float:
        return "float"
    if t is None or t is str:
        return "str"

    def convert(text: str) -> Any:
        try:
            return t(text)
        except Exception:  # noqa: BLE001 - a validating type function refuses with its own error
            return None

    if convert("abc") is not None:  # takes any text: JSON or a plain string
        return "json"
    samples = [convert(text) for text in ("3", "10", "1000", "0.5", "0.05")]
    if any(isinstance(v, int) and not isinstance(v, bool) for v in samples):
        return "int"
    if any(isinstance(v, float) for v in samples):
        return "float"
    return "str"


def generic_values(kind: str, builtin: bool = False) -> dict[str, int]:
    """Odd values that every option of a kind must refuse (exit 2). Python's own int() and float() refuse
    the malformed ones alike, so a builtin type gets a sample; a validating type function gets all."""
    ints = ("abc", "", "-1") if builtin else INT_BAD
    floats = ("abc", "nan", "inf", "-1") if builtin else FLOAT_BAD
    return {"int": dict.fromkeys(ints, 2), "float": dict.fromkeys(floats, 2),
            "choice": {"bogus": 2, "": 2}, "str": {"": 2}, "json": {"{": 2}, "flag": {}}[kind]


def subcommand_parsers(parser) -> dict:
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_cases(sub: str, subparser) -> list[Case]:
    """Every option of ``sub`` × odd values (from its type) and the semantic edge values above."""
    prefix, base = BASE[sub]
    common = COMMON_PROBE if sub in COMMON_IN_FULL else COMMON_SAMPLE if sub in PROBES else {}
    semantic = {**common, **SEMANTIC.get(sub, {})}
    cases = []
    for action in subparser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        opt = max(action.option_strings, key=len) if sub not in ("train", "import", "plot", "report") or \
            "-o" not in action.option_strings else "-o"
        if "--steps" in action.option_strings:
            opt = "--steps"
        kind = _kind(action)
        common_only = sub in PROBES and sub not in COMMON_IN_FULL and opt in COMMON_SAMPLE
        values = semantic.get(opt, {}) if common_only else \
            {**generic_values(kind, action.type in (int, float)), **semantic.get(opt, {})}
        for value, expect in values.items():
            if expect is SKIP:
                continue
            tokens = value.split(" ") if ((action.nargs in ("+", "*") or isinstance(action.nargs, int)) and value) \
                else [value]
            rest = [t for k, v in base.items() if k != opt for t in (k, *v)]
            if sub == "diagnose" and opt in ("--model", "--data", "--trust-factory"):
                rest = [t for t in rest if t != "--no-curvature"]
            argv = [*prefix, *rest, opt, *tokens]
            cases.append(Case(sub, argv, expect, outputs=_outputs(sub, argv)))
    return cases


def _outputs(sub: str, argv: list[str]) -> tuple[str, ...]:
    """The files a successful ``argv`` may write in its case folder."""
    out = []
    if sub in PROBES or sub == "track":
        out.append("run.results.h5")
    for flag in ("-o", "--output", "--results", "--out"):
        if flag in argv:
            value = argv[argv.index(flag) + 1]
            if value.startswith("{new}"):
                out.append(SPECIAL["new"])
            elif value and not value.startswith("{"):
                out.append(value)
            elif value in ("{png}", "{html}"):
                out.append(LIB[value[1:-1]])
    if sub == "train" or sub == "import":
        out.append(SPECIAL["new"])
    return tuple(out)


def positional_cases() -> list[Case]:
    """The positional arguments that are not a run file: train's config, import's checkpoints, plot's kind."""
    cases = []
    train_rest = ["--model", TINY_JSON, "--steps", "2", "--batch-size", "32", "--checkpoint-every", "1"]
    for config, expect in {"{": 2, "[1, 2]": 2, '{"bogus": 1}': 2, '{"lr": "abc"}': 2, '{"steps": 1.5}': 2,
                           '{"lr": NaN}': 2, '{"lr": Infinity}': 2, "null": 2, "{dir}": 2, "{missing}": 2,
                           "{empty}": 2, "{text}": 2, "{config}": 0, '{"steps": 2, "seed": -1}': 2}.items():
        cases.append(Case("train", ["train", config, "-o", "{new}", *train_rest], expect,
                          outputs=(SPECIAL["new"],)))
    import_rest = ["-o", "{new}", "--model", TINY_JSON]
    for ckpt, expect in {"{missing}": 2, "{dir}": 2, "{text}": 2, "{trunc_pt}": 2, "{empty_pt}": 2, "{text_pt}": 2,
                         "{list_pt}": 2, "{bad_safetensors}": 2, "{run}": 2, "{ckpt} {ckpt}": 2,
                         "{ckpt} {ckpt20}": 0}.items():
        cases.append(Case("import", ["import", *ckpt.split(" "), *import_rest], expect, outputs=(SPECIAL["new"],)))
    for kind, expect in {"bogus": 2, "": 2, "LOSS": 2, "trajectory": 2, "training": 0, "hessian": 0,
                         "surface": 0}.items():
        cases.append(Case("plot", ["plot", "{run}", kind, "-o", "fig.png"], expect, outputs=("fig.png",)))
    cases.append(Case("interpolate", ["interpolate", "{run}", "--max-examples", "64"], 2, note="no --to-step"))
    for argv, expect in ((["info", "{run}"], 0), (["info", "{run}", "--json"], 0), (["info", "{run}", "--verify"], 0),
                         (["report", "{run}", "-o", "report.html"], 0), (["diagnose", "{run}"], 0),
                         (["diagnose", "{run}", "--json", "--no-curvature"], 0),
                         (["hessian", "{run}", "--max-examples", "64", "--top-k", "0", "--data-ci"], 2),
                         (["hessian", "{run}", "--max-examples", "64", "--preconditioned"], 2),
                         *[(["surface", "{run}", "--max-examples", "64", "--dims", "1", "--xrange", "-1", "1", "3",
                             "--directions", "checkpoints", "--x-step", step], 0 if step == "0" else 2)
                           for step in ("0", "7", "1000000000")],
                         (["surface", "{run}", "--max-examples", "64", "--xrange", "-1", "1", "3", "--yrange", "-1", "1",
                           "3", "--directions", "checkpoints", "--x-step", "0", "--y-step", "7"], 2),
                         (["nonsense-command"], 2), ([], 2)):
        cases.append(Case(argv[0] if argv and argv[0] in SUBCOMMANDS else "cli", argv, expect,
                          outputs=_outputs(argv[0] if argv else "", argv)))
    return cases


def run_argv(sub: str, run: str) -> list[str]:
    """A cheap, valid command line of ``sub`` on the run file ``run``."""
    prefix, base = BASE[sub]
    prefix = [run if a == "{run}" else a for a in prefix]
    return [*prefix, *(t for k, v in base.items() for t in (k, *v))]


RUN_PATHS = {  # what is passed where a run file is wanted -> the error line it must give
    "{missing}": r"no such file", "{dir}": r"folder|director", "{text}": None, "{text_h5}": None, "{empty}": None,
    "{plain_h5}": r"not a lossatlas", "{results}": r"results file", "{future}": r"newer", "{run_t50}": DAMAGE,
    "{run_t90}": DAMAGE, "{run_flip_sb}": DAMAGE, "{badjson}": None,
}


def run_path_cases() -> list[Case]:
    """Every subcommand that reads a run × files that are not a readable run."""
    cases = []
    for sub in RUN_READERS:
        for path, match in RUN_PATHS.items():
            if sub in ("info", "export") and path == "{results}":  # info and export read a results file too
                cases.append(Case("run-paths", run_argv(sub, path), 0, outputs=("out.nc",) if sub == "export" else ()))
                continue
            cases.append(Case("run-paths", run_argv(sub, path), 2, match=match))
    for sub in MODEL_BUILDERS:
        if sub == "diagnose":
            continue  # diagnose rebuilds the model only around a loss spike
        argv = run_argv(sub, "{nospec}")
        cases.append(Case("run-paths", argv, 2, match="model spec", note="no model spec stored"))
        cases.append(Case("run-paths", run_argv(sub, "{listspec}"), 2, note="the stored model spec is a list"))
    for sub in PROBES:
        cases.append(Case("run-paths", run_argv(sub, "{nanrun}"), 2, match=r"(?i)non-finite|nan|inf",
                          note="the last checkpoint holds NaN"))
        cases.append(Case("run-paths", run_argv(sub, "{run_flip_data}"), 2, match=DAMAGE,
                          note="one bit flipped in the last checkpoint's weights"))
    cases.append(Case("run-paths", ["info", "{run_flip_data}", "--verify"], 2, match=DAMAGE,
                      note="one bit flipped in the last checkpoint's weights"))
    cases.append(Case("run-paths", ["info", "{results_flip_data}", "--verify"], 2, match=DAMAGE,
                      note="one bit flipped in a stored result"))
    cases.append(Case("run-paths", ["track", "{run_flip_data}", "--top-k", "2", "--max-examples", "64", "--steps", "all"],
                      2, match=DAMAGE, note="one bit flipped in the last checkpoint's weights"))
    return cases


def output_is_input_cases() -> list[Case]:
    """An output path that is one of the inputs: refused even with --force, the input untouched."""
    mlp = ["--model", TINY_JSON]
    table = [
        ["report", "{run}", "-o", "{run}", "--force"], ["report", "{run}", "-o", "{results}", "--force"],
        ["plot", "{run}", "training", "-o", "{run}", "--force"], ["plot", "{run}", "loss", "-o", "{results}", "--force"],
        ["train", "{config}", "-o", "{config}", "--force"], ["import", "{ckpt}", "-o", "{ckpt}", "--force", *mlp],
        ["import", "{ckpt}", "{ckpt20}", "-o", "{ckpt20}", "--force", *mlp],
        ["import", "{run}", "-o", "{run}", "--force", *mlp], ["demo", "--out", "{run}", "--steps", "1"],
        ["track", "{run}", "--results", "{run}", "--top-k", "2", "--max-examples", "64"],
        ["track", "{run}", "--results", "{other}", "--top-k", "2", "--max-examples", "64"],
        *[[*run_argv(p, "{run}"), "--results", "{run}"] for p in PROBES],
    ]
    return [Case("output-is-input", argv, 2) for argv in table]


def readonly_cases() -> list[Case]:
    """Outputs into a read-only folder: one line, exit 2; reading from there still works."""
    mlp = ["--model", TINY_JSON]
    table = [
        (["train", "-o", "{ro}/new.h5", *mlp, "--steps", "2"], 2), (["import", "{ckpt}", "-o", "{ro}/new.h5", *mlp], 2),
        (["plot", "{run}", "training", "-o", "{ro}/f.png"], 2), (["report", "{run}", "-o", "{ro}/r.html"], 2),
        (["demo", "--out", "{ro}/demo", "--steps", "1"], 2),
        (["loss", "{ro}/run.h5", "--max-examples", "64", "--mode", "train"], 2),
        (["track", "{run}", "--results", "{ro}/t.results.h5", "--top-k", "2", "--max-examples", "64"], 2),
        *[([*run_argv(p, "{run}"), "--results", "{ro}/new.results.h5"], 2) for p in PROBES],
        (["info", "{ro}/run.h5"], 0), (["plot", "{ro}/run.h5", "loss", "-o", "fig.png"], 0),
        (["loss", "{ro}/run.h5", "--steps", "all", "--max-examples", "64"], 0),
        (["report", "{ro}/run.h5", "-o", "report.html"], 0),
    ]
    return [Case("read-only", argv, expect, outputs=("fig.png", "report.html")) for argv, expect in table]


def factory_cases() -> list[Case]:
    """Run files whose stored spec names a factory this user did not sign: refused before any import."""
    cases = []
    for kind, role in (("os", "model"), ("module", "model"), ("module", "data"), ("foreign", "model"),
                       ("forged", "model"), ("tampered", "model")):
        factory = r"os:system" if kind != "module" else r"evil_case\d+:build"
        for sub in MODEL_BUILDERS:
            argv = run_argv(sub, "{evil}")
            if sub == "diagnose":
                argv.remove("--no-curvature")
            cases.append(Case("factory", argv, 2, match=rf"{factory}.*--trust-factory|--trust-factory.*{factory}",
                              setup=evil_factory(kind, role), sys_path=("evilpkg",), note=f"{kind} {role} factory"))
    for argv in (["info", "{evil}"], ["plot", "{evil}", "training", "-o", "fig.png"],
                 ["diagnose", "{evil}", "--no-curvature"]):
        cases.append(Case("factory", argv, 0, setup=evil_factory("module", "model"), sys_path=("evilpkg",),
                          outputs=("fig.png",), note="reads the file, imports nothing"))
    return cases


def pickle_cases() -> list[Case]:
    """Checkpoints whose unpickling would run code: ``import`` refuses them and runs nothing."""
    cases = []
    for kind in ("zip", "raw", "nested", "safetensors", "tensor_dict"):
        cases.append(Case("pickles", ["import", "{evil}", "-o", "{new}", "--model", TINY_JSON], 2,
                          setup=evil_pickle(kind), note=f"{kind} pickle"))
    cases.append(Case("pickles", ["import", "{ckpt}", "{evil}", "-o", "{new}", "--model", TINY_JSON], 2,
                      setup=evil_pickle("zip"), note="a good checkpoint, then a malicious one"))
    return cases


def all_option_cases(parser) -> dict[str, list[Case]]:
    """Per subcommand: its option table plus its positional cases."""
    subs = subcommand_parsers(parser)
    tables = {sub: option_cases(sub, subs[sub]) for sub in SUBCOMMANDS if sub in subs}
    for case in positional_cases():
        tables.setdefault(case.table if case.table in tables else "cli", []).append(case)
    return tables


# -- kills --------------------------------------------------------------------------------------------------
RECORD_STEPS, RECORD_EVERY = 240, 8


def recorder_job(path: Path, report_fd: int) -> Callable[[], int]:
    """A training loop writing ``path`` through ``lossatlas.Recorder``; reports each committed checkpoint."""

    def job() -> int:
        import torch

        from lossatlas import Recorder, models

        model = models.build_model(TINY)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
        with Recorder(str(path), model, opt, model_spec=TINY, data_spec=DIGITS, loss="cross_entropy",
                      checkpoint_every=RECORD_EVERY, max_steps=RECORD_STEPS) as rec:
            rec.checkpoint(0)
            os.write(report_fd, b"0\n")
            for step in range(1, RECORD_STEPS + 1):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                rec.step(step, loss=loss.item(), extra=float(step))
                if step % RECORD_EVERY == 0:
                    os.write(report_fd, f"{step}\n".encode())
        os.write(report_fd, b"closed\n")
        return 0

    return job


TRAIN_ARGV = ["--model", TINY_JSON, "--steps", "200", "--batch-size", "32", "--checkpoint-every", "5", "--quiet"]


def train_job(path: Path, report_fd: int) -> Callable[[], int]:
    """``lossatlas train`` writing ``path``; each committed checkpoint is reported once written."""

    def job() -> int:
        from lossatlas import store
        from lossatlas.cli import main

        original = store.RunWriter.write_checkpoint

        def reporting(self, step, *args, **kwargs):
            original(self, step, *args, **kwargs)
            os.write(report_fd, f"{step}\n".encode())

        store.RunWriter.write_checkpoint = reporting
        code = main(["train", "-o", str(path), *TRAIN_ARGV])
        os.write(report_fd, b"closed\n")
        return code

    return job


def run_job(job_factory, path: Path, *, kill_after: float | None, timeout: float = 60.0) -> tuple[list[str], int | None, str]:
    """Fork ``job_factory(path, fd)``; SIGKILL it after ``kill_after`` s (None: let it finish).

    Returns (lines it reported, exit code or None if killed, its stderr)."""
    r, w = os.pipe()
    err = path.with_suffix(".err")
    pid = fork_call(job_factory(path, w), stderr=err, cwd=path.parent)
    os.close(w)
    if kill_after is None:
        rc, timed_out = wait(pid, timeout)
        assert not timed_out, f"{job_factory.__name__} hung"
    else:
        time.sleep(kill_after)
        kill(pid)
        rc = None
    chunks = []
    while True:
        block = os.read(r, 65536)
        if not block:
            break
        chunks.append(block)
    os.close(r)
    return b"".join(chunks).decode().split(), rc, err.read_text(errors="replace") if err.exists() else ""


def read_run(path: Path) -> tuple[list[int], dict[int, Any], dict[str, Any]]:
    """(steps, step -> Checkpoint with optimizer state, log) of a run file, read through lossatlas."""
    from lossatlas import store

    reader = store.RunReader(path)
    steps = reader.steps()
    return steps, {s: reader.checkpoint(s, optimizer_state=True) for s in steps}, reader.log()


def compare_runs(killed: Path, reference: tuple, reported: list[int]) -> list[str]:
    """What a killed run lost or changed against the same run uninterrupted (empty: nothing)."""
    import numpy as np
    import torch

    ref_steps, ref_ckpts, ref_log = reference
    try:
        steps, ckpts, log = read_run(killed)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        why = f"unreadable after the kill ({type(exc).__name__}: {line}) with {len(reported)} checkpoint(s) committed"
        return [why] if reported else []
    problems = []
    if steps != ref_steps[: len(steps)]:
        problems.append(f"steps {steps} are not a prefix of {ref_steps}")
    lost = [s for s in reported if s not in steps]
    if lost:
        problems.append(f"committed checkpoints lost: {lost}")

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    for s in steps:
        if s not in ref_ckpts:
            continue
        a, b = ckpts[s], ref_ckpts[s]
        if not (same(a.params, b.params) and same(a.buffers, b.buffers)):
            problems.append(f"checkpoint {s} differs from the uninterrupted run")
        elif (a.optimizer_state is None) != (b.optimizer_state is None) or (
                a.optimizer_state and (a.optimizer_state.keys() != b.optimizer_state.keys()
                                       or not all(same(a.optimizer_state[k], b.optimizer_state[k]) for k in a.optimizer_state))):
            problems.append(f"optimizer state of checkpoint {s} differs from the uninterrupted run")
    n = len(log["step"])
    if not np.array_equal(log["step"], ref_log["step"][:n]):
        problems.append("logged steps are not a prefix of the uninterrupted run's")
    else:
        for name, col in log.items():
            if name in ref_log and not np.array_equal(col, ref_log[name][:n], equal_nan=True):
                problems.append(f"log {name!r} differs from the uninterrupted run")
                break
    return problems


def kill_times(seed: int, n: int, span: float) -> list[float]:
    """``n`` seeded kill moments spread over ``span`` seconds (one per equal slice, jittered)."""
    rng = random.Random(seed)
    return [span * (i + rng.random()) / n for i in range(n)]


# -- tmpfs --------------------------------------------------------------------------------------------------
def mount_tmpfs(path: Path, size: str, *, readonly: bool = False) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root only); False when it cannot be done here."""
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, check=False).returncode == 0


def remount_readonly(path: Path) -> bool:
    import subprocess

    return subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, check=False).returncode == 0


def unmount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
