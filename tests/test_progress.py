"""Progress reports: one status line per 30 s off a terminal (count, rate, time left), a live line on one, none with --quiet.

References: a fake clock, so every line's time, count, rate (done since the task began / elapsed) and
time left ((total − done) / rate) are known in closed form; the estimators' own product counts
(``EigResult.matvecs``, the trace's ``matvecs``, the grid's point count).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from lossatlas import progress
from lossatlas.estimators import lanczos_eigs
from lossatlas.estimators.trace import hutchinson_trace
from lossatlas.progress import Reporter, duration, report, reporting, task


class FakeClock:
    """A clock that moves ``tick`` seconds at every reading."""

    def __init__(self, tick: float = 1.0) -> None:
        self.t = 0.0
        self.tick = tick

    def __call__(self) -> float:
        now = self.t
        self.t += self.tick
        return now


@pytest.fixture(autouse=True)
def _loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_one_line_per_30_s_with_rate_and_time_left():
    buf = io.StringIO()
    clock = FakeClock(tick=1.0)  # report i comes at t = i s
    with reporting(Reporter(buf, clock=clock, tty=False)):
        for done in range(0, 96):  # 1 product a second, 95 s in all
            report(done, 200, "products", "Lanczos")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3  # at t = 30, 60, 90 s
    for line, t in zip(lines, (30, 60, 90)):
        rate = t / t  # t products in t seconds
        left = (200 - t) / rate
        assert line == (f"lossatlas: Lanczos: {t}/200 products ({100 * t / 200:.0f}%), {rate:.3g} products/s, "
                        f"about {duration(left)} left")
    assert lines[0].endswith("about 2 min 50 s left")


def test_rate_counts_from_the_tasks_first_report_and_a_new_task_restarts_it():
    buf = io.StringIO()
    clock = FakeClock(tick=10.0)
    with reporting(Reporter(buf, clock=clock, tty=False)):
        for done in range(40, 50):  # a resumed grid: 40 of 100 points were done before
            report(done, 100, "points", "surface")
        for done in range(0, 5):  # a new task (another unit): timed from its own start
            report(4 * done, 20, "products", "trace", bound=True)
    lines = buf.getvalue().splitlines()
    # surface: reports at t = 0, 10, …, 90; lines at t = 30 (done 43), 60 (46), 90 (49)
    assert [re.search(r"(\d+)/100", x).group(1) for x in lines[:3]] == ["43", "46", "49"]
    assert lines[0] == "lossatlas: surface: 43/100 points (43%), 0.1 points/s, about 9 min 30 s left"
    # trace: reports at t = 100 … 140 with 0, 4, …, 16 products; one line at t = 130 (12 products in 30 s)
    assert lines[3:] == ["lossatlas: trace: 12/20 products (60%), 0.4 products/s, at most 20 s left"]


def test_terminal_gets_a_live_line_cleared_at_the_end():
    buf = io.StringIO()
    clock = FakeClock(tick=1.0)
    with reporting(Reporter(buf, clock=clock, tty=True)):
        with task("hessian step 3"):
            for done in range(0, 11):
                report(done, 10, "products", "Lanczos")
    out = buf.getvalue()
    draws = [d for d in re.findall(r"\r([^\r\x1b]*)\x1b\[K", out) if d]
    assert len(draws) == 10  # every report but the last (which clears the line), at most 5 a second
    assert draws[5] == "lossatlas: hessian step 3 · Lanczos: 5/10 products (50%), 1 products/s, about 5 s left"
    assert out.endswith("\r\x1b[K")


def test_quiet_silences_every_report():
    buf = io.StringIO()
    progress.set_quiet(True)
    with reporting(Reporter(buf, clock=FakeClock(100.0), tty=False)):
        for done in range(10):
            report(done, 10)
    assert buf.getvalue() == ""


def test_lanczos_reports_its_products():
    P = 300
    A = torch.diag(torch.linspace(0.0, 1.0, P, dtype=torch.float64))  # no gap: runs to max_iter
    buf = io.StringIO()
    with reporting(Reporter(buf, clock=FakeClock(tick=7.0), tty=False)):  # report i at t = 7i
        res = lanczos_eigs(A, k=1, max_iter=40, tol=1e-14)
    lines = buf.getvalue().splitlines()
    # the reports come after 0, 1, …, matvecs products; a line whenever 30 s passed since the last: every 5th
    assert len(lines) == res.matvecs // 5
    for j, line in enumerate(lines, 1):
        assert line.startswith(f"lossatlas: Lanczos: {5 * j}/40 products ({100 * 5 * j / 40:.0f}%), "
                               f"{5 * j / (35 * j):.3g} products/s, at most ")


def test_slq_and_trace_and_surface_report_through_the_same_interface():
    from lossatlas.estimators import slq_density

    A = torch.diag(torch.linspace(0.0, 1.0, 60, dtype=torch.float64))
    buf = io.StringIO()
    with reporting(Reporter(buf, clock=FakeClock(tick=31.0), tty=False)):  # every report after the first: a line
        slq_density(A, num_probes=2, num_steps=5)
        est = hutchinson_trace(A, 20, block=4)
    lines = buf.getvalue().splitlines()
    slq = [x for x in lines if x.startswith("lossatlas: SLQ · Lanczos: ")]
    assert [re.search(r"(\d+)/10 ", x).group(1) for x in slq] == ["2", "4", "6", "8", "10"]
    trace = [x for x in lines if x.startswith("lossatlas: trace: ")]
    assert [int(re.search(r"(\d+)/20 ", x).group(1)) for x in trace] == [4, 8, 12, 16, 20][: len(trace)]
    assert est.matvecs == 20 and len(trace) == 5

    from lossatlas.probes.grid import PointEvaluator, evaluate_grid

    net = torch.nn.Linear(3, 2)
    base = {k: v.detach() for k, v in net.state_dict().items()}
    direction = {k: torch.ones_like(v) for k, v in base.items()}
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    ev = PointEvaluator(net, base, [direction], data, "cross_entropy")
    buf = io.StringIO()
    with reporting(Reporter(buf, clock=FakeClock(tick=31.0), tty=False)):
        out, done = evaluate_grid(ev, np.linspace(-1, 1, 9)[:, None], chunk_size=4)
    assert done.all()
    assert [re.search(r"(\d+)/9 points", x).group(1) for x in buf.getvalue().splitlines()] == ["4", "8", "9"]


def test_cli_status_lines_off_a_terminal_and_quiet(tmp_path, monkeypatch, capsys):
    from conftest import DIGITS, TINY_MLP

    from lossatlas import models
    from lossatlas.cli import main
    from lossatlas.importer import import_checkpoints

    ckpt = tmp_path / "ckpt_5.pt"
    torch.save(models.build_model(TINY_MLP).state_dict(), ckpt)
    run = tmp_path / "run.h5"
    import_checkpoints([ckpt], run, model_spec=TINY_MLP, data_spec=DIGITS, loss="cross_entropy")
    monkeypatch.setattr(progress, "_clock", FakeClock(tick=40.0))  # every reading 40 s later: a line per report
    args = ["hessian", str(run), "--top-k", "1", "--max-examples", "64", "--force"]
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lossatlas: ") and "Lanczos" in x]
    assert lines and all(re.fullmatch(r"lossatlas: hessian step 5 · Lanczos: \d+/\d+ products \(\d+%\), "
                                      r"[\d.e+-]+ products/s, at most .* left", x) for x in lines), err
    assert main([*args, "--quiet"]) == 0
    assert "products/s" not in capsys.readouterr().err
