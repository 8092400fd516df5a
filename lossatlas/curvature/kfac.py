"""Kronecker-factored curvature: KFAC and EKFAC approximations of the GGN for Linear and Conv2d layers.

For a layer z = W a + b (a Conv2d is one on its unfolded patches, Grosse & Martens 2016, "A
Kronecker-factored approximate Fisher matrix for convolution layers") the GGN block of the mean
loss L = (1/N) Σ_i ℓ_i is approximated by a Kronecker product (Martens & Grosse 2015, "Optimizing
neural networks with Kronecker-factored approximate curvature"):

    G_W ≈ B ⊗ A   (vec(W) row-major, as ``W.reshape(-1)``),   G_b ≈ B,
    A = (1/(N_ex R)) Σ_{n,r} a_{n,r} a_{n,r}ᵀ,   B = (1/N) Σ_{n,r} Σ_c g_{n,r,c} g_{n,r,c}ᵀ,

with g_{n,r,c} = ∂(s_cᵀ f)/∂z_{n,r} the backpropagated column c of a square root S Sᵀ = ∂²ℓ/∂f² of the
output Hessian (the exact GGN, curvlinops' ``fisher_type="type-2"``), N the loss terms (examples, or
tokens), N_ex the examples and R the positions sharing the weight (sequence positions, conv output
pixels). ``kfac_type="expand"`` treats every position as an example (as above); ``"reduce"`` averages
the inputs and sums the output gradients over the positions first, A = (1/N_ex) Σ_n ā_n ā_nᵀ with
ā_n = (1/R) Σ_r a_{n,r}, B = (1/N) Σ_n Σ_c ĝ_{n,c} ĝ_{n,c}ᵀ with ĝ_{n,c} = Σ_r g_{n,r,c} (Eschenhagen
et al. 2023, "Kronecker-factored approximate curvature for modern neural network architectures").
The blocks of different layers are zero (block diagonal); weight and bias are separate blocks.

EKFAC (George et al. 2018, "Fast approximate natural gradient descent in a Kronecker-factored
eigenbasis") keeps KFAC's eigenbasis Q = Q_B ⊗ Q_A and replaces its eigenvalues λ_B,i λ_A,j by the
exact GGN's second moments in that basis, E_ij = (1/N) Σ_i Σ_c ((Q_Bᵀ G_{i,c} Q_A)_ij)², with
G_{i,c} = Σ_r g^{(i)}_{r,c} a_rᵀ the gradient of loss term i's column c (one backward pass per
column and per position of a sequence output), so that E is the exact GGN's diagonal in that basis.

The conventions (scalings, weight sharing, the output-Hessian columns backpropagated together over all
loss terms of a batch for KFAC) are those of curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator``
(Dangel et al.) with ``fisher_type="type-2"``, ``loss_average`` over examples and tokens, and
``separate_weight_and_bias=True``; the tests check equality to 1e-10 in float64 (curvlinops' EKFAC has
no sequence outputs; there the tests check E against the dense GGN's diagonal in the eigenbasis).

Eigenvalues and trace are exact and cheap from the factors: eig(B ⊗ A) = {λ_B,i λ_A,j},
tr(B ⊗ A) = tr(B) tr(A) (EKFAC: the entries of E).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossatlas.batches import batch_length
from lossatlas.checks import check_choice
from lossatlas.curvature.base import CurvatureOperator
from lossatlas.errors import UserError
from lossatlas.losses import require_output_loss

KFAC_TYPES: tuple[str, ...] = ("expand", "reduce")
# the curvature names the probes accept: the approximation and, after "_", the weight-sharing treatment
KFAC_CURVATURES: tuple[str, ...] = ("kfac", "ekfac", "kfac_reduce", "ekfac_reduce")
_SUPPORTED = (nn.Linear, nn.Conv2d)


class KFACOperator(CurvatureOperator):
    """KFAC of the GGN (type-2 Fisher) of the mean loss: block diagonal, B ⊗ A per weight, B per bias.

    See the module docstring for the factors. The factors are computed on the first product (one
    forward and C backward passes per batch, C = the output width) and kept; a product then costs two
    small matrix multiplies per layer. Every selected parameter must belong to an ``nn.Linear`` or an
    ``nn.Conv2d`` (groups = 1, numeric padding, zero padding mode) called once per forward pass.

    Args:
        model, data, loss, **kw: as in ``CurvatureOperator`` (``path``/``chunk_size``/``graph_cache_bytes``
            are not used: there is no autodiff product).
        kfac_type: ``"expand"`` (default; positions sharing a weight count as examples) or ``"reduce"``
            (Eschenhagen et al. 2023).

    Example:
        One linear layer under ``half_sse`` with one example: the GGN is (1 ⊗ x xᵀ) = KFAC exactly.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
        >>> K = KFACOperator(model, [(x, torch.zeros(1, 1, dtype=torch.float64))], "half_sse")
        >>> (K @ torch.eye(3, dtype=torch.float64)).tolist()
        [[1.0, 2.0, -1.0], [2.0, 4.0, -2.0], [-1.0, -2.0, 1.0]]
        >>> K.trace(), K.eigenvalues()[:1].tolist()
        (6.0, [6.0])
    """

    kind = "kfac"
    corrected = False  # EKFAC: eigenvalues replaced by the exact second moments in the KFAC eigenbasis

    def __init__(self, model: nn.Module, data: Any, loss: str = "cross_entropy", *, kfac_type: str = "expand",
                 **kw: Any) -> None:
        if not isinstance(loss, str):  # a loss_fn(model, batch) closure has no output Hessian to factor
            raise UserError(f"curvature {self.kind!r} needs a loss of the model's outputs (cross_entropy, mse, "
                            "half_sse, causal_lm), not a loss closure; use curvature='hessian' with the closure")
        super().__init__(model, data, loss, **kw)
        require_output_loss(self.loss, f"the {self.kind} curvature (--curvature {self.kind})")
        check_choice("kfac_type", kfac_type, KFAC_TYPES)
        self.kfac_type = kfac_type
        self.layers = _layer_map(model, self.param_names)
        self._factors: dict[str, dict[str, Tensor]] | None = None
        self.path = "kronecker"

    # ------------------------------------------------------------------ the factors
    def factors(self) -> dict[str, dict[str, Tensor]]:
        """The Kronecker factors per module name, computed on first use and kept.

        ``"A"`` (input factor; absent without a weight), ``"B"`` (output-gradient factor), their
        eigenvalues/eigenvectors ``"lam_A"``, ``"Q_A"``, ``"lam_B"``, ``"Q_B"``, and for EKFAC the
        corrected eigenvalues ``"E"`` (C_out, D_in) and ``"E_bias"`` (C_out,).
        """
        if self._factors is None:
            self._ready()
            with self._modes():
                self._factors = self._compute_factors()
        return self._factors

    def _compute_factors(self) -> dict[str, dict[str, Tensor]]:
        st = self._state
        acc: dict[str, dict[str, Tensor]] = {m: {} for m in self.layers}
        n_ex = torch.zeros((), dtype=self.dtype, device=self.device)

        def on_input(mod_name: str, a: Tensor) -> None:  # a: (B, R, D_in)
            if "weight" not in self.layers[mod_name]["params"]:
                return
            if self.kfac_type == "expand":
                rows = a.reshape(-1, a.shape[-1])
                _add(acc[mod_name], "A", rows.T @ rows / a.shape[1])  # mean over the R shared positions
            else:
                mean = a.mean(dim=1)
                _add(acc[mod_name], "A", mean.T @ mean)

        def on_grad(mod_name: str, g: Tensor, a: Tensor | None) -> None:  # g: (B, R, C_out)
            rows = g.reshape(-1, g.shape[-1]) if self.kfac_type == "expand" else g.sum(dim=1)
            _add(acc[mod_name], "B", rows.T @ rows)

        for x, y in st["batches"]:
            n_ex += batch_length(x)
            self._backpropagate(x, y, on_input, on_grad)
        total = st["total"]
        sums = self._all_reduce([n_ex] + [t for m in self.layers for t in acc[m].values()])
        n_ex, flat = float(sums[0]), iter(sums[1:])
        factors: dict[str, dict[str, Tensor]] = {}
        for m in self.layers:
            got = {k: next(flat) for k in acc[m]}
            f: dict[str, Tensor] = {"B": got["B"] / total}
            if "A" in got:
                f["A"] = got["A"] / n_ex
                f["lam_A"], f["Q_A"] = torch.linalg.eigh(f["A"])
            f["lam_B"], f["Q_B"] = torch.linalg.eigh(f["B"])
            factors[m] = f
        if self.corrected:
            self._correct(factors)
        return factors

    def _correct(self, factors: dict[str, dict[str, Tensor]]) -> None:
        """EKFAC: E_ij = (1/N) Σ_i Σ_c ((Q_Bᵀ G_{i,c} Q_A)_ij)² over loss terms i and columns c (one more pass).

        G_{i,c} = Σ_r g^{(i)}_{r,c} a_rᵀ: each backward pass carries one column of one output position only
        (``per_position``), so that no two loss terms of an example mix and E = diag(Qᵀ G_GGN Q) exactly.
        """
        st = self._state
        acc: dict[str, dict[str, Tensor]] = {m: {} for m in self.layers}

        def on_grad(mod_name: str, g: Tensor, a: Tensor | None) -> None:
            f = factors[mod_name]
            g_rot = g @ f["Q_B"]  # (B, R, C_out) in B's eigenbasis
            if a is not None:  # the example's gradient Σ_r g_r a_rᵀ, rotated and squared
                per_example = torch.einsum("bri,brj->bij", g_rot, a @ f["Q_A"])
                _add(acc[mod_name], "E", per_example.square().sum(dim=0))
            if "bias" in self.layers[mod_name]["params"]:
                _add(acc[mod_name], "E_bias", g_rot.sum(dim=1).square().sum(dim=0))

        for x, y in st["batches"]:
            self._backpropagate(x, y, None, on_grad, keep_inputs=True, per_position=True)
        sums = iter(self._all_reduce([t for m in self.layers for t in acc[m].values()]))
        for m in self.layers:
            for k in list(acc[m]):
                factors[m][k] = next(sums) / st["total"]

    def _all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """The sums over the ranks' data shards (no-op alone), as one flat all-reduce."""
        if not self.dist.active:
            return tensors
        flat = self.dist.all_reduce_tensor(torch.cat([t.reshape(-1) for t in tensors]))
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].reshape(t.shape))
            start += t.numel()
        return out

    def _backpropagate(self, x, y, on_input, on_grad, keep_inputs: bool = False, per_position: bool = False) -> None:
        """One forward pass with hooks on the layers, then one backward per output-Hessian column.

        ``on_input(module, a)`` sees each layer's input as (B, R, D_in) (Conv2d: unfolded patches);
        ``on_grad(module, g, a)`` sees ∂(s_cᵀ f)/∂z as (B, R, C_out) for every column c, with the layer's
        input when ``keep_inputs``; ``per_position``: each column is split over the output's positions (the
        dimensions between the batch and the last), one backward pass each. The gradients are taken by tensor hooks on the layers' outputs, which
        stay correct when an in-place activation overwrites the output (as curvlinops does).
        """
        inputs: dict[str, Tensor] = {}
        calls: dict[str, int] = {}

        def forward_hook(mod_name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
            calls[mod_name] = calls.get(mod_name, 0) + 1
            if calls[mod_name] > 1:
                raise UserError(f"kfac: module {mod_name!r} is called more than once per forward pass (shared "
                                "weights); select the parameters of modules called once (params=...)")
            a = _unfold(module, args[0].detach()) if "weight" in self.layers[mod_name]["params"] else None
            if a is not None:
                if on_input is not None:
                    on_input(mod_name, a)
                if keep_inputs:
                    inputs[mod_name] = a
            if output.requires_grad:
                output.register_hook(lambda g, m=mod_name, mod=module: on_grad(m, _positions(mod, g.detach()),
                                                                               inputs.get(m)))

        handles = [info["module"].register_forward_hook(
            lambda mod, args, out, m=name: forward_hook(m, mod, args, out)) for name, info in self.layers.items()]
        try:
            with torch.enable_grad():
                leaves = {n: t.detach().requires_grad_(True) for n, t in self._state["point"].items()}
                out = self._forward(leaves, x)
            missing = [m for m in self.layers if m not in calls]
            if missing:
                raise UserError(f"kfac: module(s) {', '.join(map(repr, missing))} are not called by the forward "
                                "pass; select the parameters of modules the model uses (params=...)")
        finally:
            for h in handles:
                h.remove()
        columns = _hessian_sqrt_columns(self.loss, out.detach(), y)
        if per_position and out.ndim > 2:
            columns = [s * m for s in columns for m in _position_masks(out)]
        for c, s in enumerate(columns):
            torch.autograd.grad(out, list(leaves.values()), s, retain_graph=c < len(columns) - 1, allow_unused=True)

    # ------------------------------------------------------------------ products
    def _run_paths(self, M: Tensor) -> Tensor:
        """Σ over layers of the block products: B V A per weight (EKFAC: Q (E ∘ Qᵀ V)), B v per bias."""
        factors = self.factors()
        self.path = "kronecker"
        V = self.unflatten(M)
        out = {}
        for m, info in self.layers.items():
            f = factors[m]
            for kind, name in info["params"].items():
                v = V[name]
                K = v.shape[-1]
                if kind == "weight":
                    vw = v.reshape(v.shape[0], -1, K)  # (C_out, D_in, K)
                    if self.corrected:
                        r = torch.einsum("ji,jkv,kl->ilv", f["Q_B"], vw, f["Q_A"]) * f["E"].unsqueeze(-1)
                        res = torch.einsum("ij,jkv,lk->ilv", f["Q_B"], r, f["Q_A"])
                    else:
                        res = torch.einsum("ij,jkv,kl->ilv", f["B"], vw, f["A"])
                else:
                    if self.corrected:
                        res = f["Q_B"] @ (f["E_bias"].unsqueeze(-1) * (f["Q_B"].T @ v))
                    else:
                        res = f["B"] @ v
                out[name] = res.reshape(v.shape)
        flat = torch.cat([out[n].reshape(-1, M.shape[1]) for n in self.param_names])  # (P, K)
        # every rank holds the full (all-reduced) factors; the base sums the ranks' products afterwards
        return flat / self.dist.world_size if self.dist.active else flat

    # ------------------------------------------------------------------ exact spectral quantities
    def eigenvalues(self) -> Tensor:
        """All P eigenvalues, descending: λ_B,i λ_A,j per weight and λ_B,i per bias (EKFAC: E's entries)."""
        parts = []
        for m, info in self.layers.items():
            f = self.factors()[m]
            for kind in info["params"]:
                if self.corrected:
                    parts.append(f["E" if kind == "weight" else "E_bias"].reshape(-1))
                else:
                    parts.append(torch.outer(f["lam_B"], f["lam_A"]).reshape(-1) if kind == "weight" else f["lam_B"])
        return torch.sort(torch.cat(parts), descending=True).values

    def top_eigenvalues(self, k: int) -> list[float]:
        """The k largest eigenvalues (exact for this operator, from the factors)."""
        return [float(v) for v in self.eigenvalues()[:k]]

    def trace(self) -> float:
        """The exact trace Σ_layers tr(B) tr(A) + tr(B) (weight, bias); EKFAC: Σ E."""
        total = 0.0
        for m, info in self.layers.items():
            f = self.factors()[m]
            for kind in info["params"]:
                if self.corrected:
                    total += float(f["E" if kind == "weight" else "E_bias"].sum())
                else:
                    total += float(f["lam_B"].sum()) * (float(f["lam_A"].sum()) if kind == "weight" else 1.0)
        return total

    def frobenius_norm(self) -> float:
        """‖·‖_F = sqrt(Σ λ²) over the eigenvalues (‖B ⊗ A‖_F = ‖B‖_F ‖A‖_F)."""
        return float(self.eigenvalues().square().sum().sqrt())

    def dense(self) -> Tensor:
        """The P×P matrix in ``param_names`` order (tiny models only: P² values)."""
        offsets, start = {}, 0
        for n, s in zip(self.param_names, self.param_shapes):
            offsets[n] = (start, start + math.prod(s))
            start += math.prod(s)
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for m, info in self.layers.items():
            f = self.factors()[m]
            for kind, name in info["params"].items():
                i, j = offsets[name]
                if self.corrected:
                    Q = torch.kron(f["Q_B"], f["Q_A"]) if kind == "weight" else f["Q_B"]
                    lam = f["E" if kind == "weight" else "E_bias"].reshape(-1)
                    out[i:j, i:j] = (Q * lam) @ Q.T
                else:
                    out[i:j, i:j] = torch.kron(f["B"], f["A"]) if kind == "weight" else f["B"]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(P={self.num_params}, loss={self.loss!r}, kfac_type={self.kfac_type!r}, "
                f"layers={len(self.layers)}, dtype={self.dtype})")


class EKFACOperator(KFACOperator):
    """EKFAC (George et al. 2018): KFAC's eigenbasis with corrected eigenvalues.

    The basis Q_B ⊗ Q_A is KFAC's; its eigenvalues are replaced by E_ij = (1/N) Σ_n Σ_c ((Q_Bᵀ G_{n,c} Q_A)_ij)², the exact GGN's diagonal in that basis (module docstring).

    Costs one more pass over the data than KFAC (per-example gradients of each layer: B·C_out·D_in values
    per batch). Arguments as ``KFACOperator``.

    Example:
        With one example and one linear layer KFAC is exact, and so is EKFAC:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2).double()
        >>> data = [(torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.tensor([1]))]
        >>> K, E = KFACOperator(model, data), EKFACOperator(model, data)
        >>> torch.allclose(K.dense(), E.dense()), abs(K.trace() - E.trace()) < 1e-12
        (True, True)
    """

    kind = "ekfac"
    corrected = True


def kfac_operator(kind: str, model: nn.Module, data: Any, loss: str = "cross_entropy", **kw: Any) -> KFACOperator:
    """The operator named by a probe's curvature: ``"kfac"``/``"ekfac"`` (expand) or ``"…_reduce"``.

    >>> import torch
    >>> from torch import nn
    >>> op = kfac_operator("ekfac_reduce", nn.Linear(2, 2), [(torch.randn(3, 2), torch.tensor([0, 1, 1]))])
    >>> type(op).__name__, op.kfac_type
    ('EKFACOperator', 'reduce')
    """
    check_choice("curvature", kind, KFAC_CURVATURES)
    base, _, sharing = kind.partition("_")
    cls = EKFACOperator if base == "ekfac" else KFACOperator
    return cls(model, data, loss, kfac_type=sharing or "expand", **kw)


def relative_distance(approx: Any, exact: Any, *, num_vectors: int | None = 32, seed: int = 0) -> float:
    """‖K − M‖_F / ‖M‖_F between two operators of the same shape (``@`` on (P, k) blocks).

    ``num_vectors=None``: dense, from the products with the P unit vectors (tiny models). Else the
    ratio ‖(K − M) Z‖_F / ‖M Z‖_F with Z a (P, num_vectors) standard Gaussian matrix seeded by ``seed``:
    E‖X Z‖_F² = num_vectors·‖X‖_F² for any X (Hutchinson 1990), so both norms are unbiased in square.

    >>> import torch
    >>> M = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    >>> relative_distance(torch.eye(2, dtype=torch.float64), M, num_vectors=None)
    1.0
    """
    P = int(exact.shape[0])
    if tuple(approx.shape) != tuple(exact.shape):
        raise ValueError(f"relative_distance: shapes differ, {tuple(approx.shape)} vs {tuple(exact.shape)}")
    dtype = getattr(exact, "dtype", torch.float64)
    device = getattr(exact, "device", "cpu")
    if num_vectors is None:
        Z = torch.eye(P, dtype=dtype, device=device)
    else:
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"relative_distance: num_vectors must be an integer >= 1 or None, got {num_vectors!r}")
        gen = torch.Generator().manual_seed(int(seed))
        Z = torch.randn(P, num_vectors, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    MZ = exact @ Z
    KZ = (approx @ Z).to(MZ.dtype)
    return float((KZ - MZ).norm() / MZ.norm())


# ---------------------------------------------------------------------------------------------------------- helpers
def _add(d: dict[str, Tensor], key: str, value: Tensor) -> None:
    d[key] = value if key not in d else d[key] + value


def _layer_map(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """The selected layers: module name -> {"module": the layer, "params": {"weight"/"bias": parameter name}} (UserError otherwise)."""
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        if not isinstance(module, _SUPPORTED) or attr not in ("weight", "bias"):
            raise UserError(f"kfac: parameter {name!r} belongs to a {type(module).__name__}, but KFAC covers "
                            "nn.Linear and nn.Conv2d only; select their parameters (params=...) or use curvature='ggn'")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                              or module.padding_mode != "zeros"):
            raise UserError(f"kfac: Conv2d {mod_name!r} has groups={module.groups}, padding={module.padding!r}, "
                            f"padding_mode={module.padding_mode!r}; KFAC here needs groups=1 and numeric zero "
                            "padding; leave its parameters out (params=...) or use curvature='ggn'")
        layers.setdefault(mod_name, {"module": module, "params": {}})["params"][attr] = name
    return layers


def _unfold(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's input as (B, R, D_in): Conv2d patches (channel-major, as the flattened weight), else rows."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (B, C_in·kh·kw, L)
        return patches.transpose(1, 2)
    if a.ndim == 1:  # an unbatched vector: one example
        return a.reshape(1, 1, -1)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _positions(module: nn.Module, g: Tensor) -> Tensor:
    """A layer's output gradient as (B, R, C_out) (Conv2d: channels last)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    if g.ndim == 1:
        return g.reshape(1, 1, -1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _position_masks(out: Tensor) -> list[Tensor]:
    """One 0/1 mask per position of a (B, *positions, C) output: 1 at that position for every example."""
    positions = out.shape[1:-1].numel()
    masks = []
    for t in range(positions):
        m = torch.zeros(positions, dtype=out.dtype, device=out.device)
        m[t] = 1.0
        masks.append(m.reshape(1, *out.shape[1:-1], 1))
    return masks


def _hessian_sqrt_columns(loss: str, out: Tensor, y: Tensor) -> list[Tensor]:
    """Columns s_c (shaped like ``out``) with Σ_c s_c s_cᵀ = ∂²ℓ_i/∂f² on every loss term's last dimension.

    cross_entropy: s_c = √p_c (e_c − p) (Σ_c s_c s_cᵀ = diag(p) − p pᵀ); causal_lm: the same at the counted
    positions; mse: √(2/W) e_c with W the outputs per example (lossatlas's mean over them); half_sse: e_c.
    One column is backpropagated for all terms of a batch at once (curvlinops' type-2 convention).
    """
    if loss in ("cross_entropy", "causal_lm"):
        p = torch.softmax(out, dim=-1)
        keep = None
        if loss == "causal_lm":
            from lossatlas.losses import _next_token  # the counted next-token positions

            _, _, mask = _next_token(out, y)
            keep = torch.zeros(out.shape[:2], dtype=out.dtype, device=out.device)
            keep[:, :-1] = mask.to(out.dtype)
        cols = []
        for c in range(out.shape[-1]):
            s = -p * p[..., c:c + 1].sqrt()
            s[..., c] += p[..., c].sqrt()
            cols.append(s if keep is None else s * keep.unsqueeze(-1))
        return cols
    width = out[0].numel() if out.ndim > 1 else 1
    scale = math.sqrt(2.0 / width) if loss == "mse" else 1.0
    view = out.unsqueeze(-1) if out.ndim == 1 else out
    cols = []
    for c in range(view.shape[-1]):
        s = torch.zeros_like(view)
        s[..., c] = scale
        cols.append(s.reshape(out.shape))
    return cols


__all__ = ["KFACOperator", "EKFACOperator", "kfac_operator", "relative_distance", "KFAC_TYPES", "KFAC_CURVATURES"]
