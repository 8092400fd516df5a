"""Curvature with respect to activations or inputs: v ↦ ∇²_a L v (Hessian) or J_aᵀ H_out J_a v (GGN).

The parameter operators (``lossatlas.curvature``) differentiate the data-set loss
L = Σ_b (n_b/N) L_b with respect to θ. This module differentiates the same loss with respect to
a = (a_1, …, a_N), the stacked activations of every example of the data set at one place in the
network: the inputs x (``wrt="inputs"``) or the output of a named module
(``wrt="activations:MODULE_NAME"``), everything else (θ, and any path from the inputs that bypasses
the module, such as a residual stream) held fixed:

    H_a = ∂²L/∂a²,    G_a = Σ_b (n_b/N) J_bᵀ (∂²L_b/∂f_b²) J_b,   J_b = ∂f_b/∂a_b,

f_b the model's outputs on batch b. Example i's loss depends on its own activation only (in eval
mode; batch-coupling layers such as BatchNorm in train mode couple the examples of one batch), so
both matrices are block-diagonal across examples, and always across batches:
H_a = blockdiag_b((n_b/N) ∇²_{a_b} L_b). A product uses this: batch b's slice of v goes through
one double-backward pass on batch b alone and fills batch b's slice of the result; no cross-batch
term is ever formed. The weights are the loss's own (n_b/N, examples or counted tokens), so each
example's block is (1/N)∇²ℓ_i; ``scale="sum"`` multiplies by N (the Hessian of Σ_i ℓ_i, whose
blocks are the per-example ∇²ℓ_i for a mean-per-example loss).

The operator has the estimators' interface (``shape``, ``dtype``, ``device``, ``@`` on (D,) or
(D, K), ``to_scipy``), so top-k Lanczos, Hutchinson/Hutch++ traces and SLQ densities
(``lossatlas.estimators``) apply unchanged. The input-space Hessian of the loss is the object of
Moosavi-Dezfooli et al. 2019 ("Robustness via curvature regularization, and vice versa", CVPR);
the GGN factorisation follows Schraudolph 2002 ("Fast curvature matrix-vector products for
second-order gradient descent", Neural Computation).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossatlas.batches import as_batches, to_device
from lossatlas.curvature.base import training_flag
from lossatlas.errors import UserError
from lossatlas.losses import batch_count, batch_loss, check_loss_name
from lossatlas.outputs import model_outputs

WRT_PARAMS = "params"
WRT_INPUTS = "inputs"
WRT_ACTIVATIONS = "activations:"
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
SCALES: tuple[str, ...] = ("mean", "sum")


def parse_wrt(wrt: Any) -> tuple[str, str | None]:
    """``"params"`` → ("params", None), ``"inputs"`` → ("inputs", None), ``"activations:NAME"`` → ("activations", NAME).

    Raises:
        UserError: anything else.
    """
    if isinstance(wrt, str):
        if wrt in (WRT_PARAMS, WRT_INPUTS):
            return wrt, None
        if wrt.startswith(WRT_ACTIVATIONS) and wrt[len(WRT_ACTIVATIONS):].strip():
            return "activations", wrt[len(WRT_ACTIVATIONS):].strip()
    raise UserError(f"wrt={wrt!r} is not understood; use 'params', 'inputs' or 'activations:MODULE_NAME' "
                    "(a name from model.named_modules())")


class ActivationCurvatureOperator:
    """Symmetric D×D operator v ↦ ∇²_a L v (or G_a v) over all examples' activations a.

    Args:
        model: the network; never mutated (products run by ``functional_call`` on detached copies of
            its parameters and buffers), its train/eval flags are restored after every use.
        data: ``(inputs, targets)`` batches (anything ``as_batches`` accepts).
        loss: a loss name of ``lossatlas.losses`` (default "cross_entropy").
        wrt: ``"inputs"`` (floating-point tensor inputs) or ``"activations:MODULE_NAME"`` (the output of
            that module, or the first entry of a tuple output; the module must run once per forward).
        curvature: ``"hessian"`` (default) or ``"ggn"`` (J_aᵀ H_out J_a, positive semi-definite for
            convex losses).
        scale: ``"mean"`` (default: the curvature of the data-set mean loss, as the parameter operators)
            or ``"sum"`` (N times that).
        mode: ``"eval"`` (default) or ``"train"``.
        dtype: None (the model's dtype) or e.g. ``torch.float64``.
        device: None (the model's device) or a device for the copies and the data.

    ``shape`` is (D, D), D = the number of activation entries over the data set, in batch order
    (``batch_shapes`` gives each batch's activation shape); ``activations()`` is the point a.

    Example:
        ``half_sse`` on a linear model f = W x: ∇²_x L = Wᵀ W / N for each example.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = nn.init.ones_(model.weight)
        >>> X, Y = torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
        >>> H = ActivationCurvatureOperator(model, [(X, Y)], "half_sse", wrt="inputs")
        >>> H.shape
        (4, 4)
        >>> (H @ torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)).tolist()
        [0.5, 0.5, 0.0, 0.0]
    """

    attention_backend = "math"  # products run under the math SDPA backend (second-order autodiff)

    def __init__(self, model: nn.Module, data: Any, loss: str = "cross_entropy", *, wrt: str = WRT_INPUTS,
                 curvature: str = "hessian", scale: str = "mean", mode: str = "eval",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the network")
        self.loss = check_loss_name(loss)
        kind, name = parse_wrt(wrt)
        if kind == WRT_PARAMS:
            raise UserError("wrt='params' is the parameter Hessian; use lossatlas.curvature.make_operator for it, "
                            "or wrt='inputs' / 'activations:MODULE_NAME' here")
        for what, value, allowed in (("curvature", curvature, CURVATURES), ("scale", scale, SCALES),
                                     ("mode", mode, ("eval", "train"))):
            if value not in allowed:
                raise UserError(f"{what}={value!r} is not available for activation curvature; use one of "
                                f"{', '.join(allowed)}")
        modules = dict(model.named_modules())
        if name is not None and name not in modules:
            close = [m for m in modules if m and name in m][:5]
            hint = f" (close: {', '.join(close)})" if close else ""
            raise UserError(f"no module named {name!r} in the model{hint}; use a name from model.named_modules()")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UserError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
        first = next(iter(model.parameters()), None)
        self.wrt = str(wrt)
        self.kind = curvature
        self.scale = scale
        self.mode = mode
        self.dtype: torch.dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
        self.device = torch.device(device) if device is not None else (first.device if first is not None
                                                                        else torch.device("cpu"))
        self.path = "double_backward"  # the only path: exact products by double backward
        self.matvecs = 0
        self._model = model
        self._module = modules[name] if name is not None else None
        self._module_name = name
        self._data = data
        self._state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup (lazy)
    def _ready(self) -> dict[str, Any]:
        """Cast copies of θ and the data, the batch weights, and one forward pass to record a_b per batch."""
        if self._state is not None:
            return self._state
        cast = {n: t.detach().to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
                for n, t in (*self._model.named_parameters(), *self._model.named_buffers())}
        raw = self._data
        batches = list(raw) if isinstance(raw, (list, tuple)) and raw and all(
            isinstance(b, (list, tuple)) and len(b) == 2 for b in raw) else as_batches(raw)
        batches = to_device(batches, self.device, self.dtype)
        counts = [batch_count(self.loss, y) for _, y in batches]
        total = sum(counts)
        if total == 0:
            raise UserError("the data holds no examples; give at least one (inputs, targets) batch")
        factor = float(total) if self.scale == "sum" else 1.0  # "sum": Σ_i ℓ_i = N · L
        self._state = {"params": cast, "batches": batches, "weights": [factor * c / total for c in counts]}
        acts = []
        with torch.no_grad(), self._modes():
            for x, _ in batches:
                if self._module is None:
                    if not (isinstance(x, Tensor) and x.is_floating_point()):
                        self._state = None
                        raise UserError("wrt='inputs' needs floating-point tensor inputs; for token ids take the "
                                        "embedding's output instead: wrt='activations:<embedding module name>'")
                    acts.append(x.detach())
                else:
                    acts.append(self._forward(x, capture=True)[1])
        self._state["acts"] = acts
        self._state["sizes"] = [a.numel() for a in acts]
        self.batch_shapes: list[torch.Size] = [a.shape for a in acts]
        return self._state

    @property
    def shape(self) -> tuple[int, int]:
        """(D, D): D activation entries over the data set (runs one forward pass on first use)."""
        d = sum(self._ready()["sizes"])
        return (d, d)

    @property
    def num_params(self) -> int:
        """D, the operator's dimension (the name the parameter operators use)."""
        return self.shape[0]

    def _modes(self):
        """Put the model in ``self.mode`` for a block and restore every submodule's own flag afterwards."""
        return training_flag(self._model, self.mode)

    def _forward(self, x: Any, a: Tensor | None = None, capture: bool = False) -> tuple[Tensor, Tensor | None]:
        """Outputs f with the activation replaced by ``a`` (None: the model's own); with ``capture`` also a."""
        params = self._state["params"]
        if self.mode == "train":  # fresh buffer copies: BatchNorm's running stats of the copies stay put
            params = {k: v.clone() for k, v in params.items()}
        if self._module is None:
            return model_outputs(self._model, x if a is None else a, params=params), None
        seen: dict[str, Any] = {"calls": 0, "a": None}

        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            seen["calls"] += 1
            if seen["calls"] > 1:  # a module run twice per forward has no single activation to perturb
                raise UserError(f"module {self._module_name!r} runs more than once per forward pass (shared "
                                "weights); choose a module that runs once (wrt='activations:MODULE_NAME')")
            first = out[0] if isinstance(out, (tuple, list)) else out
            if not (isinstance(first, Tensor) and first.is_floating_point()):
                raise UserError(f"module {self._module_name!r} returns {type(first).__name__}, not a floating-point "
                                "tensor; choose a module whose output is the activation tensor")
            if capture:
                seen["a"] = first.detach()
            if a is None:
                return None  # the module's own output
            replaced = a.view_as(first)  # the leaf the derivatives are taken with respect to
            return (replaced, *out[1:]) if isinstance(out, tuple) else replaced

        handle = self._module.register_forward_hook(hook)
        try:
            out = model_outputs(self._model, x, params=params)
        finally:
            handle.remove()
        if seen["calls"] == 0:
            raise UserError(f"module {self._module_name!r} did not run in the forward pass; choose a module "
                            "that the model calls (model.named_modules())")
        return out, seen["a"]

    # ------------------------------------------------------------------ public API
    def activations(self) -> Tensor:
        """The point a: every batch's activation, flattened and concatenated in batch order (D,)."""
        return torch.cat([a.reshape(-1) for a in self._ready()["acts"]])

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss Σ_b w_b L_b (w_b = n_b/N, times N for ``scale="sum"``) and its gradient ∇_a (D,)."""
        st = self._ready()
        total, grads = 0.0, []
        with self._modes(), sdpa_kernel(SDPBackend.MATH):
            for (x, y), a0, w in zip(st["batches"], st["acts"], st["weights"]):
                a = a0.clone().requires_grad_(True)
                value = w * batch_loss(self.loss, self._forward(x, a)[0], y)
                (g,) = torch.autograd.grad(value, a, allow_unused=True)
                grads.append((torch.zeros_like(a) if g is None else g).reshape(-1))
                total += float(value.detach())
        return total, torch.cat(grads)

    def __matmul__(self, V: Tensor) -> Tensor:
        if not isinstance(V, Tensor):
            raise UserError(f"{type(self).__name__} @ V needs a torch.Tensor, got {type(V).__name__}")
        D = self.shape[0]
        if V.ndim not in (1, 2) or V.shape[0] != D:
            raise UserError(f"{type(self).__name__} @ V: V must have shape ({D},) or ({D}, K), got {tuple(V.shape)}")
        st = self._ready()
        M = V.reshape(D, -1).detach().to(device=self.device, dtype=self.dtype)
        out = torch.zeros_like(M)
        start = 0
        with self._modes(), sdpa_kernel(SDPBackend.MATH):
            for (x, y), a0, w, n in zip(st["batches"], st["acts"], st["weights"], st["sizes"]):
                # block-diagonal across batches: batch b's slice of V maps to batch b's slice of the result
                out[start:start + n] = self._batch_product(x, y, a0, w, M[start:start + n])
                start += n
        self.matvecs += M.shape[1]
        return out.reshape(-1) if V.ndim == 1 else out

    def _batch_product(self, x: Any, y: Tensor, a0: Tensor, w: float, M: Tensor) -> Tensor:
        """(n_b, K) block of w_b ∇²_{a_b} L_b M (Hessian) or w_b J_bᵀ ∇²_f L_b J_b M (GGN)."""
        a = a0.clone().requires_grad_(True)
        f = self._forward(x, a)[0]
        K = M.shape[1]
        cols = []
        if self.kind == "hessian":
            (g,) = torch.autograd.grad(w * batch_loss(self.loss, f, y), a, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:  # the loss is (piecewise) linear or constant in a
                return torch.zeros_like(M)
            for k in range(K):
                (h,) = torch.autograd.grad(g, a, M[:, k].view_as(a), retain_graph=k < K - 1, allow_unused=True)
                cols.append(torch.zeros_like(a) if h is None else h)
            return torch.stack([c.reshape(-1) for c in cols], dim=1)
        # GGN: J v by the double-vjp trick (Jᵀu is linear in u; its vjp in u is J v), then the
        # output Hessian of the batch loss by double backward at f, then Jᵀ by one more vjp
        f_leaf = f.detach().requires_grad_(True)
        (gf,) = torch.autograd.grad(w * batch_loss(self.loss, f_leaf, y), f_leaf, create_graph=True)
        u = torch.zeros_like(f, requires_grad=True)
        (jtu,) = torch.autograd.grad(f, a, u, create_graph=True, allow_unused=True)
        if jtu is None:  # the outputs do not depend on a
            return torch.zeros_like(M)
        for k in range(K):
            (jv,) = torch.autograd.grad(jtu, u, M[:, k].view_as(a), retain_graph=True)
            (hjv,) = torch.autograd.grad(gf, f_leaf, jv, retain_graph=True)
            (col,) = torch.autograd.grad(f, a, hjv, retain_graph=True)
            cols.append(col.reshape(-1))
        return torch.stack(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out; symmetric)."""
        from scipy.sparse.linalg import LinearOperator

        def matmat(X):
            Y = self @ torch.as_tensor(np.asarray(X, dtype=np.float64)).to(device=self.device, dtype=self.dtype)
            return Y.detach().cpu().to(torch.float64).numpy()

        def matvec(x):
            return matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

        return LinearOperator(self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat,
                              dtype=np.float64)

    def path_report(self) -> dict[str, Any]:
        """What the parameter operators' ``path="auto"`` reports; here one fixed path."""
        return {"path": self.path}

    def clear_cache(self) -> None:
        """Nothing is cached across products (each builds its batch's graph anew)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(wrt={self.wrt!r}, curvature={self.kind!r}, loss={self.loss!r}, "
                f"mode={self.mode!r}, dtype={self.dtype})")


def activation_operator(model: nn.Module, data: Any, loss: str = "cross_entropy", *, wrt: str,
                        curvature: str = "hessian", **kw: Any) -> ActivationCurvatureOperator:
    """The Hessian or GGN of the loss with respect to ``wrt`` ("inputs" or "activations:NAME"); ``kw`` as the class."""
    return ActivationCurvatureOperator(model, data, loss, wrt=wrt, curvature=curvature, **kw)


def dense(op: ActivationCurvatureOperator, batch: int = 256) -> Tensor:
    """The D×D matrix, column block by column block (small D only: D products)."""
    D = op.shape[0]
    eye = torch.eye(D, dtype=op.dtype, device=op.device)
    return torch.cat([op @ eye[:, i:i + batch] for i in range(0, D, batch)], dim=1)


__all__: Sequence[str] = ["ActivationCurvatureOperator", "activation_operator", "parse_wrt", "dense",
                          "WRT_PARAMS", "WRT_INPUTS", "CURVATURES", "SCALES"]
