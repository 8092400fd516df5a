"""The run report: ONE self-contained HTML page (plotly.js inlined once, no CDN, no network request).

It opens with the run at a glance and the findings (``Summary``: what a reader takes away in ten seconds), then every
stored result with its figures, grouped in sections. Settings are readable tables folded away (``<details>``); no
raw JSON is shown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Section:
    """A report section: its heading and the note shown while it is empty (the commands that fill it)."""

    title: str
    empty_note: str = ""
    shown_empty: bool = True  # False: left out of the page while it holds no result


# The report's sections in page order. A probe names its section in its ``section`` class attribute; a
# result of a probe that names none goes to "other".
SECTIONS: dict[str, Section] = {
    "overview": Section("Overview"),
    "instabilities": Section(
        "Instabilities", "Loss spikes and divergence are diagnosed from the per-step telemetry above; "
                         "run `lossatlas diagnose RUN` to add the spike diagnosis here."),
    "curvature": Section(
        "Curvature", "No Hessian results yet: run `lossatlas hessian RUN --steps all` "
                     "(top-k eigenvalues, trace, spectral density, per-layer spectra)."),
    "sharpness": Section("Sharpness", "No sharpness results yet: run `lossatlas sharpness RUN --steps all`."),
    "landscape": Section(
        "Landscape", "No landscape results yet: run `lossatlas surface RUN`, "
                     "`lossatlas interpolate RUN --to-step STEP` or `lossatlas trajectory RUN`."),
    "representations": Section(
        "Representations", "No representation results yet: run `lossatlas collapse RUN --steps all` "
                           "or `lossatlas uniformity RUN --steps all`."),
    "other": Section("Other results", shown_empty=False),
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#0b3954;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}
nav{padding:8px 28px;background:#fff;border-bottom:1px solid #ddd;position:sticky;top:0;z-index:10}
nav a{margin-right:16px;color:#0072B2;text-decoration:none;font-size:14px}
main{padding:8px 28px 40px;max-width:1200px}
section{margin-top:26px}section h2{border-bottom:2px solid #0072B2;padding-bottom:4px}
.item{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 16px;margin:14px 0}
.item h3{margin:0 0 6px;font-size:16px}.meta{color:#555;font-size:13px}
#summary .glance{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;font-size:15px;margin:6px 0 12px}
#summary .glance dt{color:#555}#summary .glance dd{margin:0;font-weight:600}
ul.findings{list-style:none;padding:0;margin:6px 0}ul.findings li{padding:7px 12px;margin:6px 0;border-radius:4px;
background:#eef6fb;border-left:4px solid #0072B2;font-size:15px}ul.findings li.warn{background:#fff4e5;border-color:#D55E00}
ul.findings li.ok{background:#eef8f1;border-color:#009E73}ul.findings b{margin-right:2px}
details{margin:6px 0}details summary{cursor:pointer;color:#0072B2;font-size:13px}
table.nested{margin:0}table.nested th{background:#f8f8f8;font-weight:normal;color:#444}
.note{background:#fff8e1;border-left:4px solid #E69F00;padding:8px 12px;font-size:14px}
pre{background:#f4f4f4;padding:8px;border-radius:4px;overflow:auto;font-size:12px;max-height:320px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f0f0}.fig{margin:8px 0}
"""


SHORT_TABLE = 8  # a card's table of values with more rows than this is folded away below its figures


@dataclass
class ReportItem:
    """One stored result (or the training log) in the report: its figures, key numbers and config."""

    title: str
    figures: list = field(default_factory=list)  # plotly figures
    subtitle: str = ""
    table: dict[str, Any] = field(default_factory=dict)  # name -> value, shown as a two-column table
    config: dict | None = None
    images: list[str] = field(default_factory=list)  # inline <svg> or data: URLs of matplotlib figures
    folded: bool = False  # True: the table is settings, folded away under "settings" (<details>)
    note: str = ""  # a sentence shown above the figures (e.g. what stayed constant, so it is not plotted)


@dataclass(frozen=True)
class Finding:
    """One line of the report's findings: a short ``topic``, the ``text`` (a sentence with numbers) and a ``level``.

    ``level`` is "ok" (nothing to worry about), "info" or "warn" (the reader should look: a spike, the edge of
    stability reached).
    """

    topic: str
    text: str
    level: str = "info"


@dataclass
class Summary:
    """The report's opening: the run at a glance (label → value) and the findings, then optional detail tables."""

    glance: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (caption, header, rows)


@dataclass
class ReportSection:
    """A section of the report; ``note`` says which commands fill it when it has no items."""

    name: str
    items: list[ReportItem] = field(default_factory=list)
    note: str = ""


def plotly_js() -> str:
    """plotly.js itself (the bundled, minified library), to inline once per page."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def figure_div(fig, div_id: str) -> str:
    """A plotly figure as a ``<div>`` + inline script that expects plotly.js already on the page."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def html_page(title: str, body: str, *, subtitle: str = "") -> str:
    """A full, offline HTML page: plotly.js once in the head, then ``body``."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script type=\"text/javascript\">{plotly_js()}</script></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>{body}</body></html>\n"
    )


def figures_page(title: str, figures: Sequence, *, subtitle: str = "") -> str:
    """Several plotly figures on one self-contained page (plotly.js inlined once)."""
    body = "<main>" + "".join(f"<div class=\"fig\">{figure_div(f, f'fig-{i}')}</div>" for i, f in enumerate(figures)) + "</main>"
    return html_page(title, body, subtitle=subtitle)


def _value(v: Any) -> str:
    """A value as readable HTML: numbers to 6 digits, lists joined by commas, dicts as nested tables (never JSON)."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "—"}[v]
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return _table(v, nested=True) if v else "—"
    if isinstance(v, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in v):
            return html.escape(", ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)) or "—"
        return "<br>".join(_value(x) for x in v)
    return html.escape(str(v))


def _table(rows: dict[str, Any], *, nested: bool = False) -> str:
    if not rows:
        return ""
    cls = ' class="nested"' if nested else ""
    return (f"<table{cls}>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>"
                                      for k, v in rows.items()) + "</table>")


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table with a header row (cells are plain text, escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_summary(summary: Summary) -> str:
    """The opening section: the run at a glance (a definition list), the findings (one line each), detail tables."""
    glance = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in summary.glance.items())
    items = "".join(f'<li class="{html.escape(f.level)}"><b>{html.escape(f.topic)}:</b> {html.escape(f.text)}</li>'
                    for f in summary.findings)
    parts = ['<section id="summary"><h2>Summary</h2>', f'<dl class="glance">{glance}</dl>',
             f'<h3>Findings</h3><ul class="findings">{items}</ul>' if items else ""]
    for caption, header, rows in summary.tables:
        parts.append(f"<details><summary>{html.escape(caption)}</summary>{_grid(header, rows)}</details>")
    parts.append("</section>")
    return "".join(parts)


def section_title(name: str) -> str:
    """The heading of section ``name`` (the name itself for a section outside SECTIONS)."""
    return SECTIONS[name].title if name in SECTIONS else name


def render_report(title: str, sections: Sequence[ReportSection], *, subtitle: str = "",
                  summary: Summary | None = None) -> str:
    """The report page: a navigation bar, the summary (when given), then each section with its items.

    A section without items shows its note (the commands that fill it).
    """
    nav = "".join(f"<a href=\"#{s.name}\">{html.escape(section_title(s.name))}</a>" for s in sections)
    parts, n = [], 0
    if summary is not None:
        nav = "<a href=\"#summary\">Summary</a>" + nav
        parts.append(render_summary(summary))
    for s in sections:
        parts.append(f"<section id=\"{s.name}\"><h2>{html.escape(section_title(s.name))}</h2>")
        if not s.items and s.note:
            parts.append(f"<p class=\"note\">{html.escape(s.note)}</p>")
        elif s.note:
            parts.append(f"<p class=\"meta\">{html.escape(s.note)}</p>")
        for item in s.items:
            parts.append(f"<div class=\"item\"><h3>{html.escape(item.title)}</h3>")
            if item.subtitle:
                parts.append(f"<p class=\"meta\">{html.escape(item.subtitle)}</p>")
            if item.note:
                parts.append(f"<p>{html.escape(item.note)}</p>")
            long = len(item.table) > SHORT_TABLE  # a long list of numbers follows the figures, folded
            if item.folded and item.table:
                parts.append(f"<details><summary>settings</summary>{_table(item.table)}</details>")
            elif not long:
                parts.append(_table(item.table))
            for fig in item.figures:
                parts.append(f"<div class=\"fig\">{figure_div(fig, f'plot-{n}')}</div>")
                n += 1
            for img in item.images:
                tag = img if img.lstrip().startswith("<svg") else '<img alt="figure" src="' + img + '">'
                parts.append('<div class="fig">' + tag + "</div>")
            if long and not item.folded:
                parts.append(f"<details><summary>all {len(item.table)} values</summary>{_table(item.table)}</details>")
            if item.config is not None:  # the settings that produced it, as a table folded away
                parts.append(f"<details><summary>settings</summary>{_table(item.config) or 'none'}</details>")
            parts.append("</div>")
        parts.append("</section>")
    return html_page(title, f"<nav>{nav}</nav><main>{''.join(parts)}</main>", subtitle=subtitle)
