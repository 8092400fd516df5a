"""Shared plumbing of the paper reproductions: output folder, thread count, summary JSON, figures."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def setup_threads() -> int:
    """One torch thread unless LOSSATLAS_THREADS says otherwise.

    Torch's thread pool slows down badly when another process keeps one of its cores busy.
    """
    import torch

    n = int(os.environ.get("LOSSATLAS_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def out_dir(name: str, out: str | Path | None = None) -> Path:
    """experiments/results/<name>/ (or ``out``), created if missing."""
    path = Path(out) if out is not None else RESULTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def jsonable(obj: Any) -> Any:
    """Numbers, arrays and tuples made JSON-safe (NaN/inf become None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_summary(path: Path, summary: dict) -> Path:
    """Write ``summary.json`` with the environment added; returns its path."""
    import torch

    summary = dict(summary)
    summary.setdefault("environment", {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "python": platform.python_version(), "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    target = path / "summary.json"
    target.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return target


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, stem: str) -> list[str]:
    """Save ``fig`` as <stem>.png and <stem>.pdf under ``path``; returns the file names."""
    names = []
    for ext in ("png", "pdf"):
        fig.savefig(path / f"{stem}.{ext}", dpi=130, bbox_inches="tight")
        names.append(f"{stem}.{ext}")
    pyplot().close(fig)
    return names
