"""Step selections: ``all``, ``last``, ``first``, ``1000``, ``100,200,300``, ``0:5000:500``."""

from __future__ import annotations

from typing import Sequence

from lossatlas.errors import UserError

STEP_HELP = "use 'all', 'last', 'first', one step (1000), a list (100,200) or a range start:stop[:stride] (0:5000:500)"


def select_steps(spec: str | int | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """The run's steps that ``spec`` selects, in increasing order.

    A range ``start:stop:stride`` keeps the available steps s with start ≤ s ≤ stop (either bound
    may be empty) and (s − start) divisible by stride. Explicit steps must exist in the run.
    """
    steps = sorted(int(s) for s in available)
    if not steps:
        raise UserError("the run holds no checkpoints yet; record some with the Recorder or `lossatlas import`")
    if spec is None:
        spec = "last"
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        wanted = [int(s) for s in spec]
        return _require(wanted, steps)
    text = spec.strip().lower()
    if text == "all":
        return steps
    if text == "last":
        return [steps[-1]]
    if text == "first":
        return [steps[0]]
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError
            start = int(parts[0]) if parts[0] else steps[0]
            stop = int(parts[1]) if parts[1] else steps[-1]
            stride = int(parts[2]) if len(parts) == 3 and parts[2] else 1
            if stride <= 0:
                raise ValueError
            chosen = [s for s in steps if start <= s <= stop and (s - start) % stride == 0]
            if not chosen:
                raise UserError(f"step selection {spec!r} matches none of the run's steps ({_describe(steps)}); {STEP_HELP}")
            return chosen
        wanted = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"malformed step selection {spec!r}: {STEP_HELP}") from None
    if not wanted:
        raise UserError(f"empty step selection: {STEP_HELP}")
    return _require(wanted, steps)


def _require(wanted: list[int], steps: list[int]) -> list[int]:
    missing = [s for s in wanted if s not in set(steps)]
    if missing:
        raise UserError(f"step {missing[0]} is not in the run (it has {_describe(steps)}); pick one of those or use --steps all")
    return sorted(set(wanted))


def _describe(steps: list[int]) -> str:
    if len(steps) <= 8:
        return "steps " + ", ".join(map(str, steps))
    return f"{len(steps)} steps: {', '.join(map(str, steps[:4]))}, …, {', '.join(map(str, steps[-2:]))}"
