"""The one operator factory of the curvature probes: their settings + a checkpoint → a curvature operator.

``CurvatureProbe`` is the base dataclass of every probe of a curvature operator of the mean loss
(``hessian`` and the probes it runs as parts). Its five settings define the operator; its methods are the
only code that turns (model, data, loss, curvature kind, mode, path, dtype, subset) into one:

- ``curvature``: "hessian" ∇²L, "ggn" (Martens 2014), "fisher" or "empirical_fisher" (``lossatlas.curvature``),
  or the Kronecker-factored GGN approximations "kfac" / "ekfac" (Martens & Grosse 2015; George et al. 2018),
  "kfac_reduce" / "ekfac_reduce" for KFAC-reduce on shared weights (Eschenhagen et al. 2023;
  ``lossatlas.curvature.kfac``);
- ``subset``: None, or "class=3" / "class=0,1": the mean loss over those classes' examples only (class-wise
  spectra);
- ``mode``: the module's "eval" (default) or "train" flag while it is evaluated; ``path``: the HVP path
  ("auto"); ``dtype``: "float32" | "float64" | None (the checkpoint's).

They share ``seed`` too: every random start vector, probe vector and resample is drawn from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lossatlas.batches import Batch, as_batches, map_inputs, num_examples
from lossatlas.curvature import CURVATURES as EXACT_CURVATURES
from lossatlas.curvature import PATHS, CurvatureOperator, make_operator
from lossatlas.curvature.base import GRAPH_CACHE_MODES
from lossatlas.curvature.kfac import KFAC_CURVATURES, KFACOperator, kfac_operator
from lossatlas.finite import describe_nonfinite, nonfinite_counts
from lossatlas.memory import compute_dtype
from lossatlas.probes.base import Probe, ProbeContext
from lossatlas.probes.settings import COMPUTE_DTYPES, DTYPES, MODES, check_choice

# the curvature choices of the probes: the exact operators, then the Kronecker-factored approximations
CURVATURES: tuple[str, ...] = (*EXACT_CURVATURES, *KFAC_CURVATURES)
OPERATOR_FIELDS: tuple[str, ...] = ("curvature", "subset", "mode", "path", "dtype", "graph_cache")
_SUBSET = re.compile(r"^class=(\d+(?:,\d+)*)$")


def parse_subset(subset: str) -> tuple[int, ...]:
    """The class labels named by ``"class=3"`` or ``"class=0,1"`` (ValueError for anything else)."""
    m = _SUBSET.match(str(subset).replace(" ", ""))
    if not m:
        raise ValueError(f"subset must look like 'class=3' or 'class=0,1', got {subset!r}")
    return tuple(sorted({int(c) for c in m.group(1).split(",")}))


def class_subset(batches: Sequence[Batch], classes: Sequence[int]) -> list[Batch]:
    """The batches restricted to the examples whose integer label is in ``classes`` (empty batches dropped).

    The loss over the result is the mean loss over those examples only, so the curvature of the
    result is the Hessian of the class-restricted loss (class-wise spectra).
    """
    wanted = torch.as_tensor(sorted(set(int(c) for c in classes)), dtype=torch.long)
    out: list[Batch] = []
    for x, y in batches:
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(
                f"a class subset needs integer labels of shape (N,), got {tuple(y.shape)} {y.dtype}; "
                "use subset=None for sequence or regression targets"
            )
        keep = torch.isin(y, wanted.to(y.device))
        if bool(keep.any()):
            out.append((map_inputs(lambda t, keep=keep: t[keep], x), y[keep]))
    if not out:
        raise ValueError(f"no example has a label in {list(wanted.tolist())}; check the subset's class numbers")
    return out


@dataclass(frozen=True, kw_only=True)
class CurvatureProbe(Probe):
    """A probe of a curvature operator of the checkpoint's mean loss.

    Holds the settings that define the operator, their checks, and the factory that builds it (see the
    module docstring).

    Attributes:
        graph_cache: keep the double-backward gradient graphs across products: auto (while the memory plan
            fits), on, or off (lean: rebuilt per product; the same numbers, less memory).
    """

    curvature: str = "hessian"
    subset: str | None = None
    mode: str = "eval"
    path: str = "auto"
    dtype: str | None = None
    seed: int = 0  # of every random start vector, probe vector and resample
    graph_cache: str = "auto"  # where the work's memory goes, never its numbers: not part of config()

    def config(self) -> dict:
        """The settings as a JSON-able dict, without ``graph_cache`` (bit-identical numbers either way)."""
        out = super().config()
        out.pop("graph_cache", None)
        return out

    # -- settings ---------------------------------------------------------------------------------------------------
    def operator_settings(self) -> dict[str, Any]:
        """The settings that define the operator, by name (to build a part on the same operator)."""
        return {name: getattr(self, name) for name in OPERATOR_FIELDS}

    def check_curvature_settings(self) -> None:
        """ValueError, prefixed with the probe's name, for a bad operator setting or seed.

        That is an unknown curvature, mode, path, dtype or subset, or a seed that is not an integer ≥ 0.
        """
        prefix = f"{self.name}: "
        check_choice("curvature", self.curvature, CURVATURES, prefix=prefix)
        if self.subset is not None:
            try:
                parse_subset(self.subset)
            except ValueError as exc:
                raise ValueError(f"{prefix}{exc}") from None
        check_choice("mode", self.mode, MODES, prefix=prefix)
        check_choice("path", self.path, PATHS, prefix=prefix)
        check_choice("graph_cache", self.graph_cache, GRAPH_CACHE_MODES, prefix=prefix)
        if self.dtype is not None:
            check_choice("dtype", self.dtype, COMPUTE_DTYPES, prefix=prefix)
        self.check_int("seed", self.seed, 0)

    def check_int(self, name: str, value: Any, minimum: int) -> None:
        """ValueError unless ``value`` is an int ≥ ``minimum``."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{self.name}: {name} must be an integer >= {minimum}, got {value!r}")

    def check_positive(self, name: str, value: Any) -> None:
        """ValueError unless ``value`` is a positive finite number."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(f"{self.name}: {name} must be a positive finite number, got {value!r}")

    # -- the factory ------------------------------------------------------------------------------------------------
    def curvature_batches(self, ctx: ProbeContext) -> list[Batch]:
        """The context's batches, restricted to ``subset``'s classes.

        ValueError at a NaN/inf point, where the curvature is undefined.
        """
        batches = list(ctx.data) if isinstance(ctx.data, (list, tuple)) else as_batches(ctx.data)
        if self.subset is not None:
            batches = class_subset(batches, parse_subset(self.subset))
        bad = nonfinite_counts(dict(ctx.model.named_parameters()))
        if bad:  # say so here rather than fail inside a solver
            raise ValueError(f"{self.name}: the model's parameters hold {describe_nonfinite(bad)}; the curvature is "
                             "undefined there; pick a checkpoint before the run diverged")
        return batches

    def curvature_operator(self, ctx: ProbeContext, batches: Sequence[Batch], **kw: Any) -> CurvatureOperator:
        """The operator of the mean loss over ``batches`` at the context's model.

        ``kw`` as in ``lossatlas.curvature.CurvatureOperator`` (``params=`` for a block). Under torchrun its
        products are data-parallel over ``ctx.dist`` unless ``kw`` gives another ``dist``.
        """
        # a float16/bfloat16 checkpoint is analysed on float32 copies (lossatlas.memory.compute_dtype)
        dtype = compute_dtype(DTYPES[self.dtype] if self.dtype is not None else ctx.dtype, ctx.model)
        kw.setdefault("dist", ctx.dist)
        build = kfac_operator if self.curvature in KFAC_CURVATURES else make_operator
        if build is make_operator:
            kw.setdefault("graph_cache", self.graph_cache)
        return build(self.curvature, ctx.model, list(batches), ctx.loss, mode=self.mode, dtype=dtype,
                     device=ctx.device, path=self.path, **kw)

    def operator_meta(self, ctx: ProbeContext, op: CurvatureOperator, batches: Sequence[Batch]) -> dict[str, Any]:
        """What every curvature result records about its operator and checkpoint.

        Curvature, loss, mode, seed, subset, parameter count, dtype, examples, the SDPA backend the products
        run under, and the learning rate with 2/η when the checkpoint has one.
        """
        meta: dict[str, Any] = {
            "curvature": self.curvature, "loss": ctx.loss, "mode": self.mode, "seed": self.seed,
            "subset": self.subset, "num_params": int(op.shape[0]), "dtype": str(op.dtype).replace("torch.", ""),
            "num_examples": num_examples(batches),
            "attention_backend": op.attention_backend,
        }
        if isinstance(op, KFACOperator):  # exact from the Kronecker factors, beside the estimators' numbers
            meta["kfac_type"] = op.kfac_type
            meta["kfac_trace"] = op.trace()
            meta["kfac_top_eigenvalues"] = op.top_eigenvalues(5)
        if ctx.lr is not None and ctx.lr > 0:
            meta["lr"] = float(ctx.lr)
            meta["two_over_lr"] = 2.0 / float(ctx.lr)
        return meta


__all__ = ["CurvatureProbe", "OPERATOR_FIELDS", "parse_subset", "class_subset"]
