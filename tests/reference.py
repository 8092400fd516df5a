"""Dense float64 references for the tests: loss, gradient, Hessian, GGN, Fisher, spectra, accuracy.

Built by plain autograd on a flat parameter vector θ, independently of ``lossatlas``, so that the
operators and probes can be checked against them. Every quantity is of the example-weighted loss
over batches b with n_b terms each (N = Σ_b n_b):

    L(θ) = Σ_b (n_b/N) · mean_{i∈b} ℓ_i(θ) = (1/N) Σ_i ℓ_i(θ).

A term is an example, or a token when the labels are (B, T) class indices. Losses by name:
``cross_entropy`` (softmax), ``mse`` (mean over the C outputs of (f − y)²), ``half_sse``
(½ Σ_c (f_c − y_c)²); integer labels are one-hot encoded for the squared losses.

``mode="eval"``: dropout off, BatchNorm uses its running statistics. ``mode="train"``: BatchNorm
uses the batch's statistics (the running ones are neither read nor updated); dropout is refused, as
it would make the reference random. The model passed in is never modified (a copy is evaluated).

Matrices are P×P in the order of ``names`` (default: ``model.named_parameters()``); parameters not
named stay fixed at their values, and ``point`` replaces values (any subset of parameters).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DT = torch.float64
LOSSES = ("cross_entropy", "mse", "half_sse")


# ------------------------------------------------------------------------------------------------- losses
def close(a: Tensor, b: Tensor, rtol: float = 1e-10) -> None:
    """Assert max|a − b| ≤ rtol · max|b| (b is the reference; it must not be all zeros)."""
    scale = float(b.abs().max())
    assert scale > 0
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def _is_labels(y: Tensor) -> bool:
    return not (y.is_floating_point() or y.is_complex())


def term_count(y: Tensor) -> int:
    """n_b: one term per class label (tokens for (B, T) labels), else one per target row."""
    return int(y.numel()) if _is_labels(y) else int(y.shape[0])


def per_term_outputs(loss: str, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs as (n, C) rows f_i, one per term, with the labels (n,) for cross_entropy, else (n, C) targets."""
    n = term_count(y)
    rows = out.reshape(n, -1)
    if not _is_labels(y):
        return rows, y.reshape(n, -1).to(rows.dtype)
    labels = y.reshape(n).long()
    return rows, labels if loss == "cross_entropy" else F.one_hot(labels, rows.shape[-1]).to(rows.dtype)


def per_term_loss(loss: str, rows: Tensor, t: Tensor) -> Tensor:
    """ℓ_i for (n, C) output rows: −log softmax(f_i)[y_i], mean_c (f_ic − y_ic)², or ½ Σ_c (f_ic − y_ic)²."""
    if loss == "cross_entropy":
        return F.cross_entropy(rows, t, reduction="none")
    sq = (rows - t) ** 2
    if loss == "mse":
        return sq.mean(dim=1)
    if loss == "half_sse":
        return 0.5 * sq.sum(dim=1)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def per_example_losses(loss: str, out: Tensor, y: Tensor) -> Tensor:
    """ℓ_i of every term of a batch, shape (n_b,)."""
    return per_term_loss(loss, *per_term_outputs(loss, out, y))


# ------------------------------------------------------------------------------------- flat parameters
class FlatModel:
    """A copy of ``model`` as a function of a flat vector θ of the ``names`` parameters."""

    def __init__(self, model: nn.Module, mode: str = "eval", names=None, point=None):
        if mode not in ("eval", "train"):
            raise ValueError(f"unknown mode {mode!r}; choose eval or train")
        self.ref = copy.deepcopy(model)
        self.ref.train(mode == "train")
        if mode == "train":
            for m in self.ref.modules():
                if isinstance(m, nn.Dropout) and m.p > 0:
                    raise ValueError("dropout in train mode makes the dense reference random; use mode='eval'")
                if isinstance(m, nn.modules.batchnorm._BatchNorm):  # batch statistics only
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        named = {n: p.detach().clone() for n, p in self.ref.named_parameters()}
        named.update({n: t.detach().clone() for n, t in (point or {}).items()})
        self.names = list(names) if names else list(named)
        self.fixed = {n: t for n, t in named.items() if n not in self.names}
        self.shapes = [named[n].shape for n in self.names]
        self.theta = torch.cat([named[n].reshape(-1) for n in self.names])

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        """θ split back into named tensors."""
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    def out(self, flat: Tensor, x: Tensor) -> Tensor:
        """f(x; θ)."""
        return torch.func.functional_call(self.ref, {**self.fixed, **self.params(flat)}, (x,))


def flat_parameters(model: nn.Module, names=None) -> Tensor:
    """θ: the named parameters' values concatenated, in ``names`` order (default: all of them)."""
    return FlatModel(model, names=names).theta


def unflatten(model: nn.Module, flat: Tensor, names=None) -> dict[str, Tensor]:
    """A flat θ back as named tensors (a ``point``), in ``names`` order (default: all parameters)."""
    return FlatModel(model, names=names).params(flat)


def loss_function(model, batches, loss, mode="eval", names=None, point=None):
    """(L, θ₀): L(θ) = (1/N) Σ_i ℓ_i(θ) = Σ_b (n_b/N) mean_b ℓ as a function of flat θ, and its point."""
    fm = FlatModel(model, mode, names, point)
    N = sum(term_count(y) for _, y in batches)

    def total(flat: Tensor) -> Tensor:
        return sum(per_example_losses(loss, fm.out(flat, x), y).sum() for x, y in batches) / N

    return total, fm.theta


# -------------------------------------------------------------------------------------- the references
def loss_value(model, batches, loss, mode="eval", names=None, point=None) -> float:
    """L(θ) = Σ_b n_b · mean_b(ℓ) / N."""
    f, theta = loss_function(model, batches, loss, mode, names, point)
    with torch.no_grad():
        return float(f(theta))


def accuracy(model, batches, mode="eval") -> float:
    """The fraction of terms whose argmax output is the label (targets: their argmax)."""
    fm = FlatModel(model, mode)
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            rows, t = per_term_outputs("cross_entropy", fm.out(fm.theta, x), y)
            labels = t if t.ndim == 1 else t.argmax(dim=-1)
            right += int((rows.argmax(dim=-1) == labels).sum())
            total += labels.numel()
    return right / total


def gradient(model, batches, loss, mode="eval", names=None, point=None) -> Tensor:
    """∇L(θ), shape (P,)."""
    f, theta = loss_function(model, batches, loss, mode, names, point)
    theta = theta.clone().requires_grad_(True)
    return torch.autograd.grad(f(theta), theta)[0].detach()


def hessian(model, batches, loss, mode="eval", names=None, point=None) -> Tensor:
    """H = ∇²L(θ), P×P, symmetrised ½(H + Hᵀ).

    Row by row, H_i = ∂(∇L)_i/∂θ, one plain backward each through a gradient built with
    create_graph: in torch 2.13 the vmapped torch.func.hessian (jacfwd/jacrev) returns wrong rows
    for BatchNorm in train mode and for LayerNorm weights.
    """
    f, theta = loss_function(model, batches, loss, mode, names, point)
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())]
    H = torch.stack(rows).detach()
    return 0.5 * (H + H.T)


def _output_jacobians(fm: FlatModel, batches, loss):
    """Per batch: J (n_b, C, P) = ∂f_i/∂θ of the term rows, the rows f_i (n_b, C) and the labels/targets."""
    for x, y in batches:
        rows, t = per_term_outputs(loss, fm.out(fm.theta, x), y)
        J = torch.func.jacrev(lambda flat, x=x, shape=rows.shape: fm.out(flat, x).reshape(shape))(fm.theta)
        yield J.detach(), rows.detach(), t


def ggn(model, batches, loss, mode="eval", names=None, point=None) -> Tensor:
    """G = (1/N) Σ_i J_iᵀ H_i J_i with J_i = ∂f_i/∂θ and H_i = ∂²ℓ_i/∂f_i² (autograd in the outputs)."""
    fm = FlatModel(model, mode, names, point)
    N = sum(term_count(y) for _, y in batches)
    G = torch.zeros(fm.theta.numel(), fm.theta.numel(), dtype=fm.theta.dtype)

    def ell(row: Tensor, target: Tensor) -> Tensor:
        return per_term_loss(loss, row[None], target[None]).sum()

    for J, rows, t in _output_jacobians(fm, batches, loss):
        Hout = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(ell)))(rows, t)  # (n, C, C)
        G += torch.einsum("ncp,ncd,ndq->pq", J, Hout, J)
    G = G / N
    return 0.5 * (G + G.T)


def fisher(model, batches, loss, mode="eval", names=None, point=None) -> Tensor:
    """True Fisher F = (1/N) Σ_i E_{y∼p(·|f_i)}[∇ℓ_i(y) ∇ℓ_i(y)ᵀ], the expectation taken exactly.

    cross_entropy: F = (1/N) Σ_i Σ_c p_ic ∇log p_ic ∇log p_icᵀ, a sum over all C labels.
    mse / half_sse: ℓ is the negative log-likelihood of y ∼ N(f, s²I) with s² = C/2 / 1, so
    ∇ℓ = J_iᵀ (f_i − y)/s² and E[·] = J_iᵀ J_i / s².
    """
    fm = FlatModel(model, mode, names, point)
    N = sum(term_count(y) for _, y in batches)
    M = torch.zeros(fm.theta.numel(), fm.theta.numel(), dtype=fm.theta.dtype)
    for J, rows, _ in _output_jacobians(fm, batches, loss):
        if loss == "cross_entropy":
            logp = rows.log_softmax(-1)
            # ∇ log p_ic = (∂ log softmax / ∂f) J_i = (I − 1 p_iᵀ) J_i
            Jlog = J - torch.einsum("nc,ncp->np", logp.exp(), J)[:, None, :]
            M += torch.einsum("ncp,nc,ncq->pq", Jlog, logp.exp(), Jlog)
        elif loss in ("mse", "half_sse"):
            s2 = rows.shape[-1] / 2 if loss == "mse" else 1.0
            M += torch.einsum("ncp,ncq->pq", J, J) / s2
        else:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    M = M / N
    return 0.5 * (M + M.T)


def empirical_fisher(model, batches, loss, mode="eval", names=None, point=None) -> Tensor:
    """Empirical Fisher F_emp = (1/N) Σ_i g_i g_iᵀ, g_i = ∇ℓ_i(θ) with the data's labels."""
    fm = FlatModel(model, mode, names, point)
    N = sum(term_count(y) for _, y in batches)
    M = torch.zeros(fm.theta.numel(), fm.theta.numel(), dtype=fm.theta.dtype)
    for x, y in batches:
        Gi = torch.func.jacrev(lambda flat, x=x, y=y: per_example_losses(loss, fm.out(flat, x), y))(fm.theta)
        M += Gi.T @ Gi
    return M / N


def eigendecomposition(M: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of the symmetric M (symmetrised first): eigenvalues ascending, eigenvectors as columns."""
    return torch.linalg.eigh(0.5 * (M + M.T))


def eigenvalues(M: Tensor, descending: bool = False) -> Tensor:
    """All eigenvalues of the symmetric M, ascending (or descending)."""
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T))
    return lam.flip(0) if descending else lam


def trace(M: Tensor) -> float:
    """tr(M) = Σ_i M_ii, exactly."""
    return float(torch.trace(M))


# ----------------------------------------------------------------------------------------- test cases
class TinyMLP(nn.Module):
    """5 → 8 (tanh) → 3: 75 parameters."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyCNN(nn.Module):
    """1×6×6 images: conv 3×3 (1 → 3 channels, tanh), 2×2 average pooling, linear 12 → 3: 69 parameters."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 3, 3), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


class TinyTransformer(nn.Module):
    """Embedding, one causal attention head, LayerNorm, GELU MLP, unembedding (vocab 5, width 4): 159 parameters."""

    def __init__(self, vocab=5, d=4, T=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, d))
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, idx):  # (B, T) tokens → (B, T, vocab) logits
        h = self.emb(idx)
        att = self.q(h) @ self.k(h).transpose(-2, -1) / math.sqrt(h.shape[-1])
        T = idx.shape[1]
        h = h + att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1) @ self.v(h)
        return self.out(h + self.mlp(self.ln(h)))


ARCHITECTURES = ("mlp", "cnn", "transformer")
CASE_SIZES = (7, 5, 3)


class Case:
    """A float64 model, unequal batches (7, 5, 3 examples or sequences) and a loss name."""

    def __init__(self, name, model, batches, loss):
        self.name, self.model, self.batches, self.loss = name, model, batches, loss

    def __repr__(self):
        return f"Case({self.name})"


def build_case(arch: str, loss: str, seed: int = 0) -> Case:
    """The ``arch`` × ``loss`` case: seeded weights and data; labels are class indices (tokens for the transformer)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    if arch == "transformer":
        model = TinyTransformer().to(DT)
        for n in CASE_SIZES:
            tok = torch.randint(0, 5, (n, 5), generator=g)
            batches.append((tok[:, :4], tok[:, 1:]))  # next-token targets
    else:
        model = (TinyMLP() if arch == "mlp" else TinyCNN()).to(DT)
        shape = (5,) if arch == "mlp" else (1, 6, 6)
        batches = [(torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
                   for n in CASE_SIZES]
    return Case(f"{arch}-{loss}", model, batches, loss)
