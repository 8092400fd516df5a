"""Call a model on a batch's inputs and take the tensor a loss is computed from.

Inputs are a tensor (``model(x)``) or a dict of tensors (``model(**x)``, the Hugging Face
convention). The model may return a tensor, a tuple or list (its first element), or a mapping such
as a transformers ``ModelOutput`` (its ``output`` entry, "logits" by default, else its only tensor).

Which entry is chosen for a model (``lossatlas <probe> --output start_logits``, ``output=`` in
``lossatlas.api``) is attached to the module by ``use_output`` and read by ``model_outputs`` whenever
no ``output`` is passed, so every probe uses it without being told. The loss ``"model"`` (the
model's own ``outputs.loss``) uses the output ``"loss"``: a 0-d tensor, computed by the model from
the ``labels`` its inputs keep.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from lossatlas.errors import UserError

OUTPUT = "logits"
LOSS_OUTPUT = "loss"  # the entry of a Hugging Face ModelOutput that holds the model's own loss
_ATTR = "_lossatlas_output"  # the private attribute use_output sets on a module


def check_output_name(name: Any) -> str:
    """``name`` if it can name a model output (a non-empty identifier-like string), else UserError."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace(".", "").isalnum():
        raise UserError(f"output must name one of the model's outputs such as 'logits' or 'start_logits', got {name!r}")
    return name


def use_output(model: nn.Module, name: str | None) -> nn.Module:
    """Make ``name`` the output ``model_outputs`` takes from ``model`` (None: back to "logits"); returns ``model``.

    Stored as a private attribute of the module, so it travels with ``copy.deepcopy`` of the model.
    """
    if name is None or name == OUTPUT:
        model.__dict__.pop(_ATTR, None)
    else:
        object.__setattr__(model, _ATTR, check_output_name(name))
    return model


def output_of(model: nn.Module) -> str:
    """The output ``model_outputs`` takes from ``model``: the one ``use_output`` set, else "logits"."""
    return getattr(model, _ATTR, OUTPUT)


@contextlib.contextmanager
def using_output(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """``use_output(model, name)`` for the block only: the module's own choice is restored afterwards."""
    before = model.__dict__.get(_ATTR)
    use_output(model, name)
    try:
        yield model
    finally:
        use_output(model, before)


def select_output(raw: Any, output: str = OUTPUT) -> Tensor:
    """The tensor a loss uses from whatever the model returned (see the module docstring)."""
    if output == LOSS_OUTPUT:  # the model's own loss: only a mapping's "loss" entry (or attribute) is it
        loss = raw.get(LOSS_OUTPUT) if isinstance(raw, Mapping) else getattr(raw, LOSS_OUTPUT, None)
        if not isinstance(loss, Tensor):
            raise UserError(
                f"the model returned {type(raw).__name__} without a 'loss' although --loss model asks for its own loss; "
                "give dict batches with 'labels' (the model computes its loss from them), or use --loss causal_lm "
                "or cross_entropy"
            )
        return loss
    if isinstance(raw, Tensor):
        if output != OUTPUT:
            raise UserError(f"the model returned a tensor, so it has no output {output!r}; leave --output out")
        return raw
    if isinstance(raw, Mapping):
        if output in raw and isinstance(raw[output], Tensor):
            return raw[output]
        if output != OUTPUT:  # a named output must exist: never another tensor in its place
            raise UserError(
                f"the model returned {type(raw).__name__} with keys {sorted(map(str, raw))} and no tensor {output!r}; "
                "pass --output with one of those keys"
            )
        tensors = [v for v in raw.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise UserError(
            f"the model returned {type(raw).__name__} with keys {sorted(map(str, raw))} and no tensor {output!r}; "
            "return the logits, or name the output to use"
        )
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
        if output != OUTPUT:  # a tuple's entries have no names
            raise UserError(f"the model returned a {type(raw).__name__}, whose entries have no names, so no output "
                            f"{output!r}; return a dict or ModelOutput (return_dict=True), or leave --output out")
        return raw[0]
    raise UserError(
        f"the model returned {type(raw).__name__}, not a tensor, a tuple starting with the logits or a dict "
        f"with {output!r}; make its forward return the logits"
    )


def model_outputs(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    *,
    params: Mapping[str, Tensor] | tuple[Mapping[str, Tensor], ...] | None = None,
    output: str | None = None,
) -> Tensor:
    """f(inputs; θ): ``model(x)`` or ``model(**x)``, by ``functional_call`` when ``params`` are given.

    ``params``: a dict (or a tuple of dicts) of parameters and buffers as ``torch.func.functional_call``
    takes them; None calls the module with its own. ``output``: the entry to return (None: the one
    ``use_output`` attached to ``model``, "logits" by default). Returns the output tensor (``select_output``).
    """
    output = output_of(model) if output is None else output
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = (inputs,), None
    if params is None:
        raw = model(*args, **(kwargs or {}))
    else:
        raw = functional_call(model, params, args, kwargs)
    return select_output(raw, output)
