"""Features of a model on a data set: module activations through hooks, streamed batch by batch.

The default features are the *input* of the last ``nn.Linear`` (the penultimate features of
neural collapse, captured with a forward pre-hook as in tding1/Neural-Collapse).
Several modules are captured in one forward per batch ("across depth"). The model is never
mutated: its train/eval flag is set for the pass and restored, hooks are removed even on error,
and optional ``params`` are evaluated with ``torch.func.functional_call``.

Two ways to get features:

- ``collect_features``: the whole (N, p) matrix, for moderate data (uniformity, RankMe).
- ``stream_features`` + ``ClassStatistics``: per-class counts, means, Σ_W and Σ_B accumulated in
  float64 over a two-pass stream (class means first, then within-class scatter), without keeping
  the features (neural collapse).

Inputs may be tensors or dicts (``model(**x)``). A sequence model's (B, T, p) features with (B, T)
integer labels give one row per token whose label is not -100; for a causal language model
(``next_token_labels``) the feature at position t is paired with the label at t + 1, the token it
predicts, as in the neural collapse of language models (Wu & Papyan 2024, "Linguistic Collapse:
Neural Collapse in (Large) Language Models").
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lossatlas.batches import batch_length, map_inputs, take
from lossatlas.checks import check_choice
from lossatlas.losses import IGNORE_INDEX, MODEL_LOSS, shifts_labels
from lossatlas.outputs import model_outputs
from lossatlas.probes.modes import evaluation_mode

CAPTURES: tuple[str, ...] = ("input", "output")
_DEPTH_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_weight_layer(module: nn.Module) -> bool:
    """True for a layer whose weight acts on its input as a matrix or a conv kernel.

    ``nn.Linear``, ``nn.Conv{1,2,3}d``, or transformers' ``Conv1D`` (GPT-2's linear layer, weight stored
    (in, out); told by its name so that transformers need not be imported).
    """
    if isinstance(module, _DEPTH_TYPES):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def last_linear_name(model: nn.Module) -> str:
    """The name of the last ``nn.Linear`` in ``model.named_modules()`` order (the classifier)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; name the feature module explicitly")
    return name


def depth_module_names(model: nn.Module) -> list[str]:
    """Names of every weight layer (``is_weight_layer``) in forward-registration order ("depth")."""
    names = [n for n, m in model.named_modules() if is_weight_layer(m)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to measure across depth")
    return names


def resolve_module(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """``(name, module)``; None means the last ``nn.Linear``. Unknown names raise, listing some known ones."""
    if name is None:
        name = last_linear_name(model)
    modules = dict(model.named_modules())
    if name not in modules:
        known = ", ".join(repr(n) for n in list(modules)[1:12])
        raise ValueError(f"model has no module named {name!r}; known modules include {known}")
    return name, modules[name]


def classifier_weights(
    model: nn.Module, module: str | None = None, params: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(W (C, p), b (C,) or None)`` of a linear layer (default the last), detached float64 copies.

    Taken from ``params`` (``"<module>.weight"``, ``"<module>.bias"``) when given, else the module.
    """
    name, mod = resolve_module(model, module)
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"module {name!r} is a {type(mod).__name__}, not an nn.Linear classifier")
    prefix = f"{name}." if name else ""
    params = params or {}
    weight = params.get(prefix + "weight", mod.weight)
    bias = params.get(prefix + "bias", mod.bias)
    w = weight.detach().to(torch.float64).clone()
    b = None if bias is None else bias.detach().to(torch.float64).clone()
    return w, b


def labels_of(y: Tensor) -> Tensor:
    """Integer class labels (n,): integer targets as they are, one-hot/soft (n, C) targets by argmax."""
    if y.is_floating_point() and y.ndim == 2:
        return y.argmax(dim=1)
    if y.is_floating_point():
        raise ValueError(f"targets of shape {tuple(y.shape)} are not class labels; give integer labels or one-hot rows")
    return y.reshape(-1).long()


def next_token_labels(model: nn.Module, loss: str) -> bool:
    """Whether a token's features pair with the next token's label: the loss causal_lm, or a causal LM's own loss."""
    return loss == "causal_lm" or (loss == MODEL_LOSS and shifts_labels(model))


def _rows(feature: Tensor, y: Tensor, next_token: bool = False) -> tuple[Tensor, Tensor]:
    """(feature rows, their integer labels): tokens for (B, T, p) with (B, T) labels, else one row per example.

    Token rows drop the labels -100; ``next_token`` pairs the feature at t with the label at t + 1.
    """
    if feature.ndim == 3 and y.ndim == 2 and not y.is_floating_point() and tuple(feature.shape[:2]) == tuple(y.shape):
        if next_token:  # position t predicts the token at t + 1; the last position predicts nothing
            feature, y = feature[:, :-1], y[:, 1:]
        rows, labels = feature.reshape(-1, feature.shape[-1]), y.reshape(-1).long()
        keep = labels != IGNORE_INDEX
        return rows[keep], labels[keep]
    return feature.reshape(feature.shape[0], -1), labels_of(y)


@contextlib.contextmanager
def capture_activations(
    model: nn.Module, names: Sequence[str], capture: str = "input"
) -> Iterator[dict[str, Tensor]]:
    """Hooks that store each named module's input (pre-hook) or output in the yielded dict.

    The dict is refilled by every forward; the hooks are removed when the block ends, on error too.
    """
    check_choice("capture", capture, CAPTURES)
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name in names:
            _, mod = resolve_module(model, name)
            if capture == "input":
                def pre_hook(_m, args, _name=name):
                    store[_name] = args[0].detach()
                handles.append(mod.register_forward_pre_hook(pre_hook))
            else:
                def hook(_m, _args, out, _name=name):
                    store[_name] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
                handles.append(mod.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def stream_features(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    modules: Sequence[str | None] | str | None = None,
    *,
    capture: str = "input",
    mode: str = "eval",
    params: Mapping[str, Tensor] | None = None,
    next_token: bool = False,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Yield ``({module: H_b (n_b, p) float64}, labels (n_b,))`` per batch: one forward for all modules.

    ``modules``: a name, a list of names, or None (the last ``nn.Linear``). ``params`` (optional)
    are evaluated with ``functional_call``; the model's train/eval flag is ``mode`` during the
    pass and restored afterwards. Sequence features give token rows (``_rows``); ``next_token``
    pairs each with the next token's label (``next_token_labels``).
    """
    if isinstance(modules, str) or modules is None:
        modules = [modules]
    names = [resolve_module(model, m)[0] for m in modules]
    with torch.no_grad(), evaluation_mode(model, mode), capture_activations(model, names, capture) as store:
        for x, y in batches:
            store.clear()
            model_outputs(model, x, params=None if params is None else dict(params))
            missing = [n for n in names if n not in store]
            if missing:
                raise ValueError(f"module(s) {missing} did not run in the forward pass; pick modules the model calls")
            labels = None
            out = {}
            for n in names:
                rows, row_labels = _rows(store[n], y, next_token)
                rows = rows.to(torch.float64)
                labels = row_labels if labels is None else labels
                if rows.shape[0] != labels.shape[0]:
                    raise ValueError(
                        f"module {n!r} gives {rows.shape[0]} feature rows for {labels.shape[0]} labels; "
                        "pick a module whose activation has one row per example"
                    )
                out[n] = rows
            yield out, labels


def collect_features(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    module: str | None = None,
    mode: str = "eval",
    *,
    capture: str = "input",
    params: Mapping[str, Tensor] | None = None,
    next_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(H (N, p) float64, y (N,))``: one module's activations over all batches (default: last-linear input)."""
    hs, ys = [], []
    for feats, labels in stream_features(model, batches, module, capture=capture, mode=mode, params=params,
                                         next_token=next_token):
        (h,) = feats.values()
        hs.append(h)
        ys.append(labels)
    return torch.cat(hs), torch.cat(ys)


class ClassStatistics:
    """Per-class counts, means μ_c, global mean μ_G, Σ_W and Σ_B, accumulated in float64.

    Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ with μ_G the
    sample-weighted mean and C the number of classes present. Two passes over the same stream:
    ``update_means`` for every batch, then ``update_scatter`` for every batch (it needs the final
    means). The second pass also counts nearest-class-centre (NCC) hits, and, given a classifier,
    how often NCC and the classifier disagree (NC4).

    Example:
        >>> H = torch.tensor([[0.0], [2.0], [10.0]]); y = torch.tensor([0, 0, 1])
        >>> s = ClassStatistics(); s.update_means(H, y); s.update_scatter(H, y)
        >>> s.means.squeeze(1).tolist(), s.sigma_w.item()
        ([1.0, 10.0], 0.6666666666666666)
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self._sums: Tensor | None = None  # (C, p)
        self._counts: Tensor | None = None  # (C,)
        self._means: Tensor | None = None
        self._scatter: Tensor | None = None  # (p, p)
        self._class_sq: Tensor | None = None  # (C,) Σ_{i∈c} ||h_i − μ_c||²
        self.second_pass_count = 0
        self.ncc_correct = 0
        self.ncc_correct_per_class: Tensor | None = None
        self.ncc_mismatch = 0
        self.classifier_correct = 0

    # ---- pass 1 ---------------------------------------------------------------------------------
    def update_means(self, h: Tensor, y: Tensor) -> None:
        """Add a batch of features (n, p) and integer labels (n,) to the class sums."""
        if self._means is not None:
            raise ValueError("update_means after update_scatter: start a new ClassStatistics for new data")
        h = h.detach().to(torch.float64).reshape(h.shape[0], -1)
        y = y.reshape(-1).long()
        if h.shape[0] != y.shape[0]:
            raise ValueError(f"{h.shape[0]} feature rows but {y.shape[0]} labels")
        if y.numel() and int(y.min()) < 0:
            raise ValueError("class labels must be non-negative integers")
        need = max(int(y.max()) + 1 if y.numel() else 0, self.num_classes or 0)
        if self._sums is None:
            self._sums = h.new_zeros(need, h.shape[1])
            self._counts = h.new_zeros(need)
        elif self._sums.shape[1] != h.shape[1]:
            raise ValueError(f"feature width changed from {self._sums.shape[1]} to {h.shape[1]}")
        if need > self._sums.shape[0]:  # a class seen for the first time: grow
            grow = need - self._sums.shape[0]
            self._sums = torch.cat([self._sums, h.new_zeros(grow, h.shape[1])])
            self._counts = torch.cat([self._counts, h.new_zeros(grow)])
        self._sums.index_add_(0, y, h)
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    # ---- derived after pass 1 -------------------------------------------------------------------
    def _require_means(self) -> None:
        if self._sums is None:
            raise ValueError("no data: call update_means on every batch first")

    @property
    def counts(self) -> Tensor:
        """Examples per class (C_total,), float64 (zero for a label never seen)."""
        self._require_means()
        return self._counts.clone()

    @property
    def present(self) -> Tensor:
        """Boolean mask of the classes with at least one example."""
        return self.counts > 0

    @property
    def total(self) -> int:
        """N, the number of examples."""
        return int(self.counts.sum())

    @property
    def means(self) -> Tensor:
        """Class means μ_c (C_present, p), rows in label order of the present classes."""
        self._require_means()
        keep = self._counts > 0
        return self._sums[keep] / self._counts[keep, None]

    @property
    def global_mean(self) -> Tensor:
        """μ_G, the sample-weighted mean of all features (p,)."""
        self._require_means()
        return self._sums.sum(0) / self._counts.sum()

    @property
    def sigma_b(self) -> Tensor:
        """Between-class covariance Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ (p, p)."""
        m = self.means - self.global_mean
        return m.T @ m / m.shape[0]

    # ---- pass 2 ---------------------------------------------------------------------------------
    def update_scatter(self, h: Tensor, y: Tensor, logits: Tensor | None = None) -> None:
        """Add a batch to Σ_W (needs the final means) and count NCC hits; ``logits`` (n, C) count NC4."""
        self._require_means()
        if self._means is None:
            self._means = self.means
            self._labels = torch.nonzero(self._counts > 0).squeeze(1)  # present class labels
            p = self._sums.shape[1]
            self._scatter = self._sums.new_zeros(p, p)
            self._class_sq = self._sums.new_zeros(self._sums.shape[0])
            self.ncc_correct_per_class = self._sums.new_zeros(self._sums.shape[0])
        h = h.detach().to(torch.float64).reshape(h.shape[0], -1)
        y = y.reshape(-1).long()
        full_means = self._sums / self._counts.clamp(min=1)[:, None]
        dev = h - full_means[y]  # (n, p)
        self._scatter += dev.T @ dev
        self._class_sq.index_add_(0, y, (dev**2).sum(1))
        ncc = self._labels[torch.cdist(h, self._means).argmin(1)]
        hit = (ncc == y).to(torch.float64)
        self.ncc_correct += int(hit.sum())
        self.ncc_correct_per_class.index_add_(0, y, hit)
        if logits is not None:
            pred = logits.argmax(1)
            self.ncc_mismatch += int((pred != ncc).sum())
            self.classifier_correct += int((pred == y).sum())
        self.second_pass_count += int(y.shape[0])

    def _require_scatter(self) -> None:
        if self._scatter is None:
            raise ValueError("call update_scatter on every batch (second pass) first")
        if self.second_pass_count != self.total:
            raise ValueError(
                f"the second pass saw {self.second_pass_count} examples, the first {self.total}: stream the same data twice"
            )

    @property
    def sigma_w(self) -> Tensor:
        """Within-class covariance Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ (p, p)."""
        self._require_scatter()
        return self._scatter / self.total

    @property
    def class_variances(self) -> Tensor:
        """σ_c² = (1/n_c) Σ_{i∈c} ||h_i − μ_c||² = tr Σ_c for the present classes (C_present,)."""
        self._require_scatter()
        keep = self._counts > 0
        return self._class_sq[keep] / self._counts[keep]

    @property
    def ncc_accuracy(self) -> float:
        """Fraction of examples whose nearest class mean is their own class."""
        self._require_scatter()
        return self.ncc_correct / self.total

    @property
    def ncc_mismatch_rate(self) -> float:
        """NC4: fraction of examples where argmax_c(w_cᵀh + b_c) ≠ argmin_c ||h − μ_c||."""
        self._require_scatter()
        return self.ncc_mismatch / self.total


def model_params(
    model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, Tensor] | None:
    """Parameters and buffers moved to ``device``/cast to ``dtype`` for ``functional_call``; None if as is.

    Only floating tensors are cast; the model itself is not touched.
    """
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    if all((device is None or t.device == torch.device(device)) and (dtype is None or not t.is_floating_point()
           or t.dtype == dtype) for t in tensors.values()):
        return None
    return {
        k: t.detach().to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        for k, t in tensors.items()
    }


class Rebatched:
    """Re-iterable view of ``batches``: the first ``limit`` examples, regrouped into ``batch_size`` rows.

    Inputs may be tensors or dicts; examples of unequal shapes come out as one batch per shape (``take``).

    Inputs are moved to ``device`` and floating inputs cast to ``dtype`` batch by batch, so only one
    batch is converted at a time. None keeps the original grouping / all examples / device / dtype.
    """

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], batch_size: int | None = None,
                 limit: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        if limit is not None and limit <= 0:
            raise ValueError(f"max_examples must be a positive integer or None, got {limit}")
        self.batches, self.batch_size, self.limit = batches, batch_size, limit
        self.device, self.dtype = device, dtype

    def _limited(self) -> Iterator[tuple[Tensor, Tensor]]:
        seen = 0
        for x, y in self.batches:
            n = batch_length(x)
            if self.limit is not None and seen + n > self.limit:
                n = self.limit - seen
                x, y = map_inputs(lambda t, n=n: t[:n], x), y[:n]
            if n:
                yield x, y
            seen += n
            if self.limit is not None and seen >= self.limit:
                return

    def _grouped(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.batch_size is None:
            yield from self._limited()
            return
        held_batches: list = []
        held = 0
        for x, y in self._limited():
            held_batches.append((x, y))
            held += batch_length(x)
            while held >= self.batch_size:  # examples of unequal shapes come out as one batch per shape (take)
                yield from take(held_batches, torch.arange(self.batch_size))
                held_batches = take(held_batches, torch.arange(self.batch_size, held))
                held -= self.batch_size
        if held:
            yield from take(held_batches, torch.arange(held))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        def move(t: Tensor) -> Tensor:
            if self.dtype is not None and t.is_floating_point():
                t = t.to(self.dtype)
            return t.to(self.device) if self.device is not None else t

        for x, y in self._grouped():
            yield map_inputs(move, x), (y.to(self.device) if self.device is not None else y)
