"""The ``plot`` and ``report`` commands: read a run and its results file and draw them.

Files are read through lossatlas.store and drawn with lossatlas.viz. The CLI calls ``plot_command`` and
``report_command``; both raise UserError on bad input.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lossatlas import store
from lossatlas.analysis import kinds
from lossatlas.analysis.findings import summarize
from lossatlas.analysis.parts import parts_of, with_parts
from lossatlas.errors import UserError
from lossatlas.store import default_results_path  # not from the runner, which imports torch
from lossatlas.store.labels import choose, configurations, pick_one, title_of
from lossatlas.viz import figures as vizfig
from lossatlas.viz.report import SECTIONS, ReportItem, ReportSection, figures_page, render_report
from lossatlas.viz.style import MATPLOTLIB_FORMATS, save_figure
from lossatlas.viz.training import constants_sentence

PLOT_FORMATS: tuple[str, ...] = (*MATPLOTLIB_FORMATS, ".html")


# -- reading ---------------------------------------------------------------------------------------------------
def _open_run(run_path: str | Path) -> store.RunReader:
    run_path = Path(run_path)
    if not run_path.exists():
        raise UserError(f"{run_path}: no such run file; check the path (make one with `lossatlas train`)")
    return store.RunReader(run_path)


def _results_store(run_path: Path, results_path: str | Path | None,
                   reader: store.RunReader | None = None) -> store.ResultsStore | None:
    """The run's results file (None if there is none at the default path).

    Given the run's ``reader``, a results file recorded for another run is refused.
    """
    path = Path(results_path) if results_path is not None else default_results_path(run_path)
    if not path.exists():
        if results_path is not None:
            raise UserError(f"{path}: no such results file; check --results or run a probe first")
        return None
    return store.ResultsStore(path, mode="r", run_fingerprint=reader.fingerprint() if reader is not None else None)


def results_by_config(results: store.ResultsStore, probe: str | None = None) -> dict[tuple[str, str], list]:
    """Every stored (probe, config key) with its Results sorted by step; newest-written groups first."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in results.entries(probe):
        groups.setdefault((e["probe"], e["key"]), []).append(e)
    order = sorted(groups, key=lambda g: -max(e["written_at"] for e in groups[g]))
    out = {}
    for g in order:
        entries = sorted(groups[g], key=lambda e: -1 if e["step"] is None else e["step"])
        out[g] = [(results.read(g[0], g[1], e["step"]), e) for e in entries]
    return out


def _probe_groups(results: store.ResultsStore, probe: str) -> dict[tuple[str, str], list]:
    """``probe``'s stored groups with its parts merged in (lossatlas.analysis.parts), newest first."""
    groups = results_by_config(results, probe)
    for part in parts_of(probe):  # shown with it, merged step by step
        groups.update(results_by_config(results, part))
    return {g: found for g, found in with_parts(groups).items() if g[0] == probe}


def latest_results(results: store.ResultsStore | None, probe: str) -> list:
    """The Results of ``probe`` under its most recently written config, over all its stored steps."""
    if results is None:
        return []
    groups = _probe_groups(results, probe)
    if not groups:
        return []
    first = next(iter(groups.values()))
    return [found[0] for found, _ in first if found is not None]


def selected_results(results: store.ResultsStore | None, probe: str, select: str | None,
                     where: Any = "the results file") -> tuple[list, dict | None]:
    """The Results of the one configuration of ``probe`` that ``select`` names, and that configuration.

    ``select`` is a user name, a label, a config key or ``probe/key`` (``lossatlas.store.labels.choose``);
    None picks the only stored configuration and refuses (UserError, exit 2, listing label, key and steps of
    each) when there are several: a figure never guesses which settings it shows. ``([], None)`` when none
    is stored.
    """
    if results is None:
        return [], None
    groups = _probe_groups(results, probe)
    if not groups:
        return [], None
    configs = [c for c in configurations(results.entries(probe)) if (c["probe"], c["key"]) in groups]
    chosen = pick_one(configs, select, f"{probe!r} results", where)
    found = groups[(chosen["probe"], chosen["key"])]
    return [f[0] for f, _ in found if f is not None], chosen


def _lr_series(reader: store.RunReader) -> tuple[np.ndarray, np.ndarray] | None:
    if "lr" not in reader.log_names():
        return None
    log = reader.log(["lr"])
    return (log["step"], log["lr"]) if np.isfinite(log["lr"]).any() else None


def _check_output(output: str | Path, overwrite: bool, formats: tuple[str, ...], run_path: str | Path,
                  results_path: str | Path | None) -> Path:
    output = Path(output)
    results = Path(results_path) if results_path is not None else default_results_path(run_path)
    for what, path in (("run file", Path(run_path)), ("results file", results)):
        if store.same_file(output, path):  # --force or not: an output never replaces what it is drawn from
            raise UserError(f"{output}: that is the {what} this command reads; write the output to another "
                            "path (e.g. -o report.html)")
    if output.suffix.lower() not in formats:
        raise UserError(f"{output}: unsupported output format {output.suffix or '(none)'!r}; "
                        f"use one of {', '.join(formats)}")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    if not output.parent.exists():
        raise UserError(f"{output.parent}: no such directory; create it first")
    return output


def _write_atomically(output: Path, write) -> Path:
    """Write through a temporary file next to ``output``, then rename: a failed write leaves no half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=output.suffix, dir=output.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


# -- plot ---------------------------------------------------------------------------------------------------------
def plot_command(run_path: str | Path, kind: str, *, step: int | None = None, output: str | Path,
                 overwrite: bool = False, results_path: str | Path | None = None, select: str | None = None) -> Path:
    """Draw ``kind`` ("training" or a probe name) of a run to ``output``; returns the written path.

    The suffix picks the format: .pdf/.png/.svg via matplotlib, .html via plotly (self-contained). ``select``
    names the configuration to draw (``selected_results``); with several stored and none named the command is
    refused, listing them. The figure's title carries the configuration's label.
    """
    try:
        kinds.check_kind(kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    output = _check_output(output, overwrite, PLOT_FORMATS, run_path, results_path)
    run_path = Path(run_path)
    reader = _open_run(run_path)
    log, results, lr, label = None, None, None, None
    if kind == "training":
        log = reader.log()
        if log["step"].size == 0:
            raise UserError(f"{run_path}: the run has no per-step log to plot; record one with lossatlas.Recorder "
                            "(`lossatlas train` does)")
    else:
        store_ = _results_store(run_path, results_path, reader)
        where = store_.path if store_ is not None else run_path
        results, chosen = selected_results(store_, kind, select, where)
        label = title_of(chosen) if chosen is not None else None
        if not results:
            cmd = kinds.command_of(kind).replace("RUN", str(run_path))
            raise UserError(f"no {kind!r} result stored for {run_path} yet; compute it with `{cmd}`")
        if step is not None and all(r.step != step for r in results):
            have = ", ".join(str(r.step) for r in results)
            raise UserError(f"no {kind!r} result at step {step}; stored steps: {have} "
                            f"(or compute it with `lossatlas {kind} {run_path} --step {step}`)")
        lr = _lr_series(reader)
    figure = kinds.figure_of(kind)
    if output.suffix.lower() == ".html":
        figs = vizfig.interactive_figures(figure, results, log=log, step=step, lr=lr, label=label)
        if not figs:
            raise UserError(f"the stored {kind!r} result holds nothing to draw; recompute it with "
                            f"`{kinds.command_of(kind).replace('RUN', str(run_path))} --force`")
        page = figures_page(f"{label or kind} — {run_path.name}", figs, subtitle=_subtitle(reader, run_path))
        return _write_atomically(output, lambda p: p.write_text(page, encoding="utf-8"))
    fig = vizfig.paper_figure(figure, results, log=log, step=step, lr=lr, label=label)
    return _write_atomically(output, lambda p: save_figure(fig, p))


# -- report -------------------------------------------------------------------------------------------------------
def _subtitle(reader: store.RunReader, run_path: Path) -> str:
    steps = reader.steps()
    span = f"checkpoints {steps[0]}…{steps[-1]} ({len(steps)})" if steps else "no checkpoints"
    return f"{run_path} · {span} · created {reader.created_at or 'unknown'} · lossatlas {reader.lossatlas_version}"


def _overview_item(reader: store.RunReader) -> ReportItem:
    steps = reader.steps()
    table: dict[str, Any] = {
        "model": reader.model_spec, "data": reader.data_spec, "loss": reader.loss or "unknown",
        "optimizer": reader.optimizer, "checkpoints": f"{len(steps)}: {', '.join(map(str, steps[:20]))}"
                                                       + (" …" if len(steps) > 20 else ""),
        "file size": f"{reader.size_bytes() / 2**20:.2f} MiB",
    }
    for k, v in reader.attrs.items():
        table[k] = _maybe_json(v)
    return ReportItem(title="Run settings", table=table, folded=True)  # the summary opens the page; specs fold away


def _maybe_json(v: Any) -> Any:
    import json

    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _result_item(probe: str, key: str, found: list, figures: list, label: str | None = None) -> ReportItem:
    results = [r for (r, _), _e in found]
    infos = [info for (_, info), _e in found]
    last = results[-1]
    steps = [r.step for r in results]
    table: dict[str, Any] = {}
    for name, v in last.values.items():
        arr = np.asarray(v)
        if arr.ndim == 0 and arr.dtype.kind in "fiub" and len(table) < 24:
            table[name] = float(arr) if arr.dtype.kind == "f" else arr.item()
    partial = sum(i["status"] == "partial" for i in infos)
    subtitle = ((f"{label} · " if label else "")
                + f"config key {key} · steps {', '.join(map(str, steps))} · values of step {last.step} below"
                + (f" · {partial} partial (rerun the command to finish)" if partial else "")
                + f" · {sum(i['elapsed_s'] for i in infos):.1f} s compute")
    title = kinds.title_of(probe) + (f" — {label}" if label else "")  # which settings this card shows
    return ReportItem(title=title, subtitle=subtitle, table=table, config=last.config, figures=figures)


def _diagnosis(reader) -> dict:
    """The spike diagnosis of the run's log as a dict (``Diagnosis.to_dict()``), for the summary's findings."""
    from lossatlas.analysis.diagnose import diagnose

    return diagnose(reader).to_dict()


def _diagnosis_item(reader) -> ReportItem:
    """The loss-spike diagnosis of the run's log (lossatlas diagnose, without curvature) as a report item."""
    from lossatlas.analysis.diagnose import diagnose, render_text
    from lossatlas.viz.dynamics import spikes_plotly

    d = diagnose(reader)
    data = d.to_dict()
    table = {"spikes": len(data["spikes"]), "diverged": data["diverged"]}
    for i, entry in enumerate(data["spikes"][:5]):
        table[f"spike {i + 1} (step {entry['spike']['peak']})"] = entry["verdict"]
    fig = spikes_plotly(data)
    return ReportItem(title="Loss spikes and divergence", subtitle=render_text(d).splitlines()[0],
                      table=table, figures=[fig] if fig is not None else [])


def _selected_groups(configs: list[dict], select: Sequence[str] | str | None, where: Any) -> dict[str, set] | None:
    """{probe: keys to show} for the probes ``select`` names (None: show everything)."""
    if not select:
        return None
    keep: dict[str, set] = {}
    for text in [select] if isinstance(select, str) else select:
        for c in choose(configs, text, "result", where):
            keep.setdefault(c["probe"], set()).add(c["key"])
    return keep


def report_command(run_path: str | Path, *, output: str | Path, overwrite: bool = False,
                   results_path: str | Path | None = None, select: Sequence[str] | str | None = None) -> Path:
    """Write ONE self-contained, offline HTML report of a run; returns the written path.

    The report holds an overview (specs, training curves, telemetry) and every stored result with its figures and
    config, in sections: one card per stored configuration, titled with its label (and user name), so it never
    has to pick one configuration of a probe over another. ``select`` (names, labels or keys, as ``plot
    --select``) keeps, of each probe it names, only the configurations it names.
    """
    output = _check_output(output, overwrite, (".html",), run_path, results_path)
    run_path = Path(run_path)
    reader = _open_run(run_path)
    sections = {name: ReportSection(name) for name in SECTIONS}
    overview = sections["overview"]
    overview.items.append(_overview_item(reader))
    log = reader.log()
    if log["step"].size:
        curves = [f for f in vizfig.interactive_figures("training", log=log)]
        overview.items.append(ReportItem(title="Training curves", figures=curves[:1],
                                         subtitle=f"{log['step'].size} logged steps",
                                         note=constants_sentence(log)))  # a constant (η) is a sentence, not a panel
        sections["instabilities"].items.append(ReportItem(
            title="Per-tensor telemetry", figures=curves[1:],
            subtitle="gradient norm per parameter tensor (log colour scale): a layer whose norm jumps first "
                     "often starts a loss spike"))
        sections["instabilities"].items.insert(0, _diagnosis_item(reader))
    else:
        overview.items.append(ReportItem(title="Training curves", subtitle="the run has no per-step log"))
    lr = _lr_series(reader) if log["step"].size else None
    results = _results_store(run_path, results_path, reader)
    shown: dict[tuple[str, str], list] = {}
    if results is not None:
        configs = {(c["probe"], c["key"]): c for c in configurations(results.entries())}
        keep = _selected_groups(list(configs.values()), select, results.path)
        for (probe, key), found in with_parts(results_by_config(results)).items():
            found = [(f, e) for f, e in found if f is not None]
            if not found or (keep is not None and probe in keep and key not in keep[probe]):
                continue
            rs = [f[0] for f, _ in found]
            shown[(probe, key)] = rs  # what the summary's findings read
            c = configs.get((probe, key))
            label = title_of(c) if c else None
            figs = vizfig.interactive_figures(kinds.figure_of(probe), rs, lr=lr, label=label)
            section = kinds.section_of(probe)
            sections.setdefault(section, ReportSection(section)).items.append(
                _result_item(probe, key, found, figs, label))
    for name, spec in SECTIONS.items():
        if not sections[name].items:
            if spec.shown_empty:
                sections[name].note = spec.empty_note
            else:
                del sections[name]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    summary = summarize(reader, shown, _diagnosis(reader) if log["step"].size else None)
    page = render_report(f"lossatlas report — {run_path.name}", list(sections.values()),
                         subtitle=_subtitle(reader, run_path) + f" · report written {stamp}", summary=summary)
    return _write_atomically(output, lambda p: p.write_text(page, encoding="utf-8"))
