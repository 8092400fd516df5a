"""A probe's parts shown with it: ``plot`` and ``report`` merge each part's stored Results into its owner's.

A probe with parts (``Probe.parts``; e.g. ``lossatlas hessian --blocks layers`` also runs ``hessian_blocks``)
stores its own Result and each part's under their own names and keys. Here a stored group of a part
(``part_of``) joins the newest stored group of its owner that agrees with it on every setting they share
except the owner's ``part_fields`` (the curvature operator, tolerances, seed, ...): at each step both hold,
computed on the same data, the part's Result is merged into the owner's (``Probe.merge``), and the part's
group is not shown on its own. Of several groups of one part that join the same owner group, the newest
does; a part group that joins none is shown on its own.
"""

from __future__ import annotations

from typing import Any

from lossatlas.probes.catalog import declared  # the probes' declarations without importing them (nor torch)

Group = tuple[str, str]  # (probe, config key)


def parts_of(probe: str) -> tuple[str, ...]:
    """The registered probes that are parts of ``probe`` (their ``part_of``), in registration order."""
    return tuple(name for name, cls in declared().items() if cls.part_of == probe)


def with_parts(groups: dict[Group, list]) -> dict[Group, list]:
    """``groups`` with every part group that joins an owner group merged into it and left out.

    ``groups`` is as ``reporting.results_by_config`` gives it: (probe, key) → [((Result, info) or None,
    entry)], newest group first; the order is kept.
    """
    joined: dict[Group, dict[str, Group]] = {}
    for part in groups:
        owner = _owner(part[0])
        if owner is None:
            continue
        for group in groups:
            if group[0] == owner and _agree(owner, _config(groups[group]), _config(groups[part])) \
                    and _steps(groups[group]) & _steps(groups[part]):
                if part[0] not in joined.setdefault(group, {}):
                    joined[group][part[0]] = part
                break
    used = {part for chosen in joined.values() for part in chosen.values()}
    out: dict[Group, list] = {}
    for group, found in groups.items():
        if group in used:
            continue
        chosen = joined.get(group)
        out[group] = found if not chosen else [_merged(group[0], f, e, [groups[p] for p in chosen.values()])
                                               for f, e in found]
    return out


def _owner(probe: str) -> str | None:
    probes = declared()
    cls = probes.get(probe)
    owner = cls.part_of if cls is not None else None
    return owner if owner in probes else None


def _config(found: list) -> dict:
    return next((f[0].config for f, _ in found if f is not None), {})


def _steps(found: list) -> set:
    return {(f[0].step, f[1].get("data_fingerprint")) for f, _ in found if f is not None}


def _agree(owner: str, owner_config: dict, part_config: dict) -> bool:
    """Equal on every setting both have, the owner's ``part_fields`` aside."""
    skip = set(declared()[owner].part_fields)
    return all(owner_config[k] == v for k, v in part_config.items() if k in owner_config and k not in skip)


def _merged(owner: str, found: Any, entry: dict, part_groups: list[list]) -> tuple:
    """One stored owner entry ``(found, entry)`` with the parts' Results of its step and data merged in."""
    if found is None:
        return found, entry
    result, info = found
    parts = []
    for part_found in part_groups:
        for f, _ in part_found:
            if f is not None and f[0].step == result.step and \
                    f[1].get("data_fingerprint") == info.get("data_fingerprint"):
                parts.append(f[0])
                break
    return (declared()[owner].merge(result, parts), info), entry


__all__ = ["parts_of", "with_parts"]
