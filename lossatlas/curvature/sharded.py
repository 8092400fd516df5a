"""Hessian-vector products for models larger than one device: FSDP2 shards and ``device_map`` placements.

**FSDP2** (``torch.distributed.fsdp.fully_shard`` under ``torchrun``). Exact second-order autodiff
does not run through FSDP: double backward is unsupported (PyTorch issues #106637, #172543) and
forward-mode AD fails on FSDP2's DTensor parameters (#182641). The product is therefore the central
finite difference of two gradients along the sharded direction (Nocedal & Wright 2006, *Numerical
Optimization*, §8.1; applied to FSDP by Granziol & Juarev 2026, arXiv 2602.00816):

    H v ≈ ‖v‖ · D(ε) u,   D(ε) u = (∇L(θ + εu) − ∇L(θ − εu)) / (2ε),   u = v/‖v‖,

where every rank adds ε·u to its own shard of each DTensor parameter, the forward and backward
all-gather the parameters as FSDP does, and the gradient comes back reduce-scattered, i.e. sharded
like u: no rank ever holds a whole vector. Each product costs two gradients.

Error. With M₃ = max over |t| ≤ ε of ‖∇³L(θ + tu)[u, u, ·]‖ and e_g the rounding error of one
computed gradient, Taylor's theorem gives

    ‖D(ε)u − Hu‖ ≤ ε²/6 · M₃ + e_g/ε,

minimized by ε* = (3e_g/M₃)^{1/3} ∝ ε_mach^{1/3}. Neither M₃ nor e_g is known. The step is
calibrated once, on the first product's direction: from ε₀ = ε_mach^{1/3}·(1 + ‖θ‖) (the relative-step
rule of Nocedal & Wright §8.1 with the central-difference exponent 1/3), Richardson's comparison
(Richardson 1911, "The approximate arithmetical solution by finite differences of physical problems")
D(2ε₀) − D(ε₀) = 3·ε₀²/6·∇³L[u, u] + O(ε₀⁴) gives the truncation coefficient C = ‖D(2ε₀) − D(ε₀)‖/(3ε₀²)
(error ≈ Cε²), e_g ≈ ε_mach·‖∇L‖ the rounding (error ≈ e_g/ε), and ε = (e_g/(2C))^{1/3}, their
minimizer, clamped to [10⁻⁴ε₀, ε₀] (``fd_step`` fixes ε instead). The error is then measured, not
assumed: the operator computes D(2ε) beside D(ε) on the first ``fd_checks`` products (3) and on every
``fd_check_every``-th (8) after them — Lanczos vectors turn towards the high-curvature directions where
∇³L[u, u] is largest — two more gradients each. The truncation error of D(ε) is a third of
‖D(2ε) − D(ε)‖ and its rounding error (half that of D(ε) in D(2ε)) is at most about twice it, so

    δ = 2 · max over checked u of ‖D(ε)u − D(2ε)u‖   (``op.product_error``: ‖Ãu − Hu‖ ≤ δ per unit u),

which the sharded estimators (:mod:`lossatlas.estimators.sharded_vectors`) add to their bounds.

Data. Under FSDP the batches are dealt out across ranks (rank r takes batches r, r + W, …) and
FSDP averages the gradients over ranks, so rank r back-propagates W·Σ_{b∈r} (n_b/N) L_b and the
average is the data-set mean loss's gradient; every rank runs the same number of forward and
backward passes (a rank short of batches repeats one with weight 0), as FSDP's collectives require.

**device_map** (one process, parameters spread over several devices, as Hugging Face accelerate's
``dispatch_model`` leaves them). The operator holds the vectors on one ``vector_device`` and moves
each parameter's slice to that parameter's own device; the product is exact (double backward,
Pearlmutter 1994, "Fast exact multiplication by the Hessian") unless ``path="finite_difference"``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.batches import as_batches, to_device
from lossatlas.errors import UserError
from lossatlas.estimators.sharded_vectors import (
    ShardedSpace,
    sharded_hutchinson_trace,
    sharded_lanczos_eigs,
    sharded_slq_density,
)
from lossatlas.losses import batch_loss, batch_weights, check_loss_name
from lossatlas.outputs import model_outputs

SHARDED_PATHS: tuple[str, ...] = ("auto", "double_backward", "finite_difference")
FD_CHECKS = 3  # the first products also compute D(2ε) for the Richardson error estimate
FD_CHECK_EVERY = 8  # and every 8th product after them (Lanczos vectors turn towards high-curvature directions)
RICHARDSON_SAFETY = 2.0  # δ = this · ‖D(ε)u − D(2ε)u‖ covers truncation (1/3 of it) and rounding (≤ 2×)
FSDP_ISSUES = "PyTorch issues #106637 and #172543 (double backward) and #182641 (forward-mode on FSDP2)"


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return False
    return isinstance(p, DTensor)


class ShardedHessianOperator:
    """v ↦ H v on this rank's shard of the parameters (FSDP2), or on parameters spread over devices.

    ``shape`` is the global (P, P); ``A @ V`` takes and returns this rank's entries, (p_r,) or
    (p_r, K), laid out as ``space`` (a :class:`ShardedSpace`) describes: the local shard of every
    trainable parameter in ``named_parameters`` order, flattened. Products over several columns run
    one column at a time.

    Args:
        model: the network; with FSDP2 every trainable parameter must be a DTensor sharded on dim 0
            over a one-dimensional mesh (``fully_shard``'s default). Its values are restored after
            every product; its train/eval flag is set by ``mode`` during products and restored.
        data: ``(inputs, targets)`` batches (anything ``as_batches`` accepts).
        loss: a lossatlas loss name (``lossatlas.losses``).
        path: ``"auto"`` (finite differences under FSDP, double backward otherwise),
            ``"finite_difference"`` or ``"double_backward"`` (refused under FSDP).
        fd_step: the step ε for unit directions (default: calibrated on the first product from
            ε₀ = ε_mach^{1/3}·(1 + ‖θ‖); module docstring).
        fd_checks: the first products that also compute D(2ε) for ``product_error`` (default 3).
        fd_check_every: also check every this-many-th product after them (default 8; 0: never).
        mode: ``"eval"`` (default) or ``"train"``.
        vector_device: where vectors live (default: the device of the first parameter's local tensor).
        input_device: where the batches go (default: the device of the first parameter).

    Example:
        A quadratic L(w) = ½·mean (wᵀx)² has H = XᵀX/N, exact in finite differences up to rounding:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> H = ShardedHessianOperator(model, [(X, torch.zeros(2, 1, dtype=torch.float64))], "half_sse",
        ...                            path="finite_difference")
        >>> (H @ torch.tensor([1.0, 1.0], dtype=torch.float64)).round(decimals=8).tolist(), H.shape
        ([0.5, 2.0], (2, 2))
    """

    kind = "hessian"

    def __init__(self, model: nn.Module, data: Any, loss: str = "cross_entropy", *, path: str = "auto",
                 fd_step: float | None = None, fd_checks: int = FD_CHECKS,
                 fd_check_every: int = FD_CHECK_EVERY, mode: str = "eval",
                 vector_device: torch.device | str | None = None,
                 input_device: torch.device | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if path not in SHARDED_PATHS:
            raise UserError(f"path {path!r} is not one of {', '.join(SHARDED_PATHS)}; pick one of them")
        if mode not in ("eval", "train"):
            raise UserError(f"mode {mode!r} is not 'eval' or 'train'; pick one of them")
        if fd_step is not None and not (float(fd_step) > 0 and math.isfinite(float(fd_step))):
            raise UserError(f"fd_step must be a positive finite number, got {fd_step!r}; leave it out for the default")
        self.loss = check_loss_name(loss)
        self.model, self.mode = model, mode
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UserError("the model has no trainable parameters; set requires_grad on the ones to analyse")
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        sharded = [_is_dtensor(p) for p in self._params]
        self.fsdp = any(sharded)
        if self.fsdp and not all(sharded):
            plain = [n for (n, _), s in zip(named, sharded) if not s][:3]
            raise UserError(f"parameters {', '.join(plain)} are not FSDP-sharded while others are; "
                            "apply fully_shard to the root module too")
        if self.fsdp:
            self._check_placements(named)
        if path == "double_backward" and self.fsdp:
            raise UserError(f"double backward does not run through FSDP ({FSDP_ISSUES}); "
                            "use path='finite_difference' (the default under FSDP)")
        self.path = ("finite_difference" if self.fsdp else "double_backward") if path == "auto" else path
        dist = torch.distributed
        self.world = dist.get_world_size() if self.fsdp and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.fsdp and dist.is_initialized() else 0
        locals_ = self._locals()
        self.dtype: torch.dtype = self._params[0].dtype
        self.device = torch.device(vector_device) if vector_device is not None else locals_[0].device
        self.space = self._space(named, locals_)
        self.num_params = self.space.size
        self.shape = (self.num_params, self.num_params)
        batches = as_batches(data)
        first_device = torch.device(input_device) if input_device is not None else locals_[0].device
        self._batches = to_device(batches, first_device)
        self._weights = batch_weights(self.loss, self._batches)
        self.fd_checks = int(fd_checks)
        self.fd_check_every = int(fd_check_every)
        self.fd_step0: float | None = None  # ε₀ of the calibration (None: fd_step was given)
        self.fd_step = float(fd_step) if fd_step is not None else None  # set on the first product when None
        self.product_error = 0.0  # δ: Richardson estimate of ‖Ãu − Hu‖ for unit u (0: exact or not measured)
        self.matvecs = 0
        self.gradients = 0  # gradient evaluations (two per finite-difference product, four while checking)
        self._checks_done = 0
        self._diffs: list[float] = []  # ‖D(ε)u − D(2ε)u‖ of every checked product

    # ---- layout ---------------------------------------------------------------------------
    def _check_placements(self, named: Sequence[tuple[str, Tensor]]) -> None:
        from torch.distributed.tensor import Shard

        for n, p in named:
            if p.device_mesh.ndim != 1 or list(p.placements) != [Shard(0)]:
                raise UserError(f"parameter {n} is placed {p.placements} on a {p.device_mesh.ndim}-D mesh; "
                                "the sharded Hessian needs fully_shard's Shard(0) on a 1-D mesh")

    def _locals(self) -> list[Tensor]:
        """This rank's tensor of every parameter (the DTensor's local shard, or the parameter itself)."""
        return [p.to_local() if self.fsdp else p.data for p in self._params]

    def _space(self, named: Sequence[tuple[str, Tensor]], locals_: Sequence[Tensor]) -> ShardedSpace:
        """Segments of the global flat vector this rank holds: for a Shard(0) parameter, its rows."""
        rows = [int(t.shape[0]) if t.ndim else 1 for t in locals_]
        if self.fsdp and self.world > 1:
            every: list = [None] * self.world
            torch.distributed.all_gather_object(every, rows)
            before = [sum(every[r][i] for r in range(self.rank)) for i in range(len(rows))]
        else:
            before = [0] * len(rows)
        segments, offset = [], 0
        for (_, p), t, r0 in zip(named, locals_, before):
            row = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
            segments.append((offset + r0 * row, t.numel()))
            offset += math.prod(p.shape)
        return ShardedSpace(offset, segments, active=self.fsdp and self.world > 1)

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """This rank's tensors (one per parameter; None: zeros) as the local flat vector on ``device``."""
        parts = [torch.zeros(t.numel(), dtype=self.dtype, device=self.device) if g is None
                 else g.reshape(-1).to(device=self.device, dtype=self.dtype)
                 for g, t in zip(tensors, self._locals())]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    def unflatten(self, x: Tensor) -> list[Tensor]:
        """A local flat vector as one tensor per parameter, each on that parameter's device."""
        out, pos = [], 0
        for t in self._locals():
            out.append(x[pos : pos + t.numel()].reshape(t.shape).to(t.device))
            pos += t.numel()
        return out

    # ---- loss and gradient ------------------------------------------------------------------
    def _rounds(self) -> list[tuple[int, float]]:
        """(batch index, loss factor) of each forward/backward pass this rank runs, the same count on every rank."""
        nb, W, r = len(self._batches), self.world, self.rank
        mine = list(range(r, nb, W))
        count = -(-nb // W)
        out = [(b, self._weights[b] * W) for b in mine]  # FSDP averages over ranks: W cancels it
        out += [(mine[0] if mine else 0, 0.0)] * (count - len(mine))  # collective passes with weight 0
        return out

    def _grad(self) -> tuple[Tensor, float]:
        """(this rank's entries of ∇L(θ), L(θ)) at the model's current values."""
        for p in self._params:
            p.grad = None
        total = torch.zeros((), dtype=torch.float64)
        with self._mode():
            for b, w in self._rounds():
                x, y = self._batches[b]
                out = model_outputs(self.model, x)
                lb = batch_loss(self.loss, out, y)
                total += float(lb.detach()) * w / self.world
                (lb * w).backward()
        grads = [p.grad.to_local() if (self.fsdp and p.grad is not None) else p.grad for p in self._params]
        g = self.flatten(grads)
        for p in self._params:
            p.grad = None
        self.gradients += 1
        return g, float(self.space.allreduce(total.reshape(1))[0])

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """L(θ) and this rank's entries of ∇L(θ)."""
        g, loss = self._grad()
        return loss, g

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Set the model's train/eval flag for a product and restore the user's afterwards."""
        was = self.model.training
        self.model.train(self.mode == "train")
        try:
            yield
        finally:
            self.model.train(was)

    # ---- products -----------------------------------------------------------------------------
    def __matmul__(self, V: Tensor) -> Tensor:
        V = torch.as_tensor(V)
        single = V.ndim == 1
        X = V.reshape(-1, 1) if single else V
        if X.ndim != 2 or X.shape[0] != self.space.local_size:
            raise ValueError(f"expected this rank's entries, shape ({self.space.local_size},) or "
                             f"({self.space.local_size}, K), got {tuple(V.shape)}")
        X = X.to(device=self.device, dtype=self.dtype)
        cols = [self._product(X[:, j]) for j in range(X.shape[1])]
        out = torch.stack(cols, dim=1) if cols else torch.zeros_like(X)
        return out[:, 0] if single else out

    def _product(self, v: Tensor) -> Tensor:
        self.matvecs += 1
        if self.path == "double_backward":
            return self._exact(v)
        nv = float(self.space.norms(v[None])[0])  # the same on every rank: every rank takes the same branch
        if nv == 0.0:
            return torch.zeros_like(v)
        u = v / nv
        if self.fd_step is None:
            self._calibrate(u)
        eps = self.fd_step
        d1, _ = self._difference(u, eps)
        check = self._checks_done < self.fd_checks or (self.fd_check_every and self.matvecs % self.fd_check_every == 0)
        if check:  # Richardson: D(2ε) beside D(ε)
            d2, _ = self._difference(u, 2 * eps)
            self._diffs.append(float(self.space.norms((d1 - d2)[None])[0]))
            self.product_error = RICHARDSON_SAFETY * max(self._diffs)
            self._checks_done += 1
        return d1 * nv

    def _calibrate(self, u: Tensor) -> None:
        """Choose ε on the first direction: ε₀ = ε_mach^{1/3}(1 + ‖θ‖), then ε* = (e_g / (2C))^{1/3}.

        C = ‖D(2ε₀)u − D(ε₀)u‖ / (3ε₀²) estimates the truncation coefficient (error ≈ Cε²) and
        e_g = ε_mach·‖∇L‖ the rounding error of one gradient (error ≈ e_g/ε); ε* minimizes their sum
        (clamped to [ε₀/10⁴, ε₀]). Costs four gradients once.
        """
        theta = self.flatten(self._locals())
        eps0 = float(torch.finfo(self.dtype).eps) ** (1 / 3) * (1.0 + float(self.space.norms(theta[None])[0]))
        d1, gnorm = self._difference(u, eps0)
        d2, _ = self._difference(u, 2 * eps0)
        trunc = float(self.space.norms((d1 - d2)[None])[0]) / (3 * eps0**2)
        e_g = float(torch.finfo(self.dtype).eps) * max(gnorm, float(torch.finfo(self.dtype).tiny))
        self.fd_step0 = eps0
        self.fd_step = eps0 if trunc == 0.0 else min(eps0, max(eps0 * 1e-4, (e_g / (2 * trunc)) ** (1 / 3)))

    def step(self) -> float | None:
        """ε for unit directions (None until the first product chose it, unless ``fd_step`` was given)."""
        return self.fd_step

    def _difference(self, u: Tensor, eps: float) -> tuple[Tensor, float]:
        """(D(ε)u = (∇L(θ + εu) − ∇L(θ − εu)) / (2ε), max ‖∇L(θ ± εu)‖), θ restored exactly afterwards."""
        locals_ = self._locals()
        saved = [t.detach().clone() for t in locals_]
        pieces = self.unflatten(u)
        try:
            with torch.no_grad():
                for t, s, d in zip(locals_, saved, pieces):
                    t.copy_(s + eps * d)
            g_plus, _ = self._grad()
            with torch.no_grad():
                for t, s, d in zip(locals_, saved, pieces):
                    t.copy_(s - eps * d)
            g_minus, _ = self._grad()
        finally:
            with torch.no_grad():
                for t, s in zip(locals_, saved):
                    t.copy_(s)
        gnorm = float(self.space.norms(torch.stack([g_plus, g_minus])).max())
        return (g_plus - g_minus) / (2 * eps), gnorm

    def _exact(self, v: Tensor) -> Tensor:
        """H v by double backward, each parameter's slice of v on that parameter's own device."""
        pieces = self.unflatten(v)
        acc: list[Tensor | None] = [None] * len(self._params)
        with self._mode():
            for (x, y), w in zip(self._batches, self._weights):
                lb = batch_loss(self.loss, model_outputs(self.model, x), y) * w
                g = torch.autograd.grad(lb, self._params, create_graph=True, allow_unused=True)
                used = [i for i, gi in enumerate(g) if gi is not None]
                dot = sum((g[i] * pieces[i]).sum().to(self.device) for i in used)
                hv = torch.autograd.grad(dot, [self._params[i] for i in used], allow_unused=True)
                for i, h in zip(used, hv):
                    if h is not None:
                        acc[i] = h.detach() if acc[i] is None else acc[i] + h.detach()
        self.gradients += 2
        return self.flatten(acc)

    def gather(self, x: Tensor) -> Tensor:
        """The global vector from every rank's entries (small models: tests, stored eigenvectors)."""
        return self.space.gather(x)

    def report(self) -> dict[str, Any]:
        """What the products were: path, ε, δ and the counts (for a result's meta)."""
        return {"path": self.path, "fd_step": self.fd_step, "fd_step0": self.fd_step0, "product_error": self.product_error,
                "richardson_diffs": list(self._diffs), "matvecs": self.matvecs, "gradients": self.gradients,
                "world_size": self.world, "fsdp": self.fsdp, "num_params": self.num_params}


# ---- FSDP setup and the probe run under torchrun ------------------------------------------------
def shard_model(model: nn.Module, mesh: Any = None) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every element of each ``nn.ModuleList`` (transformer blocks), then the root.

    ``mesh``: a 1-D DeviceMesh (default: all ranks, on "cuda" when the backend is NCCL, else "cpu").
    Returns the model (sharded in place).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        kind = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_sharded_hessian(probe: Any, ctx: Any) -> Any:
    """The ``hessian`` probe's top/bottom eigenvalues, trace and density with sharded finite-difference products.

    Used by the runner under ``--fsdp``: every rank loads the checkpoint, the model is sharded with
    :func:`shard_model` (under torchrun; alone it stays whole and the products are still finite
    differences), and the sharded estimators run on :class:`ShardedHessianOperator`. The Result has the
    probe's keys (``top_eigenvalues``, ``trace``, ``density``, …) plus the bounds from the products'
    error: ``top_error_bounds``, ``trace_fd_bound``, ``density_moment_bounds``; rank 0 writes it.
    """
    if getattr(probe, "name", None) != "hessian":
        raise UserError(f"--fsdp runs the hessian probe only, not {getattr(probe, 'name', probe)!r}; "
                        "leave --fsdp out for this probe")
    model = ctx.model
    if ctx.dist.active:
        shard_model(model)
    op = ShardedHessianOperator(model, ctx.data, ctx.loss, path="finite_difference")
    if probe.top_k > op.num_params:
        raise ValueError(f"hessian: top_k={probe.top_k} asks for more eigenpairs than the model's {op.num_params} "
                         f"parameters; use top_k ≤ {op.num_params}")
    res = probe.new_result(ctx.step, {})
    meta = res.meta
    if probe.top_k:
        top = sharded_lanczos_eigs(op, probe.top_k, which="LA", tol=probe.tol, max_iter=probe.max_iter,
                                   seed=probe.seed, return_eigenvectors=False)
        res.add("top_eigenvalues", top.eigenvalues, ("k",))
        res.add("top_residuals", top.residuals, ("k",))
        res.add("top_error_bounds", top.error_bounds, ("k",))
        meta["top_converged"] = [bool(c) for c in top.converged]
        meta["top_matvecs"] = int(top.matvecs)
        meta["lambda_max"] = float(top.eigenvalues[0])
    if probe.bottom_k:
        bot = sharded_lanczos_eigs(op, probe.bottom_k, which="SA", tol=probe.tol, max_iter=probe.max_iter,
                                   seed=probe.seed, return_eigenvectors=False)
        res.add("bottom_eigenvalues", bot.eigenvalues, ("k",))
        res.add("bottom_residuals", bot.residuals, ("k",))
        res.add("bottom_error_bounds", bot.error_bounds, ("k",))
        meta["bottom_converged"] = [bool(c) for c in bot.converged]
    if probe.trace:
        tr = sharded_hutchinson_trace(op, probe.trace_matvecs, seed=probe.seed)
        res.add("trace", tr.value)
        res.add("trace_stderr", tr.stderr)
        res.add("trace_fd_bound", tr.product_bound)
        meta["trace_method"] = "hutchinson"
        meta["trace_matvecs"] = int(tr.matvecs)
    if probe.density:
        dens = sharded_slq_density(op, num_probes=probe.num_probes, num_steps=min(probe.num_steps, op.num_params),
                                   sigma_squared=probe.sigma_squared, seed=probe.seed)
        res.add("density", dens.density, ("grid",), {"grid": dens.grid})
        res.add("density_nodes", dens.nodes, ("probe", "node"))
        res.add("density_weights", dens.weights, ("probe", "node"))
        res.add("density_moment_bounds", dens.moment_bounds, ("probe", "moment"))
        res.add("outliers", np.asarray(dens.outliers, dtype=np.float64), ("outlier",))
        meta["bulk_edge"] = float(dens.bulk_edge)
    info = op.report()
    meta.update(path=info["path"], matvecs=int(info["matvecs"]), fd_step=info["fd_step"],
                product_error=info["product_error"], gradients=int(info["gradients"]),
                sharded_world_size=int(info["world_size"]), fsdp=bool(info["fsdp"]))
    return res


__all__ = ["ShardedHessianOperator", "shard_model", "run_sharded_hessian", "SHARDED_PATHS", "FSDP_ISSUES"]
