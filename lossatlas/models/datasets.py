"""Data sets that need no download, each a deterministic function of its seed.

Every builder returns an ``(inputs, targets)`` pair of tensors and draws its randomness from a
local ``torch.Generator`` (never the global RNG), so two calls give identical tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lossatlas.checks import check_choice
from lossatlas.models.registry import register_data

SPLITS: tuple[str, ...] = ("train", "test", "all")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
OPERATIONS: tuple[str, ...] = ("add", "sub", "mul", "div")
TARGETS: tuple[str, ...] = ("class", "sequence")


def _check_fraction(what: str, value: float) -> float:
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{what} must lie strictly between 0 and 1, got {value}")
    return float(value)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@register_data("digits")
def digits(
    split: str = "train", test_fraction: float = 0.2, standardize: bool = True, dtype: str = "float32", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, bundled, no download): X (N, 64), y (N,) long.

    The test set is the first round(test_fraction·1797) examples of a seeded permutation, the train
    set the rest (both in permutation order; ``all`` keeps the original order). ``standardize``
    maps every pixel to zero mean and unit variance with the *train* statistics (constant pixels
    are only centred).
    """
    from sklearn.datasets import load_digits

    check_choice("split", split, SPLITS)
    check_choice("dtype", dtype, tuple(DTYPES))
    _check_fraction("test_fraction", test_fraction)
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)  # (1797, 64), pixel values 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.long)  # (1797,)
    perm = torch.randperm(x.shape[0], generator=_generator(seed))
    n_test = round(test_fraction * x.shape[0])
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if standardize:
        mean = x[train_idx].mean(dim=0)
        std = x[train_idx].std(dim=0)
        x = (x - mean) / torch.where(std > 1e-12, std, torch.ones_like(std))
    if split != "all":
        idx = train_idx if split == "train" else test_idx
        x, y = x[idx], y[idx]
    return x.to(DTYPES[dtype]), y


def mixture_means(num_classes: int, dim: int, separation: float) -> Tensor:
    """Class means (K, D) with neighbouring means exactly ``separation`` apart.

    K ≤ D: (separation/√2)·e_k (all pairs equidistant); otherwise K points on a circle of radius
    separation/(2 sin(π/K)) in the first two coordinates (on a line when D = 1).
    """
    means = torch.zeros(num_classes, dim, dtype=torch.float64)
    if num_classes <= dim:
        means[torch.arange(num_classes), torch.arange(num_classes)] = separation / math.sqrt(2.0)
    elif dim == 1:
        means[:, 0] = separation * (torch.arange(num_classes, dtype=torch.float64) - (num_classes - 1) / 2)
    else:
        radius = separation / (2.0 * math.sin(math.pi / num_classes))
        angle = 2.0 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
        means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
    return means


def _class_counts(num_classes: int, n: int | None, n_per_class: int | None, imbalance: float | Sequence[int] | None) -> list[int]:
    if isinstance(imbalance, (list, tuple)):
        counts = [int(c) for c in imbalance]
        if len(counts) != num_classes or any(c <= 0 for c in counts):
            raise ValueError(f"imbalance as counts needs {num_classes} positive integers, got {list(imbalance)}")
        if n is not None or n_per_class is not None:
            raise ValueError("give either per-class counts in imbalance or n / n_per_class, not both")
        return counts
    if n is not None and n_per_class is not None:
        raise ValueError("give n (total) or n_per_class, not both")
    if n is not None:
        if int(n) < num_classes:
            raise ValueError(f"n must be at least num_classes ({num_classes}), got {n}")
        base, extra = divmod(int(n), num_classes)
        counts = [base + (k < extra) for k in range(num_classes)]
    else:
        per = 100 if n_per_class is None else int(n_per_class)
        if per <= 0:
            raise ValueError(f"n_per_class must be positive, got {n_per_class}")
        counts = [per] * num_classes
    if imbalance is None:
        return counts
    ratio = float(imbalance)
    if ratio < 1.0:
        raise ValueError(f"imbalance ratio is n_largest/n_smallest and must be ≥ 1, got {imbalance}")
    # geometric decay: class k keeps a fraction ratio^(-k/(K-1)); class 0 the most, class K-1 1/ratio of it
    steps = max(num_classes - 1, 1)
    return [max(1, round(c * ratio ** (-k / steps))) for k, c in enumerate(counts)]


@register_data("gaussian_mixture")
def gaussian_mixture(
    num_classes: int = 3,
    dim: int = 2,
    n: int | None = None,
    n_per_class: int | None = None,
    separation: float = 3.0,
    imbalance: float | Sequence[int] | None = None,
    noise_std: float = 1.0,
    split: str = "train",
    test_fraction: float = 0.2,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Isotropic Gaussian classes x = μ_y + noise_std·ε, ε ~ N(0, I): X (N, dim), y (N,) long.

    Means from :func:`mixture_means` (neighbours ``separation`` apart). Class sizes: ``n`` split
    evenly, or ``n_per_class`` (default 100), optionally shrunk geometrically by an ``imbalance``
    ratio n_0/n_{K−1}, or explicit per-class counts given as ``imbalance``. The split is stratified
    (round(test_fraction·n_k) test examples per class); examples come in a seeded shuffled order.
    """
    check_choice("split", split, SPLITS)
    check_choice("dtype", dtype, tuple(DTYPES))
    _check_fraction("test_fraction", test_fraction)
    if int(num_classes) < 1 or int(dim) < 1:
        raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    counts = _class_counts(int(num_classes), n, n_per_class, imbalance)
    gen = _generator(seed)
    means = mixture_means(int(num_classes), int(dim), float(separation))
    xs, ys, test_mask = [], [], []
    for k, count in enumerate(counts):
        xs.append(means[k] + noise_std * torch.randn(count, int(dim), generator=gen, dtype=torch.float64))
        ys.append(torch.full((count,), k, dtype=torch.long))
        mask = torch.zeros(count, dtype=torch.bool)
        mask[torch.randperm(count, generator=gen)[: round(test_fraction * count)]] = True
        test_mask.append(mask)
    x, y, is_test = torch.cat(xs), torch.cat(ys), torch.cat(test_mask)
    order = torch.randperm(x.shape[0], generator=gen)
    x, y, is_test = x[order], y[order], is_test[order]
    if split != "all":
        keep = is_test if split == "test" else ~is_test
        x, y = x[keep], y[keep]
    return x.to(DTYPES[dtype]), y


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


@register_data("modular_arithmetic")
def modular_arithmetic(
    p: int = 113,
    operation: str = "add",
    train_fraction: float = 0.3,
    split: str = "train",
    target: str = "class",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Equations a ∘ b = c over Z_p as tokens [a, b, "="] with "=" the token p (vocab p + 1).

    Power, Burda, Edwards, Babuschkin, Misra 2022 (p = 97) / Nanda, Chan, Lieberum, Smith,
    Steinhardt 2023 (p = 113, train fraction 0.3): every pair (a, b) once (p² of them;
    ``div`` drops b = 0 and needs a prime p: c = a·b⁻¹), train = the first int(train_fraction·N)
    of a seeded permutation, test = the rest (p = 113, 0.3 → 3,830 train pairs).
    ``target="class"``: inputs (N, 3), targets c (N,) — use ``gpt`` with ``last_token_only=True``
    and vocab_size p + 1. ``target="sequence"``: next-token targets (N, 3) = [b, "=", c] for an LM
    loss over every position (grokking itself scores only the answer).
    """
    check_choice("operation", operation, OPERATIONS)
    check_choice("split", split, SPLITS)
    check_choice("target", target, TARGETS)
    _check_fraction("train_fraction", train_fraction)
    p = int(p)
    if p < 2:
        raise ValueError(f"p must be an integer ≥ 2, got {p}")
    if operation == "div" and not _is_prime(p):
        raise ValueError(f"operation 'div' needs a prime p so that every b ≠ 0 is invertible, got {p}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)  # (p²,), pairs in lexicographic order
    if operation == "add":
        c = (a + b) % p
    elif operation == "sub":
        c = (a - b) % p
    elif operation == "mul":
        c = (a * b) % p
    else:
        a, b = a[b != 0], b[b != 0]
        inverse = torch.tensor([0] + [pow(v, -1, p) for v in range(1, p)])
        c = (a * inverse[b]) % p
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # (N, 3)
    targets = c if target == "class" else torch.stack([b, torch.full_like(a, p), c], dim=1)
    if split != "all":
        perm = torch.randperm(inputs.shape[0], generator=_generator(seed))
        n_train = int(train_fraction * inputs.shape[0])
        idx = perm[:n_train] if split == "train" else perm[n_train:]
        inputs, targets = inputs[idx], targets[idx]
    return inputs, targets


def markov_transitions(vocab_size: int, branching: int, generator: torch.Generator) -> Tensor:
    """A sparse random transition matrix P (V, V): every row has ``branching`` non-zeros.

    Each token's successors are a random subset of size ``branching``, weighted by normalised
    Exp(1) draws (a flat Dirichlet), so the process has entropy rate below log(branching).
    """
    probs = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for v in range(vocab_size):
        successors = torch.randperm(vocab_size, generator=generator)[:branching]
        weights = -torch.log(torch.rand(branching, generator=generator, dtype=torch.float64))
        probs[v, successors] = weights / weights.sum()
    return probs


@register_data("token_stream")
def token_stream(
    vocab_size: int = 64,
    block_size: int = 32,
    n_sequences: int = 256,
    branching: int = 4,
    split: str = "train",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Language-modelling windows of a sparse random Markov chain: inputs, targets (N, T) long.

    The chain (:func:`markov_transitions`) depends on ``seed`` only; ``train`` and ``test`` draw
    different sequences from it. Each sequence starts at a uniform token; targets are the inputs
    shifted by one (targets[:, t] = inputs[:, t + 1] for t < T − 1).
    """
    check_choice("split", split, ("train", "test"))
    vocab_size, block_size, n_sequences, branching = int(vocab_size), int(block_size), int(n_sequences), int(branching)
    if min(vocab_size, block_size, n_sequences) < 1 or not 1 <= branching <= vocab_size:
        raise ValueError(
            f"need positive vocab_size, block_size, n_sequences and 1 ≤ branching ≤ vocab_size; got "
            f"{vocab_size}, {block_size}, {n_sequences}, {branching}"
        )
    gen = _generator(seed)
    probs = markov_transitions(vocab_size, branching, gen)
    sample_seeds = torch.randint(0, 2**62, (2,), generator=gen)
    sample_gen = _generator(int(sample_seeds[0 if split == "train" else 1]))
    tokens = torch.empty(n_sequences, block_size + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab_size, (n_sequences,), generator=sample_gen)
    for t in range(block_size):
        tokens[:, t + 1] = torch.multinomial(probs[tokens[:, t]], 1, generator=sample_gen).squeeze(1)
    return tokens[:, :-1].clone(), tokens[:, 1:].clone()
