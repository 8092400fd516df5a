"""Which parameters a curvature operator acts on: all, a list of names, a regex, a layer block.

θ is the concatenation of the selected ``model.named_parameters()`` in model order;
parameters that are not selected stay fixed at the model's values.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import Tensor, nn

from lossatlas.checks import check_choice

BLOCKINGS: tuple[str, ...] = ("layer", "parameter")


def parameter_blocks(model: nn.Module, by: str = "layer") -> dict[str, list[str]]:
    """Trainable parameter names grouped into blocks, in model order.

    Args:
        model: the network.
        by: ``"layer"``: one block per module that owns parameters directly
            (``"fc1" -> ["fc1.weight", "fc1.bias"]``; the root module's own parameters are the
            block ``""``); ``"parameter"``: one block per parameter tensor.

    Returns:
        block name -> list of parameter names (only parameters with ``requires_grad``).

    >>> parameter_blocks(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    check_choice("blocking by", by, BLOCKINGS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    blocks: dict[str, list[str]] = {}
    if by == "parameter":
        return {name: [name] for name, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        names = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if n in trainable]
        if names:
            blocks[mod_name] = names
    return blocks


def select_parameters(model: nn.Module, pattern: str) -> list[str]:
    """Names of the trainable parameters that ``re.search(pattern, name)`` matches, in model order.

    Example:
        >>> select_parameters(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), r"weight$")
        ['0.weight', '2.weight']
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"params={pattern!r} is not a valid regular expression ({exc})") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad and regex.search(n)]
    if not names:
        raise ValueError(
            f"params={pattern!r} matches no trainable parameter; names look like "
            f"{', '.join(n for n, _ in list(model.named_parameters())[:4])}"
        )
    return names


def resolve_params(
    model: nn.Module, params: None | str | Sequence[str] | Mapping[str, Tensor]
) -> tuple[list[str], dict[str, Tensor] | None]:
    """The selected parameter names (model order) and, for a dict, the point it gives.

    ``None``: every parameter with ``requires_grad``; a ``str``: a regex (see
    ``select_parameters``); a list of names; a dict name -> Tensor: those parameters, taken at
    the given values instead of the model's.

    Example:
        >>> import torch
        >>> mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> resolve_params(mlp, ["2.bias", "0.weight"])
        (['0.weight', '2.bias'], None)
        >>> resolve_params(mlp, {"2.bias": torch.zeros(1)})
        (['2.bias'], {'2.bias': tensor([0.])})
    """
    all_named = dict(model.named_parameters())
    order = list(all_named)
    if params is None:
        names = [n for n, p in all_named.items() if p.requires_grad]
        if not names:
            raise ValueError("the model has no parameter with requires_grad=True; pass params=[names]")
        return names, None
    if isinstance(params, str):
        return select_parameters(model, params), None
    if isinstance(params, Mapping):
        _check_known(params.keys(), order)
        for name, value in params.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"params[{name!r}] must be a Tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(all_named[name].shape):
                raise ValueError(
                    f"params[{name!r}] has shape {tuple(value.shape)}, the model's parameter has "
                    f"{tuple(all_named[name].shape)}"
                )
        names = [n for n in order if n in params]
        return names, {n: params[n] for n in names}
    if isinstance(params, Sequence):
        chosen = list(params)
        if not chosen:
            raise ValueError("params is an empty list; give at least one parameter name or None for all")
        _check_known(chosen, order)
        return [n for n in order if n in set(chosen)], None
    raise ValueError(
        f"params must be None, a regex string, a list of names or a dict name->Tensor, got {type(params).__name__}"
    )


def _check_known(names, order: list[str]) -> None:
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ValueError(
            f"unknown parameter name(s) {', '.join(map(repr, unknown))}; the model has "
            f"{', '.join(order[:8])}{', ...' if len(order) > 8 else ''}"
        )
