"""Readable names of stored results, and the one resolver of ``--select`` (plot, report, export).

A results file keys each probe configuration by a hash (``/<probe>/<key>/<step>``). A person needs a name
instead, so every entry carries a *label* built from what makes it different from the defaults:

    hessian · ggn · class=3 · top_k=2 · 256 examples

that is the probe, then every setting that differs from the probe class's default (in field order; a few
self-explanatory choices — curvature, subset, directions — as the bare value, the others as ``name=value``),
then the data size when a subset was asked for (``--max-examples``/``--max-tokens``, or a seeded subset of
local data), and the loss and model output when they are not the run's own loss and the logits (which
``lossatlas.analysis.runner`` folds into the key: here they are recovered from the key itself). A user may
also give a configuration a *name* (``--name``), stored on its ``/<probe>/<key>`` group.

``configurations`` groups a file's entries by (probe, key); ``choose`` resolves ``--select NAME|LABEL|KEY``
against them and ``pick_one`` refuses to guess between several. This module imports neither torch nor h5py.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Iterable, Mapping, Sequence

from lossatlas.errors import UserError

SEP = " · "
BARE = ("curvature", "subset", "directions")  # settings whose value alone says what it is
_NO_KEY = object()


def config_hash(probe: str, config: Mapping[str, Any]) -> str:
    """The results-file key of ``probe`` with ``config`` and the run's own loss and output.

    sha256 of ``{"probe": probe, "config": config}`` as sorted JSON, its first 12 hex digits: the same
    text ``Probe.config_hash`` hashes, computed here without importing the probe.
    """
    blob = json.dumps({"probe": probe, "config": dict(config)}, sort_keys=True, default=_plain)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    """A numpy number as a Python one (what ``Probe.config`` stores); anything else as its text."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def _keyed(key: str, suffix: str) -> str:
    """The key with a loss/output suffix folded in, as ``lossatlas.analysis.runner._keyed`` makes it."""
    return key if not suffix else hashlib.sha256(f"{key}{suffix}".encode()).hexdigest()[:12]


def _choice_parts(probe: str, config: Mapping[str, Any], meta: Mapping[str, Any], key: str | None) -> list[str]:
    """``loss=…`` / ``output=…`` when the key shows that a non-default loss or output made it."""
    if key is None:
        return []
    base = config_hash(probe, config)
    if key == base:
        return []
    loss, output = meta.get("loss"), meta.get("output")
    for parts in ([f"loss={loss}"], [f"output={output}"], [f"loss={loss}", f"output={output}"]):
        suffix = "".join("+" + p.replace("=", ":", 1) for p in parts)
        if _keyed(base, suffix) == key:
            return parts
    return [p for p, v in (("loss", loss), ("output", output)) if v is not None and (p != "output" or v != "logits")]


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_value_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _setting_text(name: str, value: Any, default: Any) -> str:
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if name in ("max_examples", "max_tokens") and isinstance(value, int):
        return f"{value} {name.split('_')[1]}"
    if name in BARE and isinstance(value, str):
        return value
    return f"{name}={_value_text(value)}"


def _data_parts(meta: Mapping[str, Any]) -> list[str]:
    """The data size: ``N examples`` / ``N tokens`` when a subset was asked for."""
    out = []
    subset = meta.get("data_subset")
    examples = meta.get("max_examples")
    if examples is None and isinstance(subset, Mapping):
        examples = subset.get("max_examples")
    if examples is not None:
        out.append(f"{examples} examples")
    tokens = meta.get("max_tokens")
    if tokens is None and isinstance(subset, Mapping):
        tokens = subset.get("max_tokens")
    if tokens is not None:
        out.append(f"{tokens} tokens")
    return out


def probe_defaults(probe: str) -> dict[str, Any] | None:
    """The default of every setting of a registered probe, as its ``config()`` writes them; None if unknown.

    The writer of a result has the probe registry imported already; only a reader of an entry written before
    labels existed imports it here (it imports torch, seconds): every new entry stores its label.
    """
    if "lossatlas.probes.registry" not in sys.modules:
        try:
            import lossatlas.probes.registry  # noqa: F401  (registers every probe)
        except ImportError:  # pragma: no cover - torch missing: settings are listed in full
            return None
    probes = sys.modules.get("lossatlas.probes")
    cls = getattr(probes, "PROBES", {}).get(probe) if probes is not None else None
    if cls is None:
        return _function_defaults(probe)
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            continue
        out[f.name] = json.loads(json.dumps(value, default=_plain))  # as config() stores it: tuples as lists
    return out


# results stored by a function rather than a probe class: (its module, the function whose keyword defaults they are)
_FUNCTIONS = {"hessian_tracking": ("lossatlas.analysis.tracking", "track_eigenspaces")}


def _function_defaults(probe: str) -> dict[str, Any] | None:
    """The keyword defaults of the function that stores ``probe``'s results (when its module is imported)."""
    import inspect

    module, name = _FUNCTIONS.get(probe, (None, None))
    fn = getattr(sys.modules.get(module or ""), name or "", None)
    if fn is None:
        return None
    return {n: json.loads(json.dumps(p.default, default=_plain)) for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def changed_settings(probe: str, config: Mapping[str, Any], defaults: Mapping[str, Any] | None | object = _NO_KEY
                     ) -> dict[str, Any]:
    """The settings of ``config`` that differ from the probe's defaults (all of them when the defaults are unknown)."""
    if defaults is _NO_KEY:
        defaults = probe_defaults(probe)
    if not defaults:
        return dict(config)
    return {k: v for k, v in config.items()
            if k not in defaults or json.loads(json.dumps(v, default=_plain)) != defaults[k]}


def label_of(probe: str, config: Mapping[str, Any], meta: Mapping[str, Any] | None = None, *,
             key: str | None = None, defaults: Mapping[str, Any] | None | object = _NO_KEY) -> str:
    """The readable label of a result: ``probe · setting · … · data size · loss · output``.

    ``defaults`` (default: the registered probe's, ``probe_defaults``) decides which settings differ; with
    None (an unregistered probe, e.g. ``hessian_tracking``) every setting is listed. ``key`` (the
    results-file key) reveals a loss or output other than the run's own.
    """
    meta = meta or {}
    if defaults is _NO_KEY:
        defaults = probe_defaults(probe)
    parts = [probe]
    for name, value in config.items():
        if defaults is not None and name in defaults and json.loads(json.dumps(value, default=_plain)) == defaults[name]:
            continue  # a default setting: not what tells this configuration apart
        if defaults is None and value is None:
            continue  # an unregistered probe's unset setting
        parts.append(_setting_text(name, value, None if defaults is None else defaults.get(name)))
    parts += _data_parts(meta)
    parts += _choice_parts(probe, config, meta, key)
    return SEP.join(parts)


# -- configurations and --select -----------------------------------------------------------------------------------
def configurations(entries: Iterable[Mapping[str, Any]], probe: str | Sequence[str] | None = None) -> list[dict]:
    """Entries (``ResultsStore.entries()``) grouped per (probe, key), newest-written configuration first.

    Each configuration is a dict: ``probe``, ``key``, ``label`` (of its newest entry), ``user_name`` (its
    ``--name`` or None), ``name`` (the user name, else the label, else ``probe/key``; unique in the list:
    a shared one becomes ``probe/key``), ``steps`` (sorted, None first), ``written_at`` (newest) and
    ``entries`` sorted by step.
    """
    wanted = (probe,) if isinstance(probe, str) else tuple(probe) if probe is not None else None
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        if wanted is None or e["probe"] in wanted:
            groups.setdefault((e["probe"], e["key"]), []).append(dict(e))
    out = []
    for (p, k), es in groups.items():
        es.sort(key=lambda e: (e["step"] is not None, e["step"] or 0))
        newest = max(es, key=lambda e: e.get("written_at", 0.0))
        label = newest.get("label") or label_of(p, newest.get("config", {}), newest.get("meta"), key=k)
        user = next((e.get("name") for e in es if e.get("name")), None)
        out.append({"probe": p, "key": k, "label": label, "user_name": user, "name": user or label,
                    "steps": [e["step"] for e in es], "written_at": newest.get("written_at", 0.0), "entries": es})
    out.sort(key=lambda c: -c["written_at"])
    names = [c["name"] for c in out]
    for c in out:
        if names.count(c["name"]) > 1:  # two configurations share a label: their paths tell them apart
            c["name"] = f"{c['probe']}/{c['key']}"
    return out


def title_of(c: Mapping[str, Any]) -> str:
    """What a figure title or report card says of a configuration: ``user name: label``, or the label."""
    label = c.get("label") or c["name"]
    return f"{c['user_name']}: {label}" if c.get("user_name") else label


def steps_text(c: Mapping[str, Any]) -> str:
    """The stored steps of a configuration, e.g. ``0 10 20`` (``none`` for a step-less result)."""
    return " ".join("none" if s is None else str(s) for s in (c.get("steps") or [e["step"] for e in c["entries"]]))


def listing(configs: Iterable[Mapping[str, Any]]) -> str:
    """Configurations as one line: ``label [name N] (key K, steps …)`` each, ``; ``-separated."""
    parts = []
    for c in configs:
        named = f" [name {c['user_name']}]" if c.get("user_name") else ""
        parts.append(f"{c.get('label') or c['name']}{named} (key {c['key']}, steps {steps_text(c)})")
    return "; ".join(parts) or "none stored"


def choose(configs: list[dict], select: str | None, what: str, where: Any) -> list[dict]:
    """The configurations ``select`` names (all of them when None).

    ``select`` matches a configuration's user name, its name, its label, its key or ``probe/key`` (exactly),
    else a probe name (all of that probe's). UserError listing the candidates when it names none.
    """
    if select is None:
        return configs
    text = select.strip()
    chosen = [c for c in configs if text in (c.get("user_name"), c["name"], c.get("label"), c["key"],
                                             f"{c['probe']}/{c['key']}")]
    if not chosen:
        chosen = [c for c in configs if c["probe"] == text]
    if not chosen:
        raise UserError(f"--select {select!r} names no stored {what} in {where}; choose one of: {listing(configs)}")
    return chosen


def pick_one(configs: list[dict], select: str | None, what: str, where: Any) -> dict:
    """The one configuration ``select`` names, or the only one stored.

    UserError (exit 2) listing them (label, key, steps) when several remain: a figure never guesses.
    """
    if not configs:
        raise UserError(f"no {what} stored in {where}")
    chosen = choose(configs, select, what, where)
    if len(chosen) > 1:
        how = "name one with --select NAME|LABEL|KEY" if select is None else "pick one of them by its key"
        raise UserError(f"{len(chosen)} configurations of {what} are stored in {where}; {how}: {listing(chosen)}")
    return chosen[0]
