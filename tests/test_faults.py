"""Bad input and injected faults against the ``lossatlas`` command, from tables (tests/_faults_cases.py).

What holds over every table: no traceback and no hang; exit 2 with one ``lossatlas: error:`` line
for bad input; no input file changed or deleted, no stray file written; no code run from a file
(factory specs this user did not sign, pickles); SIGKILL of a writer or a probe and a full disk
lose nothing committed before. Each case runs in a forked child of this process (lossatlas and
torch are imported once), at most two at a time, in a folder of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import _faults_cases as fc
import pytest
from _faults_cases import Case

FAILURES_FILE = os.environ.get("LOSSATLAS_FAULTS_REPORT")  # JSON lines of every failing case, for triage


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser():
    from lossatlas.cli import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, parser):
    """The fixture library (built in a child), a read-only folder and this user's signing key folder."""
    root = tmp_path_factory.mktemp("faults")
    saved = os.environ.get("LOSSATLAS_CONFIG_DIR")
    os.environ["LOSSATLAS_CONFIG_DIR"] = str(root / "config")
    _warm_imports()
    lib = root / "lib"
    pid = fc.fork_call(lambda: fc.build_library(lib) or 0, stderr=root / "lib.err", env={"MPLBACKEND": "Agg"})
    rc, timed_out = fc.wait(pid, 300)
    assert rc == 0 and not timed_out, f"building the fixture files failed:\n{(root / 'lib.err').read_text()[-3000:]}"
    library = fc.snapshot(lib)
    ro, mounted = root / "ro", False
    if os.geteuid() != 0:
        ro.mkdir()
        for name in ("run.h5", "run.results.h5"):
            shutil.copy2(lib / name, ro / name)
        ro.chmod(0o555)
    elif fc.mount_tmpfs(ro, "8m"):
        mounted = True
        for name in ("run.h5", "run.results.h5"):
            shutil.copy2(lib / name, ro / name)
        if not fc.remount_readonly(ro):
            fc.unmount(ro)
            mounted, ro = False, None
    else:
        ro = None
    context = fc.Context(lib=lib, work=root / "work", ro=ro, other_config=root / "other_config", logs=root / "logs")
    context.work.mkdir()
    yield context
    if mounted:
        fc.unmount(root / "ro")
    elif ro is not None:
        ro.chmod(0o755)
    if saved is None:
        os.environ.pop("LOSSATLAS_CONFIG_DIR", None)
    else:
        os.environ["LOSSATLAS_CONFIG_DIR"] = saved
    assert fc.snapshot(lib) == library, "a case changed the fixture library itself"


def _warm_imports() -> None:
    """Import, once, everything the subcommands import lazily: each forked case then starts warm."""
    import importlib

    for name in ("torch", "torch._dynamo", "h5py", "numpy", "scipy.optimize", "matplotlib", "matplotlib.pyplot",
                 "plotly.graph_objects", "sklearn.datasets", "safetensors.torch", "lossatlas.store", "lossatlas.recorder",
                 "lossatlas.train", "lossatlas.importer", "lossatlas.demo", "lossatlas.analysis.runner",
                 "lossatlas.analysis.diagnose", "lossatlas.analysis.tracking", "lossatlas.analysis.reporting",
                 "lossatlas.viz"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import matplotlib
    import torch

    matplotlib.use("Agg")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its first use imports torch._dynamo


@pytest.fixture(scope="module")
def tables(parser):
    """Every command-line table by name."""
    out = fc.all_option_cases(parser)
    out["run-paths"] = fc.run_path_cases()
    out["output-is-input"] = fc.output_is_input_cases()
    out["read-only"] = fc.readonly_cases()
    out["factory"] = fc.factory_cases()
    out["pickles"] = fc.pickle_cases()
    return out


def assert_all_hold(outcomes: list[fc.Outcome], table: str) -> None:
    """Fail with every broken case of a table listed (skipped cases are reported, not failed)."""
    skipped = [o for o in outcomes if o.problems and o.problems[0].startswith("SKIPPED")]
    failed = [o for o in outcomes if o.problems and o not in skipped]
    if FAILURES_FILE:
        with open(FAILURES_FILE, "a") as f:
            f.writelines(json.dumps({"table": table, "argv": o.case.argv, "note": o.case.note, "rc": o.rc,
                                    "expect": list(o.case.expects), "problems": o.problems,
                                    "stderr": o.stderr[-4000:]}) + "\n" for o in failed)
    assert not failed, f"{len(failed)} of {len(outcomes)} cases in {table!r} broke a promise " \
                       f"({len(skipped)} skipped):\n" + "\n".join(o.describe() for o in failed[:80])


def cli(argv: list[str], cwd: Path, *, timeout: float = fc.TIMEOUT_S, stdout: bool = False):
    """Run one command line in a forked child: (exit code or None on a hang, stderr[, stdout])."""
    stem = cwd.parent / f".cli{time.monotonic_ns()}"
    out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
    pid = fc.fork_call(fc._cli(argv, (), None), stdout=out, stderr=err, cwd=cwd, env={"MPLBACKEND": "Agg"})
    rc, timed_out = fc.wait(pid, timeout)
    texts = [p.read_text(errors="replace") for p in (err, out)]
    err.unlink()
    out.unlink()
    return ((None if timed_out else rc), *texts) if stdout else ((None if timed_out else rc), texts[0])


def clean_failure(rc: int | None, err: str) -> list[str]:
    """What is wrong with an exit-2 answer: a hang, a traceback, more than one line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems = []
    if rc is None:
        problems.append("hang")
    if "Traceback" in err:
        problems.append("traceback")
    if rc == 2 and (len(lines) != 1 or not lines[0].startswith("lossatlas: error:")):
        problems.append(f"{len(lines)} stderr lines")
    return problems


def record(problems: list[str], table: str) -> None:
    if FAILURES_FILE and problems:
        with open(FAILURES_FILE, "a") as f:
            f.writelines(json.dumps({"table": table, "argv": [], "problems": [p], "rc": None, "stderr": ""}) + "\n" for p in problems)


# -- the command-line tables --------------------------------------------------------------------------------
def _misbehave(argv: list[str], folder: Path):
    """A stand-in for the command that breaks the promise its first argument names."""

    def run() -> int:
        import sys

        what = argv[0]
        if what == "traceback":
            raise RuntimeError("boom")
        if what == "two-lines":
            print("lossatlas: warning: noise\nlossatlas: error: bad", file=sys.stderr)
            return 2
        if what == "modify":
            with open(argv[1], "ab") as f:
                f.write(b"x")
        elif what == "stray":
            (folder / "stray.h5").write_bytes(b"")
        elif what == "marker":
            (folder / fc.SPECIAL["marker"]).write_bytes(b"")
        elif what == "hang":
            time.sleep(60)
        elif what == "drop-entry":
            import h5py

            with h5py.File(argv[1], "r+") as f:
                del f["loss"]
            return 0
        print("lossatlas: error: refused", file=sys.stderr)
        return 2

    return run


def test_the_harness_catches_each_broken_promise(ctx):
    expected = {"traceback": "traceback on stderr", "two-lines": "2 stderr lines", "modify": "input modified",
                "stray": "stray files", "marker": "CODE EXECUTED", "hang": "HANG",
                "drop-entry": "earlier results changed or lost", "fine": None}
    cases = [Case("self-test", [what, "{run}"], 0 if what == "drop-entry" else 2, outputs=("run.results.h5",))
             for what in expected]
    cases[-2] = replace(cases[-2], argv=["drop-entry", "{results}"])
    outcomes = fc.run_cases(cases, ctx, timeout=3, child=_misbehave)
    for o, (what, problem) in zip(outcomes, expected.items()):
        if problem is None:
            assert o.problems == [], (what, o.problems)
        else:
            assert any(p.startswith(problem) for p in o.problems), (what, o.problems)


def test_every_subcommand_has_a_table(parser):
    assert set(fc.subcommand_parsers(parser)) == set(fc.SUBCOMMANDS)


def test_case_count(tables):
    every = [c for cases in tables.values() for c in cases]
    per_subcommand = {sub: sum(1 for c in every if c.argv[:1] == [sub]) for sub in fc.SUBCOMMANDS}
    assert len(every) >= 300, len(every)
    assert all(n >= 10 for n in per_subcommand.values()), per_subcommand
    labels = [c.label for cases in tables.values() for c in cases]
    assert len(labels) == len(set(labels)), "a case is listed twice"


@pytest.mark.parametrize("sub", fc.SUBCOMMANDS)
def test_options(sub, tables, ctx):
    assert_all_hold(fc.run_cases(tables[sub], ctx), sub)


@pytest.mark.parametrize("table", ["cli", "run-paths", "output-is-input", "read-only", "factory", "pickles"])
def test_table(table, tables, ctx):
    assert_all_hold(fc.run_cases(tables[table], ctx), table)


def test_crafted_files_are_armed(ctx):
    """Controls for the factory and pickle tables: trusted, the crafted run files do run their code, and
    unpickling the crafted checkpoints without weights_only does too (so a refusal there is meaningful)."""
    cases = [Case("armed", ["loss", "{evil}", "--max-examples", "64", "--trust-factory"], (1, 2),
                  setup=fc.evil_factory(kind, role), sys_path=("evilpkg",), note=f"{kind} {role}")
             for kind, role in (("os", "model"), ("module", "model"), ("module", "data"))]
    for o in fc.run_cases(cases, ctx):
        assert any(p.startswith("CODE EXECUTED") for p in o.problems), (o.case.note, o.problems, o.stderr[-300:])
    for kind in ("zip", "raw", "nested", "tensor_dict"):
        folder = ctx.work / f"armed_{kind}"
        folder.mkdir()
        path = Path(fc.evil_pickle(kind)(folder, ctx)["evil"])

        def load(path=path) -> int:
            import torch

            torch.load(path, weights_only=False)
            return 0

        fc.wait(fc.fork_call(load), 30)
        assert (folder / fc.SPECIAL["marker"]).exists(), kind


# -- kills --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job, kills, seed", [(fc.recorder_job, 10, 11), (fc.train_job, 6, 12)],
                         ids=["recorder", "train"])
def test_sigkill_writer_keeps_committed_checkpoints(job, kills, seed, ctx):
    """SIGKILL a run being written at seeded random moments: every checkpoint committed before the kill is
    there bit for bit (against the same run uninterrupted), the log is a prefix, `info` reads the file."""
    folder = ctx.work / f"kill_{job.__name__}"
    folder.mkdir()
    ref = folder / "reference.h5"
    start = time.monotonic()
    lines, rc, err = fc.run_job(job, ref, kill_after=None)
    span = time.monotonic() - start
    assert rc == 0 and lines[-1] == "closed", err[-2000:]
    reference = fc.read_run(ref)
    problems, live = [], 0
    for i, t in enumerate(fc.kill_times(seed, kills, span * 0.8)):
        for attempt in range(4):  # a run that finished before its kill moment is tried again, earlier
            path = folder / f"killed{i}_{attempt}.h5"
            reported, _, _ = fc.run_job(job, path, kill_after=t)
            if "closed" not in reported:
                break
            t /= 2
        live += "closed" not in reported  # the kill landed while the run was being written
        committed = [int(s) for s in reported if s.isdigit()]
        where = f"kill {i} at {t:.3f}s of {span:.3f}s after {len(committed)} commits"
        found = fc.compare_runs(path, reference, committed) if path.exists() else (
            [f"no file although {len(committed)} checkpoints were committed"] if committed else [])
        if path.exists():
            rc, err, out = cli(["info", str(path), "--json"], folder, stdout=True)
            if committed and rc != 0:
                found.append(f"`info` exits {rc}: {err.strip()[-200:]}")
            found += clean_failure(rc, err) if rc != 0 else []
            if rc == 0 and json.loads(out).get("writer_attached") is not False:
                found.append("`info` reports a writer attached to a killed run")
        problems += [f"{where}: {p}" for p in found]
    record(problems, f"kill-{job.__name__}")
    assert not problems, "\n".join(problems)
    assert live >= kills - 2, f"only {live} of {kills} kills landed while the run was written"


SURFACE = ["surface", "run.h5", "--max-examples", "128", "--xrange", "-1", "1", "19", "--yrange", "-1", "1", "19",
           "--save-every", "20", "--quiet"]


def _surface_loss(results: Path):
    from lossatlas import store

    found = store.ResultsStore(results, mode="r").latest("surface", 20)
    return None if found is None else (found[0].values["loss"], found[1]["status"])


def test_sigkill_probe_mid_write(ctx):
    """SIGKILL `surface` while it writes partial results: the run and every earlier result stay intact and
    readable, and the same command then resumes and finishes with exit 0 and the uninterrupted values."""

    folder = ctx.work / "kill_probe"
    ref = folder / "ref"
    ref.mkdir(parents=True)
    for name in ("run.h5", "run.results.h5"):
        shutil.copy2(ctx.lib / name, ref / name)
    earlier = fc.results_entries(ref / "run.results.h5")
    start = time.monotonic()
    rc, err = cli(SURFACE, ref)
    span = time.monotonic() - start
    assert rc == 0, err[-2000:]
    reference = _surface_loss(ref / "run.results.h5")
    assert reference is not None and reference[1] == "complete"
    run_hash = fc.sha(ctx.lib / "run.h5")
    problems, live = [], 0
    for i, t in enumerate(fc.kill_times(21, 12, span * 0.8)):
        for attempt in range(4):  # a child that finished before its kill moment is tried again, earlier
            k = folder / f"k{i}_{attempt}"
            k.mkdir()
            for name in ("run.h5", "run.results.h5"):
                shutil.copy2(ctx.lib / name, k / name)
            pid = fc.fork_call(fc._cli(SURFACE, (), None), stderr=k / "killed.err", cwd=k, env={"MPLBACKEND": "Agg"})
            time.sleep(t)
            alive = os.waitpid(pid, os.WNOHANG)[0] == 0
            fc.kill(pid)
            if alive:
                break
            t /= 2
        live += alive
        problems += [f"kill {i} at {t:.2f}s of {span:.2f}s: {p}" for p in _after_probe_kill(k, earlier, run_hash, reference)]
    record(problems, "kill-probe")
    assert not problems, "\n".join(problems)
    assert live >= 10, f"only {live} of 12 kills landed while the probe ran"


def test_sigkill_probe_right_after_results_file_is_created(ctx):
    """SIGKILL a probe the moment its results file appears: a rerun still works (exit 0)."""
    problems = []
    run_hash = fc.sha(ctx.lib / "run.h5")
    for i, argv in enumerate((SURFACE, ["loss", "run.h5", "--max-examples", "64"],
                              ["hessian", "run.h5", "--max-examples", "64", "--top-k", "2"])):
        k = ctx.work / f"kill_create{i}"
        k.mkdir()
        shutil.copy2(ctx.lib / "run.h5", k / "run.h5")
        pid = fc.fork_call(fc._cli(argv, (), None), stderr=k / "killed.err", cwd=k, env={"MPLBACKEND": "Agg"})
        deadline = time.monotonic() + 30
        while not (k / "run.results.h5").exists() and time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.0002)
        fc.kill(pid)
        if fc.sha(k / "run.h5") != run_hash:
            problems.append(f"{argv[0]}: the run file changed")
        rc, err = cli(argv, k)
        if rc != 0:
            problems.append(f"{argv[0]}: the rerun after a kill at results-file creation exits {rc}: "
                            f"{err.strip().splitlines()[-1][:200] if err.strip() else ''}")
        problems += [f"{argv[0]} rerun: {p}" for p in clean_failure(rc, err) if rc != 2]
    record(problems, "kill-at-create")
    assert not problems, "\n".join(problems)


def _after_probe_kill(k: Path, earlier: dict, run_hash: str, reference) -> list[str]:
    import numpy as np

    problems = []
    if fc.sha(k / "run.h5") != run_hash:
        problems.append("the run file changed")
    try:
        now = fc.results_entries(k / "run.results.h5")
        lost = [e for e, h in earlier.items() if now.get(e) != h]
        if lost:
            problems.append(f"earlier results changed or lost: {lost[:3]}")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        problems.append(f"the results file is unreadable after the kill ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:150] if str(exc) else ''})")
    rc, err = cli(SURFACE, k)
    if rc != 0:
        problems.append(f"the rerun exits {rc}: {err.strip().splitlines()[-1][:200] if err.strip() else ''}")
        return problems
    try:
        got = _surface_loss(k / "run.results.h5")
        lost = [e for e, h in earlier.items() if fc.results_entries(k / "run.results.h5").get(e) != h]
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return problems + [f"the results file is unreadable after the rerun ({type(exc).__name__})"]
    if lost:
        problems.append(f"earlier results lost after the rerun: {lost[:3]}")
    if got is None or got[1] != "complete":
        problems.append(f"no complete surface after the rerun ({got and got[1]})")
    elif not np.allclose(got[0], reference[0], rtol=1e-5, atol=1e-7, equal_nan=True):
        problems.append("the resumed surface differs from the uninterrupted one")
    return problems


# -- full disk ----------------------------------------------------------------------------------------------
def _fill_setup(leave: int):
    def setup(folder: Path, ctx: fc.Context) -> dict:
        fc.fill(folder, leave)
        return {}

    return setup


def test_disk_full_on_a_nearly_full_tmpfs(ctx):
    """A probe writing results, and `train`, on a nearly full file system (a 2 MiB tmpfs each): exit 2 with one
    line saying the disk is full; earlier results intact; a partly written run still readable."""
    sizes = sum((ctx.lib / n).stat().st_size for n in ("run.h5", "run.results.h5"))
    assert sizes < 1_500_000, "the fixture run no longer fits the 2 MiB tmpfs"
    keep = ("run.results.h5",)
    cases = [
        Case("disk-full", ["surface", "{run}", "--max-examples", "64", "--xrange", "-1", "1", "9", "--yrange", "-1",
                           "1", "9"], 2, match=fc.DISK_FULL, keep_entries=keep, setup=_fill_setup(4096)),
        Case("disk-full", ["hessian", "{run}", "--max-examples", "64", "--top-k", "3", "--store-eigenvectors"], 2,
             match=fc.DISK_FULL, keep_entries=keep, setup=_fill_setup(8192)),
        Case("disk-full", ["loss", "{run}", "--max-examples", "64", "--mode", "train"], 2, match=fc.DISK_FULL,
             keep_entries=keep, setup=_fill_setup(0)),
        Case("disk-full", ["train", "-o", "{new}", "--model", fc.TINY_JSON, "--steps", "400", "--batch-size", "32",
                           "--checkpoint-every", "1"], 2, match=fc.DISK_FULL, keep_entries=("new.h5",),
             setup=_fill_setup(200_000)),
    ]
    outcomes = []
    for i, case in enumerate(cases):
        mnt = ctx.work / f"full{i}"
        if not fc.mount_tmpfs(mnt, "2m"):
            pytest.skip("mounting a tmpfs needs root (the injected-ENOSPC test covers the same code paths)")
        try:
            [o] = fc.run_cases([case], replace(ctx, work=mnt))
            partial = o.folder / "new.h5"
            if partial.exists():
                os.unlink(o.folder / "filler")  # room for `info` to open the file
                rc, err = cli(["info", str(partial)], o.folder)
                if rc != 0:
                    o.problems.append(f"the run left on the full disk is unreadable: `info` exits {rc}: "
                                      f"{err.strip()[-200:]}")
            outcomes.append(o)
        finally:
            fc.unmount(mnt)
    assert_all_hold(outcomes, "disk-full")


def test_disk_full_injected(ctx):
    """ENOSPC injected into the Nth HDF5 write of a child: exit 2 with one line saying the disk is full,
    earlier results kept, no half-written file left behind."""
    keep = ("run.results.h5",)
    surface = ["surface", "{run}", "--max-examples", "64", "--xrange", "-1", "1", "3", "--yrange", "-1", "1", "3"]
    train = ["train", "-o", "{new}", "--model", fc.TINY_JSON, "--steps", "20", "--batch-size", "32",
             "--checkpoint-every", "2"]
    cases = [Case("enospc", surface, 2, match=fc.DISK_FULL, keep_entries=keep, inject=f"enospc:{n}", note=f"write {n}")
             for n in (1, 3, 8)]
    cases += [Case("enospc", ["loss", "{run}", "--max-examples", "64", "--mode", "train"], 2, match=fc.DISK_FULL,
                   keep_entries=keep, inject=f"enospc:{n}", note=f"write {n}") for n in (1, 4)]
    cases += [Case("enospc", ["track", "{run}", "--top-k", "2", "--max-examples", "64", "--steps", "15,20"], 2,
                   match=fc.DISK_FULL, keep_entries=keep, inject="enospc:2", note="write 2")]
    cases += [Case("enospc", train, 2, match=fc.DISK_FULL, keep_entries=("new.h5",), inject=f"enospc:{n}",
                   note=f"write {n}") for n in (1, 12, 60)]
    cases += [Case("enospc", ["import", "{ckpt}", "{ckpt20}", "-o", "{new}", "--model", fc.TINY_JSON], 2,
                   match=fc.DISK_FULL, inject="enospc:8", note="write 8")]
    outcomes = fc.run_cases(cases, ctx)
    for o in outcomes:
        partial = o.folder / "new.h5"
        if partial.exists():
            rc, err = cli(["info", str(partial)], o.folder)
            if rc != 0:
                o.problems.append(f"a half-written run is left behind: `info` exits {rc}: {err.strip()[-160:]}")
    assert_all_hold(outcomes, "enospc")
