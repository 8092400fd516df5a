"""The ``ggn_decomposition`` probe: the GGN split into class-mean, cross-class and within-class parts.

Papyan 2019, "Measurements of Three-Level Hierarchical Structure in the Outliers in the Spectrum of Deepnet
Hessians" (ICML), and Papyan 2020, "Traces of Class/Cross-Class Structure Pervade Deep Learning Spectra" (JMLR):
the Gauss–Newton matrix of softmax cross-entropy is a second moment of gradients indexed by the true class c of
an example and a logit c', and its outliers come from the means of those gradients.

For logits z_i = f(x_i; θ) ∈ R^C, p_i = softmax(z_i) and J_i = ∂z_i/∂θ, the output Hessian is
diag(p_i) − p_i p_iᵀ = Σ_{c'} p_{i,c'} (e_{c'} − p_i)(e_{c'} − p_i)ᵀ, so with g_{i,c'} = J_iᵀ(e_{c'} − p_i)
(= −∇_θ ℓ(z_i, c'), the gradient of the loss for label c') and weights w_{i,c'} = p_{i,c'}/N:

    G = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i = Σ_i Σ_{c'} w_{i,c'} g_{i,c'} g_{i,c'}ᵀ.

With W_{c,c'} = Σ_{i: y_i=c} w_{i,c'} and the weighted means δ_{c,c'} = Σ_{i: y_i=c} w_{i,c'} g_{i,c'} / W_{c,c'}
(true class c, logit c'), the class means ν_{c'} = Σ_c W_{c,c'} δ_{c,c'} / U_{c'} (U_{c'} = Σ_c W_{c,c'}: the
weighted mean over every example of the gradient toward class c'), the weighted variance decomposition is exact:

    G = G_class + G_cross + G_within,
    G_class  = Σ_{c'} U_{c'} ν_{c'} ν_{c'}ᵀ                                        (C class means)
    G_cross  = Σ_{c,c'} W_{c,c'} (δ_{c,c'} − ν_{c'})(δ_{c,c'} − ν_{c'})ᵀ            (C² cross-class means)
    G_within = Σ_i Σ_{c'} w_{i,c'} (g_{i,c'} − δ_{y_i,c'})(g_{i,c'} − δ_{y_i,c'})ᵀ  (within-class)

and G_means = G_class + G_cross = Σ_{c,c'} W_{c,c'} δ_{c,c'} δ_{c,c'}ᵀ = MᵀM with the C² rows
M_{(c,c')} = √W_{c,c'} δ_{c,c'}, whose non-zero eigenvalues are those of the C²×C² Gram matrix M Mᵀ.

C or C − 1, from the softmax's rank: 1ᵀ(e_{c'} − p_i) = 0, so Σ_{c'} p_{i,c'} g_{i,c'} = 0 for every example (the
per-example output Hessian diag p_i − p_i p_iᵀ has rank C − 1). Summed over examples, Σ_{c'} U_{c'} ν_{c'} = 0: the
C class means are linearly dependent and **G_class has rank ≤ C − 1**, always (not only at a minimum). Summed over the
examples of one class, Σ_{c'} W_{c,c'} δ_{c,c'} = 0 for every c: the means averaged over the logit (the true class's
own mean) vanish, and G_means has rank ≤ C² − C = C(C − 1). The un-centred logit gradients ∂z_{c'}/∂θ of Papyan 2019
have C class means; the GGN sees them only through e_{c'} − p_i, i.e. centred by the softmax, which removes one: the
C − 1 outliers of the GGN (and of the Hessian near it) come from the C − 1 non-zero eigenvalues of G_class.
The probe reports each part's eigenvalues and numerical rank, the residual ‖Σ_{c'} U_{c'} ν_{c'}‖ /
max_{c'} ‖U_{c'} ν_{c'}‖ (0 up to rounding) and how much of each top GGN eigenvalue each part carries:
λ_k = u_kᵀG_class u_k + u_kᵀG_cross u_k + u_kᵀG_within u_k for the top eigenvectors u_k of G.

The class-pair sums Σ_{i∈c} w_{i,c'} g_{i,c'} are C² vector–Jacobian products (a backward pass of
Σ_{i∈c} z_iᵀ v_i with v_i = p_{i,c'}(e_{c'} − p_i)/N held fixed); the eigenvalues of G and G_within come from
block Lanczos on G and on v ↦ Gv − MᵀMv (block size C). Defaults: ``top_k`` = C² (capped by the parameter
count), float64, the model's eval mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lossatlas.curvature import GGNOperator
from lossatlas.estimators import lanczos_eigs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.settings import COMPUTE_DTYPES, MODES, check_choice, check_nonneg_int

PARTS: tuple[str, ...] = ("class", "cross", "within")


def class_pair_sums(op: GGNOperator) -> tuple[Tensor, Tensor, int]:
    """(S, W, C): S[c, c'] = Σ_{i: y_i=c} w_{i,c'} g_{i,c'} (C, C, P), W[c, c'] = Σ_{i: y_i=c} w_{i,c'}, classes C.

    w_{i,c'} = p_{i,c'}/N, g_{i,c'} = J_iᵀ(e_{c'} − p_i), at the operator's point and on its batches (2-D logits).
    """
    st = op._ready()
    leaves = {n: t.detach().requires_grad_(True) for n, t in st["point"].items()}
    names = list(leaves)
    total = sum(int(y.shape[0]) for _, y in st["batches"])
    S: Tensor | None = None
    W: Tensor | None = None
    with op._modes():
        for x, y in st["batches"]:
            z = op._forward(leaves, x)
            if z.ndim != 2 or y.ndim != 1 or y.is_floating_point():
                raise ValueError(f"ggn_decomposition needs (N, C) logits and integer labels, got logits "
                                 f"{tuple(z.shape)}; use a classifier with --loss cross_entropy")
            C = z.shape[1]
            if S is None:
                S = torch.zeros((C, C, op.num_params), dtype=op.dtype, device=op.device)
                W = torch.zeros((C, C), dtype=op.dtype, device=op.device)
            p = torch.softmax(z.detach(), dim=1)
            eye = torch.eye(C, dtype=p.dtype, device=p.device)
            for c in torch.unique(y).tolist():
                rows = y == c
                for k in range(C):
                    # v_i = p_{i,k}(e_k − p_i)/N: the VJP Σ_i J_iᵀ v_i is Σ_{i∈c} w_{i,k} g_{i,k}
                    v = torch.zeros_like(p)
                    v[rows] = p[rows, k:k + 1] * (eye[k] - p[rows]) / total
                    grads = torch.autograd.grad(z, [leaves[n] for n in names], grad_outputs=v, retain_graph=True,
                                                allow_unused=True)
                    S[c, k] += torch.cat([(torch.zeros_like(leaves[n]) if g is None else g).reshape(-1)
                                          for n, g in zip(names, grads)])
                    W[c, k] += p[rows, k].sum() / total
    if S is None:
        raise ValueError("ggn_decomposition: the data has no batch; pass at least one (x, y) batch")
    return S, W, int(S.shape[0])


@dataclass
class Decomposition:
    """The factors of the parts: G_class = R_classᵀR_class, G_cross = R_crossᵀR_cross, G_means = MᵀM (rows)."""

    M: Tensor  # (≤ C², P): √W_{c,c'} δ_{c,c'} for the pairs with W > 0
    R_class: Tensor  # (C, P): √U_{c'} ν_{c'}
    R_cross: Tensor  # (≤ C², P): √W_{c,c'} (δ_{c,c'} − ν_{c'})
    W: Tensor  # (C, C) class-pair weights
    class_means: Tensor  # (C, P): ν_{c'}
    constraint: Tensor  # Σ_{c'} U_{c'} ν_{c'} (P,): zero up to rounding (softmax rank C − 1)


def decompose(S: Tensor, W: Tensor) -> Decomposition:
    """The rows whose Gram matrices give G_means, G_class and G_cross (module docstring), from the pair sums."""
    C = W.shape[0]
    U = W.sum(0)  # U_{c'} = Σ_c W_{c,c'} > 0 (every p_{i,c'} > 0)
    nu = S.sum(0) / U[:, None]  # ν_{c'} = Σ_c S_{c,c'} / U_{c'}
    pairs = [(c, k) for c in range(C) for k in range(C) if float(W[c, k]) > 0]
    M = torch.stack([S[c, k] / W[c, k].sqrt() for c, k in pairs])  # √W δ = S/√W
    R_cross = torch.stack([W[c, k].sqrt() * (S[c, k] / W[c, k] - nu[k]) for c, k in pairs])
    return Decomposition(M, U.sqrt()[:, None] * nu, R_cross, W, nu, S.sum((0, 1)))


def gram_eigenvalues(R: Tensor) -> np.ndarray:
    """Eigenvalues of RᵀR (descending) from the small Gram matrix R Rᵀ (the non-zero ones are shared)."""
    K = (R @ R.T).to(torch.float64)
    return np.sort(np.clip(torch.linalg.eigvalsh(0.5 * (K + K.T)).cpu().numpy(), 0.0, None))[::-1]


def numerical_rank(eigenvalues: np.ndarray, rtol: float = 1e-8) -> int:
    """The number of eigenvalues above rtol·λ_max (0 when all are 0)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    top = float(lam.max()) if lam.size else 0.0
    return int(np.sum(lam > rtol * top)) if top > 0 else 0


class _MinusLowRank:
    """v ↦ A v − Rᵀ(R v): the within-class part G − G_means as an operator (shape, dtype, device, @)."""

    def __init__(self, A: Any, R: Tensor) -> None:
        self.A, self.R = A, R
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: Tensor) -> Tensor:
        return (self.A @ V) - self.R.T @ (self.R @ V)


@register_probe
@dataclass(frozen=True, kw_only=True)
class GGNDecomposition(Probe):
    """The GGN's class-mean, cross-class and within-class parts and their top eigenvalues (Papyan 2019, 2020).

    G = G_class + G_cross + G_within (see the module docstring for the formulas and the C vs C − 1 derivation).

    Attributes:
        top_k: eigenvalues of G and G_within by block Lanczos (None: C², capped by the parameter count).
        block_size: the block Lanczos block size (None: C, so that a cluster of C outliers is resolved).
        tol: the Lanczos residual tolerance (1e-6).
        rank_rtol: an eigenvalue counts toward a part's numerical rank above rank_rtol·λ_max (1e-8).
        mode / dtype: the model's train/eval flag during the products ("eval") and their dtype ("float64").
        seed: the seed of the Lanczos start block (0), an integer ≥ 0.
    Values: "ggn_top", "within_top" ("rank",), "class_eigenvalues" (C), "cross_eigenvalues", "means_eigenvalues"
        (descending), "attribution" ("rank", "part"): u_kᵀ G_part u_k for the top eigenvectors of G,
        "pair_weights" ("class", "logit"): W_{c,c'}, scalars "class_rank" (≤ C − 1), "cross_rank", "means_rank"
        (≤ C(C − 1)), "num_classes", "class_smallest_ratio" (λ_C/λ_1 of G_class: 0 up to rounding) and
        "constraint_residual" ‖Σ_c' U_c' ν_c'‖ / max_c' ‖U_c' ν_c'‖.
    """

    name: ClassVar[str] = "ggn_decomposition"
    summary: ClassVar[str] = "GGN = class-mean + cross-class + within-class parts (Papyan), top eigenvalues of each"
    section: ClassVar[str] = "curvature"
    title: ClassVar[str] = "GGN class / cross-class / within-class decomposition"
    figure: ClassVar[str | None] = None
    usage: ClassVar[str] = "--steps last"

    top_k: int | None = None
    block_size: int | None = None
    tol: float = 1e-6
    rank_rtol: float = 1e-8
    mode: str = "eval"
    dtype: str = "float64"
    seed: int = 0

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        for key in ("top_k", "block_size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{self.name}: {key} must be a positive integer or None, got {v!r}")
        for key in ("tol", "rank_rtol"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0 < float(v) < 1:
                raise ValueError(f"{self.name}: {key} must be a number in (0, 1), got {v!r}")
        check_choice("mode", self.mode, MODES, prefix=f"{self.name}: ")
        check_choice("dtype", self.dtype, COMPUTE_DTYPES, prefix=f"{self.name}: ")
        check_nonneg_int("seed", self.seed, prefix=f"{self.name}: ")

    def run(self, ctx: ProbeContext) -> Result:
        """The three parts' spectra at the checkpoint, and the top GGN eigenvalues' split among them."""
        t0 = time.perf_counter()
        if ctx.loss != "cross_entropy":
            raise ValueError(f"ggn_decomposition needs --loss cross_entropy (the softmax GGN), got {ctx.loss!r}")
        op = GGNOperator(ctx.model, list(ctx.data), "cross_entropy", mode=self.mode,
                         dtype=getattr(torch, self.dtype), device=ctx.device)
        S, W, C = class_pair_sums(op)
        dec = decompose(S, W)
        P = op.num_params
        k = min(self.top_k or C * C, P)
        b = min(self.block_size or C, k)
        ggn = lanczos_eigs(op, k, block_size=b, tol=self.tol, seed=self.seed)
        within = lanczos_eigs(_MinusLowRank(op, dec.M), k, block_size=b, tol=self.tol, seed=self.seed,
                              return_eigenvectors=False)
        U = ggn.eigenvectors.to(dec.M.dtype)
        share_class = ((dec.R_class @ U) ** 2).sum(0)
        share_cross = ((dec.R_cross @ U) ** 2).sum(0)
        lam = torch.as_tensor(np.asarray(ggn.eigenvalues), dtype=U.dtype)
        attribution = torch.stack([share_class, share_cross, lam - share_class - share_cross], 1).cpu().numpy()
        cls = gram_eigenvalues(dec.R_class)
        cross = gram_eigenvalues(dec.R_cross)
        means = gram_eigenvalues(dec.M)
        res = self.new_result(ctx.step)
        res.add("ggn_top", np.asarray(ggn.eigenvalues, dtype=np.float64), ("rank",))
        res.add("within_top", np.asarray(within.eigenvalues, dtype=np.float64), ("rank",))
        res.add("attribution", attribution, ("rank", "part"), {"part": np.asarray(PARTS, dtype=str)})
        res.add("class_eigenvalues", cls, ("class_rank_index",))
        res.add("cross_eigenvalues", cross, ("cross_rank_index",))
        res.add("means_eigenvalues", means, ("pair_rank",))
        res.add("pair_weights", W.cpu().numpy().astype(np.float64), ("class", "logit"))
        res.add("num_classes", np.int64(C))
        res.add("class_rank", np.int64(numerical_rank(cls, self.rank_rtol)))
        res.add("cross_rank", np.int64(numerical_rank(cross, self.rank_rtol)))
        res.add("means_rank", np.int64(numerical_rank(means, self.rank_rtol)))
        res.add("class_smallest_ratio", np.float64(cls[C - 1] / cls[0] if cls[0] > 0 else np.nan))
        scale = float((W.sum(0) * dec.class_means.norm(dim=1)).max())  # max_c' U_c' ‖ν_c'‖
        res.add("constraint_residual", np.float64(float(dec.constraint.norm()) / max(scale, 1e-300)))
        res.meta.update(num_params=P, matvecs=int(ggn.matvecs + within.matvecs),
                        elapsed_s={"decomposition": time.perf_counter() - t0})
        return res


def ggn_decomposition(model: torch.nn.Module, data: Any, **settings: Any) -> Result:
    """Run the ``ggn_decomposition`` probe in a notebook: ``ggn_decomposition(model, (X, y)).values["attribution"]``."""
    from lossatlas.batches import as_batches

    return GGNDecomposition(**settings).run(ProbeContext(model=model, data=as_batches(data), loss="cross_entropy"))


__all__ = ["Decomposition", "GGNDecomposition", "PARTS", "class_pair_sums", "decompose", "ggn_decomposition",
           "gram_eigenvalues", "numerical_rank"]
