"""The ``hessian_blocks`` probe: per-layer spectra, the top eigenvalues of each layer's diagonal curvature block.

The block of layer ℓ is H_ℓℓ = ∂²L/∂θ_ℓ² (θ_ℓ: the parameters the layer's module owns); its top
``block_k`` eigenvalues come from Lanczos with full reorthogonalization, with the same stopping rule as the
``hessian`` probe's (``lossatlas.probes.spectrum``). ``lossatlas hessian --blocks layers`` runs this probe as
a part, stored under its own key.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lossatlas.curvature import parameter_blocks
from lossatlas.probes.base import ProbeContext, Result, register_probe
from lossatlas.probes.operators import CurvatureProbe
from lossatlas.probes.settings import check_choice
from lossatlas.probes.spectrum import TOL, top_eigenpairs


def check_blocks(prefix: str, blocks: object) -> None:
    """ValueError unless ``blocks`` is "layers" or a valid regex over layer names."""
    if not isinstance(blocks, str) or not blocks:
        raise ValueError(f"{prefix}blocks must be None, 'layers' or a regex over layer names, got {blocks!r}")
    if blocks != "layers":
        try:
            re.compile(blocks)
        except re.error as exc:
            raise ValueError(f"{prefix}blocks={blocks!r} is not a valid regex ({exc}); use 'layers'") from None


@register_probe
@dataclass(frozen=True, kw_only=True)
class HessianBlocks(CurvatureProbe):
    """Per-layer spectra: the top ``block_k`` eigenvalues of each layer's diagonal curvature block.

    Attributes:
        blocks: "layers" (one block per module owning parameters) or a regex selecting layers (or their
            parameters) by name.
        block_k: eigenvalues per block (rows NaN-padded where a block has fewer parameters).
        tol / criterion / max_iter / block_size / seed: the Lanczos settings, as the ``hessian`` probe's.
        curvature / subset / mode / path / dtype: the operator (``lossatlas.probes.operators``).
    Values: "block_top_eigenvalues" ("block", "k") with the coordinate "block" (layer names).
    """

    name: ClassVar[str] = "hessian_blocks"
    summary: ClassVar[str] = "per-layer spectra: top eigenvalues of each layer's diagonal curvature block"
    splits_work: ClassVar[bool] = True  # under torchrun: data-parallel products over ctx.dist
    section: ClassVar[str] = "curvature"
    figure: ClassVar[str | None] = None  # shown in the hessian figure, merged (part_of)
    title: ClassVar[str] = "per-layer spectra"
    usage: ClassVar[str] = "--steps last --blocks layers"
    part_of: ClassVar[str | None] = "hessian"

    blocks: str = "layers"
    block_k: int = 3
    tol: float = TOL
    criterion: str = "residual"
    max_iter: int | None = None
    block_size: int = 1

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        self.check_curvature_settings()
        check_blocks(f"{self.name}: ", self.blocks)
        self.check_int("block_k", self.block_k, 1)
        self.check_positive("tol", self.tol)
        check_choice("criterion", self.criterion, ("residual", "eigenvalue"), prefix=f"{self.name}: ")
        if self.max_iter is not None:
            self.check_int("max_iter", self.max_iter, 1)
        self.check_int("block_size", self.block_size, 1)

    def run(self, ctx: ProbeContext) -> Result:
        """The top eigenvalues of every selected layer's block."""
        t0 = time.perf_counter()
        batches = self.curvature_batches(ctx)
        layer_blocks = parameter_blocks(ctx.model, "layer")
        if self.blocks != "layers":
            rx = re.compile(self.blocks)
            layer_blocks = {b: ns for b, ns in layer_blocks.items() if rx.search(b) or any(rx.search(n) for n in ns)}
            if not layer_blocks:
                raise ValueError(f"{self.name}: blocks={self.blocks!r} matches no layer; layers are "
                                 f"{', '.join(parameter_blocks(ctx.model, 'layer'))}")
        names, rows, mv, path = [], [], 0, None
        for bname, pnames in layer_blocks.items():
            op = self.curvature_operator(ctx, batches, params=pnames, check_deterministic=False)
            res = top_eigenpairs(op, self.block_k, which="LA", tol=self.tol, max_iter=self.max_iter, seed=self.seed,
                                 block_size=self.block_size, criterion=self.criterion, return_eigenvectors=False)
            row = np.full(self.block_k, np.nan)
            row[: res.eigenvalues.shape[0]] = res.eigenvalues
            names.append(bname or "(root)")
            rows.append(row)
            mv += op.matvecs
            path = path or op.path
        res = self.new_result(ctx.step, self.operator_meta(ctx, self.curvature_operator(ctx, batches), batches))
        res.add("block_top_eigenvalues", np.stack(rows), ("block", "k"), {"block": np.asarray(names, dtype=str)})
        res.meta.update(block_matvecs=mv, path=path, matvecs=mv, elapsed_s={"blocks": time.perf_counter() - t0})
        return res


__all__ = ["HessianBlocks", "check_blocks"]
