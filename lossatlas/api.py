"""Plain functions for a notebook: one probe on a ``torch.nn.Module`` and its data, no file involved.

Each function builds the registered probe of the same measurement (``lossatlas <name>`` on the
command line) and runs it once, on the model as it is now, returning the probe's ``Result``:
``result.values[name]`` are numpy arrays (``result.scalar(name)`` for a single number),
``result.dims``/``result.coords`` label their axes and ``result.meta`` says how they were computed.

Data is an ``(inputs, targets)`` pair of tensors, a ``torch.utils.data.Dataset`` of pairs or of dicts, or an
iterable of ``(inputs, targets)`` batches or of dict batches with ``labels`` (a DataLoader, a list; see
``lossatlas.batches``). It is prepared as ``run_probe``
prepares a run's data (``RunOptions``): split into batches of ``batch_size`` (256) and cut to the
first ``max_examples`` (all); a probe with settings of those names (sharpness, neural collapse,
uniformity) gets them too. ``device`` (default: the model's) and ``dtype`` (e.g. ``torch.float64``)
apply to a copy of the model, never to the caller's module; the floating inputs are cast to the
dtype the model computes in. The loss over the data is the example-weighted mean of the batch
means, L = Σ_b (n_b/N) L_b, of ``"cross_entropy"``, ``"mse"``, ``"half_sse"`` or ``"causal_lm"`` (n_b: its
counted next tokens), or ``"model"``: the model's own ``outputs.loss`` computed from the ``labels`` that
dict batches then keep in their inputs (n_b: the labels it counts; see ``lossatlas.losses``). Data may
also be a single dict batch (``input_ids``, ``attention_mask``, ``labels``, ...). ``output`` names the model
output to use (default "logits", e.g. "start_logits"); the caller's module is left as it was.
Every result's meta records the "loss" and "output" used.

``loss`` may also be a callable ``loss_fn(model, batch) -> scalar`` (a closure: PINN residuals, contrastive
losses, regularisers; ``lossatlas.losses.LossClosure``), evaluated on the model with each point's tensors
and ``batch = (inputs, targets)``; the data-set loss is Σ_b n_b L_b / Σ_b n_b with n_b the batch's size, or
the count the closure returns as ``(loss, count)``. The Hessian and the landscape probes take it; the GGN,
the Fisher matrices and accuracy need a loss of the outputs and refuse it (accuracy is NaN).

The same numbers as ``run_probe`` on a run file holding this model, with the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from lossatlas.batches import as_batches, to_device
from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.losses import (
    MODEL_LOSS,
    model_loss_batches,
    model_loss_precision,
    resolve_loss_and_output,
    resolve_loss_spec,
)
from lossatlas.outputs import using_output
from lossatlas.probes import ProbeContext, Result, get_probe
from lossatlas.probes import registry as _registry  # noqa: F401  (every probe registers itself)

__all__ = ["loss", "hessian_spectrum", "sharpness", "surface", "interpolate", "neural_collapse", "uniformity"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- the functions
def loss(model: nn.Module, data: Any, loss: str = "cross_entropy", *, mode: str = "eval", batch_size: int | None = 256,
         max_examples: int | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, output: str | None = None) -> Result:
    """Loss L = Σ_b (n_b/N) L_b and accuracy (fraction of argmax predictions equal to the label) on the data.

    ``mode`` "eval" (default) or "train" sets the train/eval flag for the evaluation only.
    Values: "loss" and "accuracy" (0-d).

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.loss(model, (x, y))
    >>> abs(res.scalar("loss") - torch.nn.functional.cross_entropy(model(x), y).item()) < 1e-5
    True
    >>> 0.0 <= res.scalar("accuracy") <= 1.0
    True
    """
    return _run("loss", model, data, loss, dict(mode=mode), batch_size, max_examples, device, dtype, output=output)


def hessian_spectrum(model: nn.Module, data: Any, loss: str = "cross_entropy", *, top_k: int = 5, trace: bool = False,
                     density: bool = False, curvature: str = "hessian", batch_size: int | None = 256,
                     max_examples: int | None = None, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None, output: str | None = None, **settings: Any) -> Result:
    """Top eigenvalues, trace and spectral density of the curvature of the mean loss at the model's parameters.

    ``curvature``: "hessian" H = ∇²L(θ) (default), "ggn" G = (1/N) Σ_i J_iᵀ (∂²ℓ_i/∂f²) J_i (Martens 2014),
    "fisher" (labels sampled from the model) or "empirical_fisher" (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ.
    The ``top_k`` (5) largest eigenvalues come from Lanczos with full reorthogonalisation (Ghorbani,
    Krishnan & Xiao 2019), converged to a relative Ritz residual ``tol`` (1e-4); ``trace=True`` adds
    tr(H) by Hutch++ with 99 products (Meyer et al. 2021); ``density=True`` adds the stochastic
    Lanczos quadrature density (4 probes × 90 steps, Gaussian width σ² = 1e-5) and its outliers above
    the bulk edge (Sagun et al. 2017; Papyan 2020). ``settings`` are the other fields of the ``hessian``
    probe (``bottom_k``, ``blocks="layers"``, ``subset="class=3"``, ``data_ci``, ``seed``, ...; see
    ``lossatlas.probes.hessian.HessianProbe``). Values: "top_eigenvalues" (largest first) and
    "top_residuals"; "trace"/"trace_stderr"; "density" with "density_nodes"/"density_weights" and "outliers".

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.hessian_spectrum(model, (x, y), top_k=3, trace=True)
    >>> eigs = res.values["top_eigenvalues"]
    >>> eigs.shape, bool(eigs[0] >= eigs[1] >= eigs[2])
    ((3,), True)
    """
    probe = dict(top_k=top_k, trace=trace, density=density, curvature=curvature, **settings)
    return _run("hessian", model, data, loss, probe, batch_size, max_examples, device, dtype, output=output)


def sharpness(model: nn.Module, data: Any, loss: str = "cross_entropy", *, measures: tuple[str, ...] | None = None,
              rho: float = 0.05, batch_size: int | None = 256, max_examples: int | None = 1024,
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              output: str | None = None, **settings: Any) -> Result:
    """Sharpness measures of the model: how much the loss rises under a small weight perturbation.

    ``measures`` (default all): "grad_norm" ‖∇L‖; "fisher_rao" ‖θ‖_fr (Liang et al. 2019); "keskar"
    ε-sharpness in % (Keskar et al. 2017, ε 1e-3); "sam" one-step L(w + ρ ∇L/‖∇L‖) − L(w) with ρ =
    ``rho`` (0.05, Foret et al. 2021) and "adaptive_sam" (ASAM, ρ 0.5, Kwon et al. 2021);
    "m_sharpness" (chunks of m = 128), "worst_case"/"adaptive_worst_case" (Auto-PGD, 20 steps;
    Andriushchenko et al. 2023) and "average_case"/"adaptive_average_case" E_δ L(w + δ) − L(w).
    ``max_examples`` defaults to 1024, as the probe does. ``settings``: the other fields of the
    ``sharpness`` probe (``m``, ``steps``, ``num_samples``, ``lambda_max``, ``trace``, ``seed``, ...).
    Values: one 0-d value per measure, "<measure>_stderr" for the Monte-Carlo ones, and the clean "loss".

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.sharpness(model, (x, y), measures=("grad_norm", "sam"))
    >>> res.scalar("grad_norm") > 0, res.scalar("sam") > 0
    (True, True)
    """
    probe = dict(rho=rho, **settings)
    if measures is not None:
        probe["measures"] = (measures,) if isinstance(measures, str) else tuple(measures)
    return _run("sharpness", model, data, loss, probe, batch_size, max_examples, device, dtype, output=output)


def surface(model: nn.Module, data: Any, loss: str = "cross_entropy", *, dims: int = 2,
            xrange: tuple[float, float, int] = (-1.0, 1.0, 51), yrange: tuple[float, float, int] | None = None,
            directions: str = "random", batch_size: int | None = 256, max_examples: int | None = None,
            device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            output: str | None = None, metric_fns: Mapping[str, Callable[[Tensor, Tensor], float]] | None = None,
            **settings: Any) -> Result:
    """Loss and accuracy on a 1-D line or 2-D plane through the model's parameters, L(θ + x d₁ + y d₂).

    ``directions``: "random" Gaussian directions, filter-normalised so that each filter of d has
    the norm of the same filter of θ, biases and norm layers left at zero (Li et al. 2018, seed 123),
    "eigenvectors" (the top Hessian eigenvectors, unit norm) or "worst" (the directions of steepest loss
    increase within ``worst_radius``·‖θ‖, by ``worst_steps`` of projected gradient ascent; Chen et al. 2025).
    ``metric_fns``: {name: fn(outputs, targets) -> float}, each a batch mean averaged over the batches like
    the loss, added as values of their own. ``basin_tolerance`` (e.g. 0.1) adds "basin_radius" (direction,
    side): the largest step on each side before ``basin_metric`` ("loss"; "accuracy" worsens by falling)
    worsens by that much. ``xrange``/``yrange``: (min, max, num),
    default (−1, 1, 51) on both axes; ``dims=1`` gives a line. ``settings``: the other fields of the
    ``surface`` probe (``norm``, ``ignore``, ``bn="recompute"``, ``metrics``, ``seed``, ...).
    Values: "loss" and "accuracy" with dims ("y", "x") (("x",) for a line), coordinates "x" and "y",
    and the directions as "direction_x"/"direction_y".

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.surface(model, (x, y), xrange=(-1, 1, 5))
    >>> res.values["loss"].shape
    (5, 5)
    >>> bool(abs(res.values["loss"][2, 2] - lossatlas.loss(model, (x, y)).scalar("loss")) < 1e-5)   # the centre is θ
    True
    """
    if directions not in ("random", "eigenvectors", "worst"):
        raise UserError(f"surface: directions={directions!r} needs a run's other checkpoints; give 'random', "
                        "'eigenvectors' or 'worst' here, or run `lossatlas surface RUN` on a run file")
    probe = dict(dims=dims, xrange=tuple(xrange), yrange=None if yrange is None else tuple(yrange),
                 directions=directions, metric_fns=metric_fns, **settings)
    return _run("surface", model, data, loss, probe, batch_size, max_examples, device, dtype, output=output)


def interpolate(model_a: nn.Module, model_b: nn.Module, data: Any, loss: str = "cross_entropy", *,
                alphas: tuple[float, float, int] = (0.0, 1.0, 31), batch_size: int | None = 256,
                max_examples: int | None = None, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, output: str | None = None,
                metric_fns: Mapping[str, Callable[[Tensor, Tensor], float]] | None = None, **settings: Any) -> Result:
    """Loss and error on the straight line θ(α) = (1 − α) θ_a + α θ_b between two models, and its barriers.

    ``alphas``: (min, max, num), default (0, 1, 31). The loss barrier is max_α L(θ(α)) − ((1 − α) L(θ_a)
    + α L(θ_b)) (Frankle et al. 2020: linear mode connectivity); the error barriers likewise.
    ``settings``: the other fields of the ``interpolate`` probe (``dir_type`` "states" moves buffers too,
    ``bn="recompute"``, ``layerwise=True``, ``metrics`` by registered name). ``metric_fns``: {name: fn(outputs,
    targets) -> float}, batch means averaged like the loss, each a value along "alpha". ``model_b`` must have the architecture of ``model_a``.
    Values: "loss", "accuracy", "error" along "alpha"; "loss_barrier", "error_barrier" (over the chord
    between the endpoints), "loss_endpoint_mean_barrier", "error_endpoint_mean_barrier" (0-d).

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> def mlp(): return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> a, b = mlp(), mlp()
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.interpolate(a, b, (x, y), alphas=(0, 1, 11))
    >>> res.values["loss"].shape
    (11,)
    >>> bool(abs(res.values["loss"][-1] - lossatlas.loss(b, (x, y)).scalar("loss")) < 1e-5)   # α = 1 is model_b
    True
    """
    _check_model(model_b, "model_b")
    shapes_a = {k: tuple(v.shape) for k, v in model_a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        differ = sorted(k for k in set(shapes_a) | set(shapes_b) if shapes_a.get(k) != shapes_b.get(k))
        raise UserError(f"interpolate: model_b's tensors differ from model_a's ({', '.join(differ[:5])}); "
                        "give two models of the same architecture")
    probe = dict(to_step=1, alphas=tuple(alphas), metric_fns=metric_fns, **settings)

    def state_at(step: int) -> dict[str, Tensor]:
        """Model B, as step 1 of a two-checkpoint run (model A is step 0)."""
        return {k: v.detach() for k, v in model_b.state_dict().items()}

    return _run("interpolate", model_a, data, loss, probe, batch_size, max_examples, device, dtype,
                step=0, steps=(0, 1), state_at=state_at, output=output)


def neural_collapse(model: nn.Module, data: Any, *, module: str | None = None, loss: str = "cross_entropy",
                    batch_size: int | None = 256,
                    max_examples: int | None = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, output: str | None = None, **settings: Any) -> Result:
    """Neural collapse NC1–NC4 of the features entering ``module`` (default: the last nn.Linear, the classifier).

    With class means μ_c, global mean μ_G, within-class covariance Σ_W and between-class Σ_B:
    NC1 = tr(Σ_W Σ_B⁺)/C (variability collapse), NC2 the equinorm / equiangular deviations of the
    centred means and classifier rows from a simplex ETF, NC3 the self-duality ‖Wᵀ/‖W‖_F − M/‖M‖_F‖²_F,
    NC4 the mismatch between the classifier and the nearest-class-centre rule (Papyan, Han & Donoho
    2020). ``settings``: the other fields of the ``collapse`` probe (``layers="depth"``, ``nc1_variant``,
    ``mode``, ``minority_threshold``). Targets must be class labels; for a sequence model each counted token is an
    example, and with ``loss="causal_lm"`` (or a causal LM's own ``"model"``) its class is the next token (Wu &
    Papyan 2024, "Linguistic Collapse"). Values: "nc1" and its variants,
    "nc2_*", "nc3_*", "nc4_ncc_mismatch", "ncc_accuracy" and per-class arrays "class_*".

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.neural_collapse(model, (x, y))
    >>> res.scalar("nc1") > 0, res.values["class_count"].tolist() == torch.bincount(y).tolist()
    (True, True)
    """
    probe = dict(module=module, **settings)
    return _run("collapse", model, data, loss, probe, batch_size, max_examples, device, dtype, output=output)


def uniformity(model: nn.Module, data: Any, *, module: str | None = None, loss: str = "cross_entropy",
               capture: str = "input", t: float = 2.0,
               batch_size: int | None = 256, max_examples: int | None = None,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               output: str | None = None, **settings: Any) -> Result:
    """Uniformity, alignment, tolerance and RankMe of the features at ``module`` (default: the last nn.Linear).

    On the L2-normalised features z: uniformity log E exp(−t ‖z_i − z_j‖²) with t = 2 (Wang & Isola
    2020), W2 uniformity (Fang et al. 2024), tolerance (mean same-class cosine similarity; Wang & Liu
    2021) and RankMe exp(H(σ/‖σ‖₁)) of the singular values (Garrido et al. 2023). ``capture``: the
    "input" (default) or "output" of ``module``. ``settings``: the other fields of the ``uniformity``
    probe (``augmentation="gaussian_noise"`` adds alignment, ``max_pairs_examples``, ``seed``, ...). ``loss`` only
    pairs a causal LM's token features with the next token's label for "tolerance" (``"causal_lm"``).
    Values: "uniformity", "w2_uniformity", "tolerance", "rankme" (0-d) and "singular_values".

    >>> import torch, lossatlas
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> res = lossatlas.uniformity(model, (x, y))
    >>> res.scalar("uniformity") < 0, 1 <= res.scalar("rankme") <= 16
    (True, True)
    """
    probe = dict(module=module, capture=capture, t=t, **settings)
    return _run("uniformity", model, data, loss, probe, batch_size, max_examples, device, dtype, output=output)


# ------------------------------------------------------------------------------------------------- shared steps
def _run(name: str, model: nn.Module, data: Any, loss_name: str, settings: dict, batch_size: int | None,
         max_examples: int | None, device: str | torch.device | None, dtype: str | torch.dtype | None, *,
         step: int | None = None, steps: tuple[int, ...] = (),
         state_at: Callable[[int], Mapping[str, Tensor]] | None = None, output: str | None = None) -> Result:
    """Build the probe ``name`` from ``settings`` and run it once on ``model`` and ``data`` (as ``run_probe`` does)."""
    _check_model(model, "model")
    loss_name = resolve_loss_spec(loss_name)  # a callable becomes a LossClosure; the caller's own spec is trusted
    loss_name, output = resolve_loss_and_output(None, loss_name, output)
    cls = get_probe(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in (("batch_size", batch_size), ("max_examples", max_examples)):
        if key in fields:  # the probe's own setting of that name means the same thing
            settings.setdefault(key, value)
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise UserError(f"{name}: unknown setting {', '.join(map(repr, unknown))}; the {name} probe's settings are "
                        f"{', '.join(sorted(fields))}")
    try:
        probe = cls(**settings)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    torch_dtype = _torch_dtype(dtype)
    model_device = _model_device(model)
    target = torch.device(device) if device is not None else model_device
    if torch_dtype is not None or target != model_device:  # a copy: the caller's module stays as it was
        model = copy.deepcopy(model).to(device=target, dtype=torch_dtype)
    if isinstance(data, (str, bytes)) or (isinstance(data, Mapping) and "labels" not in data):
        raise UserError(f"cannot use {type(data).__name__} as data: give an (inputs, targets) pair of tensors, a dict "
                        "batch with 'labels', a torch Dataset or an iterable of batches; for a named data set, build "
                        "it first, e.g. lossatlas.models.build_data({'name': 'digits'})")
    try:
        batches = as_batches(data, batch_size, limit=max_examples, keep_labels=loss_name == MODEL_LOSS)
    except ValueError as exc:
        raise UserError(f"data: {exc}") from None
    batches = to_device(batches, target, torch_dtype or _model_dtype(model))
    precision = None
    if loss_name == MODEL_LOSS:  # the targets count what the model's own loss averages
        batches = model_loss_batches(model, batches)

    def state_at_here(s: int) -> dict[str, Tensor]:
        """Another model's state on this device and in this dtype."""
        return {k: _cast(v, target, torch_dtype) for k, v in state_at(s).items()}

    ctx = ProbeContext(model=model, data=batches, loss=loss_name, step=step, device=target, dtype=torch_dtype,
                       steps=steps, state_at=state_at_here if state_at is not None else None)
    with using_output(model, output):  # the caller's module keeps its own choice afterwards
        if loss_name == MODEL_LOSS:
            precision = model_loss_precision(model, batches)
            if precision is not None:
                warnings.warn(precision, stacklevel=3)
        result = probe.run(ctx)
    result.meta.update(loss=loss_name, output=output)
    if precision is not None:
        result.meta["loss_precision_warning"] = precision
    return result


def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise UserError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[check_choice("dtype", str(dtype).replace("torch.", ""), _DTYPES, error=UserError)]


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter (None: no floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _cast(t: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    t = t.to(device)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
