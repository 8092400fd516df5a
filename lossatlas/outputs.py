"""Call a model on a batch's inputs and take the tensor a loss is computed from.

Inputs are a tensor (``model(x)``) or a dict of tensors (``model(**x)``, the Hugging Face
convention). The model may return a tensor, a tuple or list (its first element), or a mapping such
as a transformers ``ModelOutput`` (its ``output`` entry, "logits" by default, else its only tensor).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from lossatlas.errors import UserError

OUTPUT = "logits"


def select_output(raw: Any, output: str = OUTPUT) -> Tensor:
    """The tensor a loss uses from whatever the model returned (see the module docstring)."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, Mapping):
        if output in raw and isinstance(raw[output], Tensor):
            return raw[output]
        tensors = [v for v in raw.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise UserError(
            f"the model returned {type(raw).__name__} with keys {sorted(map(str, raw))} and no tensor {output!r}; "
            "return the logits, or name the output to use"
        )
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
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
    output: str = OUTPUT,
) -> Tensor:
    """f(inputs; θ): ``model(x)`` or ``model(**x)``, by ``functional_call`` when ``params`` are given.

    ``params``: a dict (or a tuple of dicts) of parameters and buffers as ``torch.func.functional_call``
    takes them; None calls the module with its own. Returns the output tensor (``select_output``).
    """
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = (inputs,), None
    if params is None:
        raw = model(*args, **(kwargs or {}))
    else:
        raw = functional_call(model, params, args, kwargs)
    return select_output(raw, output)
