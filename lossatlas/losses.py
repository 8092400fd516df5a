"""Losses by name, written in plain tensor ops so that every autodiff path works.

``F.mse_loss`` breaks forward-over-reverse HVPs in torch 2.13 ("ZeroTensors are immutable"),
so the MSE losses here are written as ``((out - y) ** 2)``.

Conventions: every loss is a mean over *examples* (tokens for sequence models).
- ``cross_entropy``: softmax cross-entropy; logits (N, C) with labels (N,), or (B, T, V) with (B, T).
- ``mse``: ``nn.MSELoss()`` convention, mean over all N·C entries.
- ``half_sse``: Cohen et al.'s ``SquaredLoss``, ½ Σ_c (f_c − y_c)² per example, mean over examples
  (its Hessian is C/2 times the ``mse`` one).
- ``causal_lm``: next-token cross-entropy of logits (B, T, V)[:, :-1] against labels (B, T)[:, 1:];
  labels -100 are ignored (``as_batches`` gives padding that label), and a batch's mean is over
  its counted tokens, so Σ_b (n_b/N) L_b is the mean over every counted token of the data.
- ``model``: the model's own loss, ``outputs.loss`` of ``model(**inputs, labels=labels)`` (dict
  batches keep their ``labels`` in the inputs, ``as_batches(keep_labels=True)``, and the model's
  output "loss" is taken, ``lossatlas.outputs``). A batch's weight n_b counts what a Hugging Face
  loss averages: the labels other than -100 for integer (B, T, ...) labels, where a causal language
  model (``shifts_labels``: a class whose name ends in "ForCausalLM", or a transformers causal-LM
  class such as GPT2LMHeadModel) counts the shifted labels y[:, 1:] only (``model_loss_batches``
  marks y[:, 0] as -100 in the targets, never in the model's own labels); examples for 1-D or float
  labels. With a model that means its terms this way (HF's causal LM loss does) Σ_b (n_b/N) L_b is
  the same mean over every counted term as ``causal_lm``. It has no per-example terms or output
  Hessian: the GGN, the Fisher matrices, per-example losses and accuracy are unavailable
  (``require_output_loss`` refuses them).
For the MSE losses, integer class labels are one-hot encoded against the output width.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.outputs import LOSS_OUTPUT, OUTPUT, check_output_name

LossName = Literal["cross_entropy", "mse", "half_sse", "causal_lm", "model"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "half_sse", "causal_lm", "model")
MODEL_LOSS = "model"  # the model's own outputs.loss
OUTPUT_LOSSES: tuple[str, ...] = tuple(n for n in LOSSES if n != MODEL_LOSS)  # losses of the model's outputs
IGNORE_INDEX = -100


def resolve_loss_and_output(run_loss: str | None, loss: str | None, output: str | None, *,
                            prefix: str = "") -> tuple[str, str]:
    """(loss, output) of a run: ``loss`` or the run's own (default "cross_entropy"), and the output to use.

    The loss "model" uses the model's output "loss" (an ``output`` other than that is refused);
    any other loss uses ``output`` (default "logits"). UserError for an unknown loss or output name.
    """
    name = loss if loss is not None else (run_loss or "cross_entropy")
    if is_closure(name):  # a closure runs the model itself: any output is its own business
        if output is not None:
            check_output_name(output)
        return name, output or OUTPUT
    check_choice("loss", name, LOSSES, prefix=prefix, error=UserError)
    if output is not None:
        check_output_name(output)
    if name == MODEL_LOSS:
        if output not in (None, OUTPUT, LOSS_OUTPUT):
            raise UserError(f"{prefix}--output {output} does not apply with --loss model, which uses the model's "
                            "own 'loss' output; leave --output out, or pick --loss causal_lm or cross_entropy")
        return name, LOSS_OUTPUT
    return name, output or OUTPUT


def model_loss_precision(model: nn.Module, batches: Sequence[tuple[Any, Tensor]]) -> str | None:
    """A one-line warning when ``model``'s own loss is computed in a lower precision than its parameters, else None.

    transformers' causal-LM loss casts the logits with ``.float()`` (float32) before its cross-entropy, so a
    float64 model's own loss carries float32 rounding (relative ~1e-7), which every quantity of the loss
    "model" inherits; ``causal_lm`` computes the same mean in the model's dtype. One forward pass of one
    example, without gradients and with the random state restored.
    """
    from lossatlas.batches import map_inputs
    from lossatlas.outputs import model_outputs

    want = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if want is None or not batches:
        return None
    x = map_inputs(lambda t: t[:1], batches[0][0])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        got = model_outputs(model, x, output=LOSS_OUTPUT).dtype
    if not got.is_floating_point or torch.finfo(got).eps <= torch.finfo(want).eps:
        return None
    return (f"the model computes its own loss in {str(got).replace('torch.', '')} although it runs in "
            f"{str(want).replace('torch.', '')} (transformers' causal-LM loss casts the logits with .float()), so "
            "--loss model quantities carry that rounding; use --loss causal_lm for the same loss in full precision")


def require_output_loss(name: str, what: str, fix: str = "use --loss causal_lm or --loss cross_entropy") -> str:
    """``name`` unless it is ``"model"``; ValueError saying ``what`` needs a loss of the model's outputs.

    The model's own loss is one scalar per batch: it has no per-example terms, output Hessian or
    predictions, which the GGN, the Fisher matrices, per-example losses and accuracy need.
    """
    if name == MODEL_LOSS:
        raise ValueError(f"{what} needs a loss of the model's outputs (per-example terms or its output Hessian), "
                         f"which --loss model (the model's own scalar loss) does not give; {fix}")
    if is_closure(name):
        raise ValueError(f"{what} needs a loss of the model's outputs (per-example terms or its output Hessian), "
                         f"which the closure loss {name} (a scalar of the model and batch) does not give; use "
                         "curvature='hessian' or a loss name such as cross_entropy")
    return name


def shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own loss is a causal LM's: it scores logits[:, t] against labels[:, t + 1].

    True for a class whose name ends in "ForCausalLM" and for the causal-LM classes transformers maps
    (e.g. GPT2LMHeadModel); then the labels at position 0 are never counted.
    """
    cls = type(model)
    if cls.__name__.endswith("ForCausalLM"):
        return True
    if not cls.__module__.startswith("transformers."):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - an old transformers
        return False
    return cls.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def model_loss_batches(model: nn.Module, batches: Sequence[tuple[Any, Tensor]]) -> list[tuple[Any, Tensor]]:
    """The batches for the loss ``"model"``: targets marked as ``model``'s own loss counts them.

    For a causal LM (``shifts_labels``) the targets' position 0 becomes -100 (a copy: the labels in the
    inputs, which the model reads, are left as they are), so ``batch_count("model", y)`` counts the
    shifted labels y[:, 1:] other than -100, as Hugging Face's causal-LM loss averages them.
    """
    if not shifts_labels(model):
        return list(batches)
    out = []
    for x, y in batches:
        if y.ndim >= 2 and not y.is_floating_point():
            y = y.clone()
            y[:, 0] = IGNORE_INDEX
        out.append((x, y))
    return out


def check_loss_name(name: str) -> str:
    """Return ``name`` if it is a known loss or a closure loss (``LossClosure``), else raise ValueError naming the choices."""
    if is_closure(name):
        return name
    return check_choice("loss", name, LOSSES)


def _flatten(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, V) logits with (B, T) targets become (B·T, V) and (B·T,)."""
    if out.ndim == 3 and y.ndim == 2:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return out, y


def _as_targets(out: Tensor, y: Tensor) -> Tensor:
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and out.ndim == y.ndim + 1:
        return F.one_hot(y.long(), out.shape[-1]).to(out.dtype)
    return y.to(out.dtype).reshape(out.shape)


def _next_token(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (B, T-1, V) of the positions that have a next token, their labels (clamped) and 0/1 mask."""
    if out.ndim != 3 or y.ndim != 2 or out.shape[:2] != y.shape:
        raise ValueError(
            f"causal_lm needs logits (B, T, V) and labels (B, T), got {tuple(out.shape)} and {tuple(y.shape)}"
        )
    labels = y[:, 1:].long()
    mask = labels != IGNORE_INDEX
    return out[:, :-1], labels.clamp(min=0), mask


def per_example_loss(name: str, out: Tensor, y: Tensor) -> Tensor:
    """ℓ_i for every example (every token for sequence models), shape (n,).

    ``causal_lm``: the B·(T−1) next-token terms, 0 where the label is ignored. ``model``: ValueError
    (the model's own loss has no per-example terms).
    """
    check_loss_name(name)
    require_output_loss(name, "per-example losses")
    if name == "causal_lm":
        logits, labels, mask = _next_token(out, y)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return ((torch.logsumexp(logits, dim=-1) - picked) * mask.to(logits.dtype)).reshape(-1)
    out, y = _flatten(out, y)
    if name == "cross_entropy":
        return F.cross_entropy(out, y.long(), reduction="none")
    target = _as_targets(out, y)
    sq = (out - target) ** 2
    sq = sq.reshape(sq.shape[0], -1)
    if name == "mse":
        return sq.mean(dim=1)
    return 0.5 * sq.sum(dim=1)  # half_sse


def batch_loss(name: str, out: Tensor, y: Tensor) -> Tensor:
    """The batch's mean loss (what a training step would back-propagate): mean over its counted terms.

    ``model``: ``out`` is the model's own loss (0-d), returned as it is. A closure loss has no outputs to
    score: ValueError (evaluate it with ``closure_value``).
    """
    if is_closure(name):
        raise ValueError(f"the closure loss {name} is evaluated on the model and batch, not on outputs; use "
                         "lossatlas.losses.closure_value(loss, model, params, batch)")
    if name == MODEL_LOSS:
        if out.ndim != 0:
            raise ValueError(f"loss 'model' takes the model's own loss, a scalar, but the model gave outputs of shape "
                             f"{tuple(out.shape)}; attach its 'loss' output (lossatlas.outputs.use_output(model, "
                             "'loss')) and keep the labels in its inputs (as_batches(..., keep_labels=True))")
        return out
    if name == "causal_lm":  # ignored tokens are zeros in the sum and absent from the count
        counted = (y[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return per_example_loss(name, out, y).sum() / counted
    return per_example_loss(name, out, y).mean()


def batch_count(name: str, y: Tensor) -> int:
    """How many terms the batch mean averages: examples, tokens for (B, T) class labels, or counted next tokens.

    ``causal_lm``: the labels y[:, 1:] other than -100. Integer (B, T) labels under any other loss: B·T tokens.
    ``model``: integer labels of two or more axes count their entries other than -100 (a causal LM's
    y[:, 0] is marked -100 by ``model_loss_batches``); 1-D or float labels count examples.
    """
    if is_closure(name):  # the batch's size (a closure that returns (loss, count) counts itself)
        return int(y.shape[0]) if isinstance(y, Tensor) and y.ndim > 0 else 1
    if name == MODEL_LOSS:
        if y.ndim >= 2 and not y.is_floating_point():
            return int((y != IGNORE_INDEX).sum())
        return int(y.shape[0])
    if name == "causal_lm":
        return int((y[:, 1:] != IGNORE_INDEX).sum()) if y.ndim == 2 else 0
    if y.ndim == 2 and (name == "cross_entropy" or not y.is_floating_point()):
        return int(y.numel())
    return int(y.shape[0])


def batch_weights(name: str, batches: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
    """w_b = n_b / N for every batch, n_b = ``batch_count`` and N = Σ_b n_b (unequal last batch included)."""
    counts = [batch_count(name, y) for _, y in batches]
    total = sum(counts)
    if total == 0:
        raise ValueError("the data holds no examples; give at least one (inputs, targets) batch with examples")
    return [c / total for c in counts]


def data_loss(
    name: str,
    forward: Callable[[Any], Tensor],
    batches: Sequence[tuple[Any, Tensor]],
    *,
    weights: Sequence[float] | None = None,
    on_outputs: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """The loss over a data set, L(θ) = Σ_b (n_b/N)·mean_b(θ), the example-weighted mean of the batch means.

    ``forward(x)`` gives the outputs at θ for a batch's inputs (``lossatlas.outputs.model_outputs``
    takes tensor or dict inputs); the caller sets the train/eval flag and grad mode;
    ``weights`` are ``batch_weights(name, batches)`` when not given; ``on_outputs(out, y)`` sees
    every batch's outputs (to count correct predictions in the same pass). A 0-d tensor in the
    outputs' dtype, differentiable when the forward pass is.
    """
    if not batches:
        raise ValueError("the data holds no batches; give at least one (inputs, targets) batch")
    weights = batch_weights(name, batches) if weights is None else weights
    total: Tensor | float = 0.0
    for (x, y), w in zip(batches, weights, strict=True):  # caller-given weights: one per batch
        out = forward(x)
        if on_outputs is not None:
            on_outputs(out, y)
        total = total + batch_loss(name, out, y) * w
    return total  # type: ignore[return-value]


def output_hessian_product(name: str, out: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """(∂²ℓ_i/∂f²) u_i for every example, the middle factor of the GGN.

    G v = (1/N) Σ_i J_iᵀ H_out,i J_i v with J_i = ∂f(x_i)/∂θ and H_out,i = ∂²ℓ_i/∂f².

    cross_entropy: (diag(p) − p pᵀ) u; mse: (2/C) u; half_sse: u. Shapes follow ``out``.
    causal_lm: the cross_entropy product at the positions with a counted next token, 0 elsewhere.
    model: ValueError (the model's own loss has no output Hessian).
    """
    check_loss_name(name)
    require_output_loss(name, "the output Hessian (GGN, Fisher)")
    if name == "causal_lm":
        _, _, mask = _next_token(out, y)
        keep = torch.zeros(out.shape[:2], dtype=out.dtype, device=out.device)
        keep[:, :-1] = mask.to(out.dtype)
        p = torch.softmax(out, dim=-1)
        return (p * u - p * (p * u).sum(dim=-1, keepdim=True)) * keep.unsqueeze(-1)
    if name == "cross_entropy":
        p = torch.softmax(out, dim=-1)
        return p * u - p * (p * u).sum(dim=-1, keepdim=True)
    if name == "mse":
        width = out[0].numel() if out.ndim > 1 else 1
        return (2.0 / width) * u
    return u  # half_sse


def correct_count(out: Tensor, y: Tensor, loss: str | None = None) -> int:
    """How many argmax predictions equal the label (classification and next-token).

    ``loss="causal_lm"``: argmax of logits[:, t] against the counted labels[:, t + 1]. ``loss="model"``:
    ValueError (the outputs are the loss, no prediction; see ``accuracy_available``).
    """
    require_output_loss(loss or "", "accuracy")
    if loss == "causal_lm":
        logits, labels, mask = _next_token(out, y)
        return int(((logits.argmax(dim=-1) == labels) & mask).sum())
    out, y = _flatten(out, y)
    if out.ndim != 2:
        return 0
    labels = y.argmax(dim=-1) if y.ndim == 2 and y.is_floating_point() else y.long()
    return int((out.argmax(dim=-1) == labels).sum())


def accuracy_available(loss: str | None) -> bool:
    """Whether the outputs under ``loss`` are predictions that ``correct_count`` can score (not for ``model``)."""
    return loss != MODEL_LOSS and not is_closure(loss)


# ----------------------------------------------------------------------------------------- closure losses
class LossClosure(str):
    """A user's loss ``loss_fn(model, batch) -> scalar`` (or ``(scalar, count)``), carried where a loss name goes.

    The value is a label ("closure:<name>") so that it passes as a loss name through every place that records
    one (result meta, results-file keys); ``fn`` is the callable. The closure is evaluated on the model itself,
    ``loss_fn(model, (inputs, targets))``, with the model's parameters swapped for the point's tensors
    (``closure_value``), so it may run any forward (PINN residuals through the inputs' gradient, contrastive
    pairs, regularisers on the parameters). The data-set loss is L(θ) = Σ_b w_b L_b(θ), w_b = n_b/N with n_b
    the batch's size (``closure_count``), or the count the closure returns as ``(loss, count)`` (a batch
    holding n_b counted terms). It has no outputs, predictions or output Hessian: the GGN, the Fisher
    matrices, per-example losses and accuracy refuse it (``require_output_loss``).
    """

    fn: Callable[[nn.Module, tuple[Any, Tensor]], Any]

    def __new__(cls, fn: Callable[..., Any], name: str | None = None) -> LossClosure:
        """Wrap ``fn``; ``name`` (default ``fn.__name__``) labels it as "closure:<name>"."""
        if isinstance(fn, LossClosure):
            return fn
        if not callable(fn):
            raise UserError(f"loss must be a loss name or a callable loss_fn(model, batch) -> scalar, got "
                            f"{type(fn).__name__}; give e.g. loss=lambda model, batch: ...")
        label = name or getattr(fn, "__name__", None) or type(fn).__name__
        obj = super().__new__(cls, f"closure:{label}")
        obj.fn = fn
        return obj

    def __reduce__(self):  # pickling keeps the callable (where it pickles)
        return (LossClosure, (self.fn, str(self)[len("closure:"):]))


def is_closure(loss: Any) -> bool:
    """Whether ``loss`` is a closure loss (a ``LossClosure``) rather than a loss name."""
    return isinstance(loss, LossClosure)


class _ClosureModule(nn.Module):
    """``loss_fn(model, batch)`` as a module whose only child is the model, for ``functional_call``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m = model
        self._fn = fn

    def forward(self, batch: tuple[Any, Tensor]) -> Any:
        return self._fn(self.m, batch)


def closure_count(x: Any, y: Any) -> int:
    """A batch's size: the targets' first axis, else the inputs' (what a closure loss is weighted by)."""
    if isinstance(y, Tensor) and y.ndim > 0:
        return int(y.shape[0])
    from lossatlas.batches import batch_length

    return int(batch_length(x))


def closure_value(loss: LossClosure, model: nn.Module, params: Mapping[str, Tensor] | None,
                  batch: tuple[Any, Tensor]) -> tuple[Tensor, int]:
    """(L_b(θ), n_b): the closure on one batch with the model's tensors replaced by ``params``, and its count.

    ``params`` (parameters and buffers by name; None: the model's own) go in through
    ``torch.func.functional_call`` on a wrapper module, so the user's module is never mutated and autograd
    (and ``torch.func``) reach them. A returned ``(loss, count)`` gives the count, else n_b is the batch's
    size (``closure_count``). ValueError naming the closure when it returns something other than a scalar.
    """
    raw, count = closure_call(loss, model, params, batch)
    n = closure_count(*batch) if count is None else count
    return raw, n


def closure_call(loss: LossClosure, model: nn.Module, params: Mapping[str, Tensor] | None,
                 batch: tuple[Any, Tensor]) -> tuple[Tensor, int | None]:
    """(L_b(θ), the count the closure returned or None): ``closure_value`` before the batch-size default."""
    wrapper = _ClosureModule(model, loss.fn)
    if params is None:
        raw = wrapper(batch)
    else:
        raw = torch.func.functional_call(wrapper, {f"m.{k}": v for k, v in params.items()}, (batch,))
    count = None
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        raw, count = raw
        count = int(count)
    if not isinstance(raw, Tensor):
        raw = torch.as_tensor(raw)
    if raw.numel() != 1:
        raise ValueError(f"loss {loss} returned a tensor of shape {tuple(raw.shape)}; a loss closure must return a "
                         "scalar (the batch's mean loss) or (scalar, count)")
    return raw.reshape(()), count


def closure_data_loss(loss: LossClosure, model: nn.Module, params: Mapping[str, Tensor] | None,
                      batches: Sequence[tuple[Any, Tensor]]) -> Tensor:
    """L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b for a closure loss (``closure_value`` gives L_b and n_b)."""
    values, counts = zip(*(closure_value(loss, model, params, b) for b in batches))
    total = sum(counts)
    if total <= 0:
        raise ValueError("the data holds no examples; give at least one (inputs, targets) batch with examples")
    return sum(v * (n / total) for v, n in zip(values, counts))  # type: ignore[return-value]


def resolve_loss_spec(value: Any, *, stored: bool = False, signatures: Any = None, source: str = "",
                      trust_factory: bool = False) -> Any:
    """A loss as given: a name stays a name, a callable becomes a ``LossClosure``, a factory spec is built.

    A spec ``{"factory": "pkg.module:fn", "kwargs": {...}}`` (a dict or its JSON text) names a factory that
    returns the callable loss_fn(model, batch); it is imported under the rules of model factories
    (``lossatlas.trust.require_trusted``): a spec the caller gives (``--loss`` on the command line) is trusted,
    one ``stored`` in a run file (``signatures``: the file's ``spec_signatures``, ``source``: its path) only when
    this user signed it or ``trust_factory``. UserError for a malformed spec or a factory that returns no callable.
    """
    if callable(value) and not isinstance(value, str):
        return LossClosure(value)
    if isinstance(value, LossClosure) or not (isinstance(value, Mapping) or
                                               (isinstance(value, str) and value.lstrip().startswith("{"))):
        return value
    from lossatlas import trust
    from lossatlas.models import registry

    spec = trust.stored_spec(value, signatures, role="loss", source=source) if stored else value
    if not trust.names_factory(spec):
        raise UserError(f"loss spec {value!r} names no factory; give a loss name ({', '.join(LOSSES)}) or "
                        '{"factory": "pkg.module:fn"} whose fn returns loss_fn(model, batch)')
    trust.require_trusted(spec, trust_factory=trust_factory)
    canon = registry.normalize_spec(spec)
    fn = registry._call(canon, {}, "loss", near=registry._source_folder(spec))
    if not callable(fn):
        raise UserError(f"loss factory {canon['factory']!r} returned {type(fn).__name__}; it must return a callable "
                        "loss_fn(model, batch) -> scalar")
    return LossClosure(fn, canon["factory"])
