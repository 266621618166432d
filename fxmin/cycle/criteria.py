"""Pruning masks: what is prunable, the criteria that score weights (magnitude, unit-scaled, priced by
MACs), and masks ranked across all tensors (global) or tensor by tensor (per layer).

Masks are plain dicts ``{parameter name: bool tensor}`` (True = kept), the format ``fxmin.minimize``
takes. Nothing here modifies the model it is given. Holding masks during training and the group
lasso are in :mod:`fxmin.cycle.training`, release (zeros back to noise) in :mod:`fxmin.cycle.release`.

>>> import torch, fxmin
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> masks = fxmin.global_magnitude(net, 0.5)
>>> sum(int((~m).sum()) for m in masks.values())   # half of the 80 Linear weights
40
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import InputError, MaskError
from ..masks import model_device, to_device

#: ``criterion(name, parameter) -> scores`` of the parameter's shape; the lowest scores are pruned first.
Criterion = Callable[[str, torch.Tensor], torch.Tensor]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def prunable(model: nn.Module, *, weights: bool = True, biases: bool = False, norms: bool = False,
             embeddings: bool = False, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> dict:
    """The parameters a pruner may touch, by name: Linear/Conv weights by default.

    ``biases`` adds Linear/Conv biases, ``norms`` the affine weight and bias of BatchNorm/LayerNorm/
    GroupNorm/InstanceNorm, ``embeddings`` the weights of ``nn.Embedding``. ``include`` adds
    parameters by name, ``exclude`` removes them (e.g. the classifier: ``exclude=["fc3.weight"]``).

    >>> sorted(prunable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), norms=True))
    ['0.weight', '1.bias', '1.weight']
    """
    chosen = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, parameter in module.named_parameters(recurse=False):
            full = prefix + name
            if isinstance(module, _WEIGHTED):
                take = weights if name == "weight" else biases if name == "bias" else False
            elif isinstance(module, _NORMS):
                take = norms
            elif isinstance(module, nn.Embedding):
                take = embeddings
            else:
                take = False
            if take:
                chosen[full] = parameter
    parameters = dict(model.named_parameters())
    for name in include:
        if name not in parameters:
            raise MaskError(f"include names '{name}', which is not a parameter of {type(model).__name__}")
        chosen[name] = parameters[name]
    for name in exclude:
        chosen.pop(name, None)
    return chosen


def magnitude(name: str, parameter: torch.Tensor) -> torch.Tensor:
    """|w|: the default criterion."""
    return parameter.detach().abs()


def unit_scaled_magnitude(name: str, parameter: torch.Tensor) -> torch.Tensor:
    """|w_ij| * (|row_i| / mean row norm) * (|column_j| / mean column norm).

    A weight between two weak units scores lower than an equally large weight between strong ones,
    so pruning by this score empties whole rows and columns, which minimization then removes.
    1-D parameters (biases, norm affine) fall back to |w|.
    """
    w = parameter.detach().abs()
    if w.dim() < 2:
        return w
    flat = w.flatten(2) if w.dim() > 2 else w.unsqueeze(-1)  # (out, in, kernel)
    rows = flat.pow(2).sum(dim=(1, 2)).sqrt()
    columns = flat.pow(2).sum(dim=(0, 2)).sqrt()
    rows = rows / rows.mean().clamp_min(1e-12)
    columns = columns / columns.mean().clamp_min(1e-12)
    shape = (-1, 1) + (1,) * (w.dim() - 2)
    return w * rows.view(shape) * columns.view((1, -1) + (1,) * (w.dim() - 2))


class MacScaled:
    """A criterion that prices each weight by the multiply-accumulates it costs: ``criterion / cost``.

    ``cost`` is :func:`fxmin.mac_costs` of the model being pruned on ``example_inputs`` (MACs per
    entry relative to the mean, raised to ``power``): an entry of a convolution at high resolution is
    used many times per image and scores lower than an equally large one at low resolution or in a
    Linear, so the pruning (and the minimization after it) removes MACs, not only parameters.
    ``power=0`` is ``criterion`` itself; ``power=1`` ranks by score per MAC; in between trades the two.

    The costs depend on the model, which changes every Squeeze-Release cycle: :func:`global_magnitude`,
    :func:`layer_magnitude` and ``squeeze_release`` call :meth:`bind` with the model they prune, which
    runs it once on ``example_inputs`` (moved to its device). Weights no MAC node multiplies directly
    (biases, norm affine) keep their plain score. ``trace_options`` (``tracer``, ``leaf_modules``,
    ``concrete_args``) are for :func:`fxmin.trace`, for a model that needs them (minimized ones do not).

    >>> conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 4))
    >>> masks = global_magnitude(conv, 0.5, criterion=MacScaled(example_inputs=torch.randn(1, 1, 8, 8), power=1))
    >>> int((~masks["0.weight"]).sum())   # 36 entries, each used at 64 positions: pruned before the Linear's
    36
    """

    def __init__(self, criterion: Criterion = unit_scaled_magnitude, *, example_inputs, power: float = 0.5,
                 **trace_options):
        if power < 0:
            raise InputError(f"MacScaled: power must be at least 0, got {power}")
        if example_inputs is None:
            raise InputError("MacScaled needs example_inputs: a batch the model runs on, to count its MACs")
        self.criterion, self.example_inputs, self.power = criterion, example_inputs, float(power)
        self.trace_options = trace_options

    def bind(self, model: nn.Module) -> Criterion:
        """The plain criterion for ``model``: its costs counted now."""
        from ..audit.flops import mac_costs

        costs = mac_costs(model, to_device(self.example_inputs, model_device(model)), power=self.power,
                          **self.trace_options)
        criterion = _bind(self.criterion, model)
        return lambda name, parameter: criterion(name, parameter) / max(costs.get(name, 1.0), 1e-12)

    def __call__(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        raise InputError("MacScaled is priced on a model: pass it as criterion= to global_magnitude, "
                         "layer_magnitude or squeeze_release (which bind it to the model they prune), or call "
                         ".bind(model) for a plain criterion")

    def __repr__(self) -> str:
        return f"MacScaled({getattr(self.criterion, '__name__', self.criterion)!r}, power={self.power})"


def _bind(criterion, model):
    """A criterion that needs the model (``bind(model)``, e.g. :class:`MacScaled`) bound to it; others as they are."""
    bind = getattr(criterion, "bind", None)
    return bind(model) if callable(bind) else criterion


def _candidates(model, masks, select):
    parameters = prunable(model, **(select or {}))
    if not parameters:
        raise MaskError(f"{type(model).__name__} has no prunable parameters with {select or 'the defaults'}")
    kept = {}
    for name, parameter in parameters.items():
        prior = (masks or {}).get(name)
        kept[name] = (torch.ones_like(parameter, dtype=torch.bool) if prior is None
                      else torch.as_tensor(prior).to(parameter.device).bool().clone())
        if kept[name].shape != parameter.shape:
            raise MaskError(f"mask for '{name}' has shape {tuple(kept[name].shape)}, parameter {tuple(parameter.shape)}")
    return parameters, kept


def _scores(criterion, name, parameter):
    with torch.no_grad():
        scores = criterion(name, parameter)
    if tuple(scores.shape) != tuple(parameter.shape):
        raise MaskError(f"criterion returned shape {tuple(scores.shape)} for '{name}' of shape {tuple(parameter.shape)}")
    return scores.detach().float()


def _drop_lowest(scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (into the flattened tensor) of the ``count`` lowest scores among ``alive``; ties by index."""
    positions = alive.flatten().nonzero().squeeze(1)
    order = torch.sort(scores.flatten()[positions], stable=True).indices
    return positions[order[:count]]


def global_magnitude(model: nn.Module, amount: float, *, criterion: Criterion = magnitude,
                     masks: Mapping | None = None, **select) -> dict:
    """Masks that prune ``amount`` of the still-unmasked prunable entries, ranked across all tensors.

    ``masks`` (optional) are earlier masks: their False positions stay pruned and are not counted.
    Exactly ``round(amount * unmasked)`` entries are pruned. ``select`` is passed to :func:`prunable`
    (``biases=True``, ``exclude=[...]``, ...). The model is not modified.

    >>> net = torch.nn.Linear(10, 10)
    >>> int((~global_magnitude(net, 0.3)["weight"]).sum())
    30
    """
    _check_amount(amount)
    parameters, kept = _candidates(model, masks, select)
    criterion = _bind(criterion, model)
    names = list(parameters)
    scores = torch.cat([_scores(criterion, n, parameters[n]).flatten().cpu() for n in names])
    alive = torch.cat([kept[n].flatten().cpu() for n in names])
    drop = _drop_lowest(scores, alive, round(amount * int(alive.sum())))
    flat_kept = alive.clone()
    flat_kept[drop] = False
    result, start = {}, 0
    for name in names:
        size = parameters[name].numel()
        result[name] = flat_kept[start:start + size].view(parameters[name].shape).to(parameters[name].device)
        start += size
    return result


def layer_magnitude(model: nn.Module, amount: float | Mapping, *, criterion: Criterion = magnitude,
                    masks: Mapping | None = None, **select) -> dict:
    """Masks that prune ``amount`` of each tensor's still-unmasked entries, tensor by tensor.

    ``amount`` is one fraction for every tensor or a dict ``{name: fraction}`` (missing names: 0).

    >>> net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 4))
    >>> [int((~m).sum()) for m in layer_magnitude(net, 0.5).values()]
    [50, 20]
    """
    parameters, kept = _candidates(model, masks, select)
    criterion = _bind(criterion, model)
    result = {}
    for name, parameter in parameters.items():
        fraction = amount.get(name, 0.0) if isinstance(amount, Mapping) else amount
        _check_amount(fraction)
        alive = kept[name]
        drop = _drop_lowest(_scores(criterion, name, parameter).to(alive.device), alive, round(fraction * int(alive.sum())))
        new = alive.clone().flatten()
        new[drop] = False
        result[name] = new.view(parameter.shape)
    return result


def zero_masks(model: nn.Module, **select) -> dict:
    """Masks that keep exactly the nonzero prunable entries (a minimized model's remaining zeros)."""
    return {name: parameter.detach() != 0 for name, parameter in prunable(model, **select).items()}


def sparsity(model: nn.Module, masks: Mapping) -> float:
    """Fraction of the masked parameters' entries that the masks prune."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / max(total, 1)


def _check_amount(amount):
    if not 0.0 <= float(amount) <= 1.0:
        raise MaskError(f"amount must be a fraction in [0, 1], got {amount}")
