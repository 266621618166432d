"""Pruning helpers (what is prunable, magnitude criteria, global and per-layer masks, held masks) and
release, their inverse (exact zeros become calibrated noise).

Masks are plain dicts ``{parameter name: bool tensor}`` (True = kept), the format ``fxmin.minimize``
takes. Nothing here modifies the model it is given, except :func:`hold_masks`, whose purpose is to
keep masked weights at zero while *your* training loop runs.

>>> import torch, fxmin
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> masks = fxmin.global_magnitude(net, 0.5)
>>> sum(int((~m).sum()) for m in masks.values())   # half of the 80 Linear weights
40
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import InputError, MaskError
from .masks import model_device, to_device
from .verify import full_precision

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
        from .flops import mac_costs

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


def group_lasso(model: nn.Module, names: Iterable[str] | None = None, *, rows: bool = True,
                columns: bool = True, skip_rows: Iterable[str] = (), weighting: str = "none",
                costs: Mapping[str, float] | None = None) -> torch.Tensor:
    """Sum of the L2 norms of the rows (output units) and columns (input units) of weight tensors.

    Add ``lam * group_lasso(model)`` to your training loss to drive whole units to zero, so that
    pruning empties rows and columns that minimization removes. ``names`` defaults to the Linear/Conv
    weights; ``skip_rows`` exempts tensors whose rows are not units you may remove (a classifier).

    ``weighting`` scales each group's norm: ``"none"`` (every group alike), ``"sqrt"`` (by the square
    root of its number of entries, the textbook group lasso) or ``"size"`` (by its number of entries,
    the parameters its removal saves, so an expensive unit is pressed harder than a cheap one). The
    weights are divided by their mean over all groups of the call, so ``lam`` keeps its scale.

    ``costs`` (``{name: cost per entry}``, e.g. :func:`fxmin.mac_costs` of the model; names it
    lacks cost 1) multiplies the groups of each tensor by its cost: with ``weighting="size"`` a group
    is pressed by the MACs its removal saves, not by its parameters. The costs change as the model
    shrinks: count them again for each model you train (they are cheap: one forward pass).
    """
    power = {"none": 0.0, "sqrt": 0.5, "size": 1.0}.get(weighting)
    if power is None:
        raise InputError(f"group_lasso: weighting must be 'none', 'sqrt' or 'size', not {weighting!r}")
    parameters = dict(model.named_parameters())
    chosen = list(names) if names is not None else list(prunable(model))
    skip = set(skip_rows)
    unknown = sorted(set(costs or {}) - set(parameters))
    if unknown:
        raise InputError(f"group_lasso: costs name {unknown[:3]}, not parameters of {type(model).__name__}; count "
                         f"them on this model (fxmin.mac_costs(model, ...)): a minimized model renames its layers")
    norms, sizes, prices = [], [], []
    for name in chosen:
        w = parameters[name]
        if w.dim() < 2 or w.numel() == 0:  # a minimized layer may have no units left (a block's dead MLP)
            continue
        flat = w.flatten(2) if w.dim() > 2 else w.unsqueeze(-1)
        if rows and name not in skip:
            norms.append(flat.pow(2).sum(dim=(1, 2)).add(1e-16).sqrt())
            sizes.append(flat.shape[1] * flat.shape[2])
            prices.append(float((costs or {}).get(name, 1.0)))
        if columns:
            norms.append(flat.pow(2).sum(dim=(0, 2)).add(1e-16).sqrt())
            sizes.append(flat.shape[0] * flat.shape[2])
            prices.append(float((costs or {}).get(name, 1.0)))
    if not norms:
        return torch.zeros(())
    scale = [float(size) ** power * price for size, price in zip(sizes, prices)]
    mean = sum(s * n.numel() for s, n in zip(scale, norms)) / sum(n.numel() for n in norms)
    return sum(n.sum() * (s / mean) for s, n in zip(scale, norms))


class MaskHold:
    """Keeps masked entries at exactly zero while any optimizer and loop trains the model.

    Applies the masks now, zeroes the masked gradients (a tensor hook), re-applies the masks before
    every forward of the owning module (so momentum or weight decay cannot revive a weight) and, when
    an ``optimizer`` is given, after every ``optimizer.step()``. ``remove()`` applies them a last time
    and detaches every hook. Use :func:`hold_masks` as a context manager.
    """

    def __init__(self, model: nn.Module, masks: Mapping, optimizer: torch.optim.Optimizer | None = None):
        parameters = dict(model.named_parameters())
        self._pairs = []
        self._handles = []
        for name, mask in masks.items():
            if name not in parameters:
                raise MaskError(f"mask names '{name}', which is not a parameter of {type(model).__name__}")
            parameter = parameters[name]
            mask = torch.as_tensor(mask).to(parameter.device).bool()
            if mask.shape != parameter.shape:
                raise MaskError(f"mask for '{name}' has shape {tuple(mask.shape)}, parameter {tuple(parameter.shape)}")
            pair = [parameter, mask.to(parameter.dtype)]
            self._pairs.append(pair)
            if parameter.requires_grad:
                self._handles.append(parameter.register_hook(lambda grad, pair=pair: grad * _keep(pair, grad.device)))
            path = name.rpartition(".")[0]
            owner = model.get_submodule(path) if path else model
            self._handles.append(owner.register_forward_pre_hook(lambda *_, pair=pair: _apply(pair)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.apply()

    def apply(self) -> None:
        for pair in self._pairs:
            _apply(pair)

    def remove(self) -> None:
        self.apply()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _keep(pair, device):
    """The 0/1 mask of ``pair = [parameter, mask]`` on ``device``: the loop may move the model after the
    hold began (Lightning's fit moves it to the accelerator); the mask follows once, not every step."""
    if pair[1].device != device:
        pair[1] = pair[1].to(device)
    return pair[1]


def _apply(pair):
    with torch.no_grad():
        pair[0].data.mul_(_keep(pair, pair[0].device))


@contextlib.contextmanager
def hold_masks(model: nn.Module, masks: Mapping, optimizer: torch.optim.Optimizer | None = None):
    """Context manager: inside it, masked weights stay exactly zero whatever your loop does.

    >>> net = torch.nn.Linear(4, 4)
    >>> masks = global_magnitude(net, 0.5)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    >>> with hold_masks(net, masks, opt):
    ...     for _ in range(3):
    ...         opt.zero_grad(); net(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> bool((net.weight[~masks["weight"]] == 0).all())
    True
    """
    hold = MaskHold(model, masks, optimizer)
    try:
        yield hold
    finally:
        hold.remove()


# ----------------------------------------------------------------------------------------- release
@dataclass
class ReleaseResult:
    """``module``: a new module with its zeros released; ``sigmas``/``zeros`` per tensor name;
    ``change``: the relative output change of all releases together on the calibration batch."""

    module: nn.Module
    sigmas: dict
    zeros: dict
    change: float


def _outputs(module, batch) -> torch.Tensor:
    with torch.no_grad(), full_precision():  # TF32's rounding would drown the noise being calibrated
        out = module(*batch)
    leaves = [t.detach().double().flatten() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return torch.cat(leaves)


def _relative_change(reference: torch.Tensor, module, batch) -> float:
    return float((_outputs(module, batch) - reference).norm() / reference.norm().clamp_min(1e-30))


def release(module: nn.Module, calibration_batch, *, alpha: float = 0.01, tolerance: float = 1e-3,
            generator: torch.Generator | None = None, names=None, max_halvings: int = 30) -> ReleaseResult:
    """Turn the exact zeros inside weight tensors into small calibrated noise; return a new module.

    For each tensor (``names``, default: the Linear/Conv weights) with zero set Z, ``W[Z] = sigma * e``
    with ``e ~ N(0, 1)`` drawn once from ``generator``; ``sigma`` starts at ``alpha * std(W[nonzero])``
    and is halved until the relative L2 change of the output on ``calibration_batch`` (this tensor
    alone released) is below ``tolerance``. Then all sigmas are halved together until the joint change
    is below ``tolerance`` as well. A tensor that cannot meet it after ``max_halvings`` gets sigma 0.
    The input module is not modified; the calibration batch is moved to its device.

    >>> net = torch.nn.Linear(8, 4); net.weight.data[:, :4] = 0
    >>> out = release(net, torch.randn(16, 8), generator=torch.Generator().manual_seed(0))
    >>> out.zeros["weight"], bool((out.module.weight != 0).all()), bool((net.weight[:, :4] == 0).all())
    (16, True, True)
    """
    # on the module's device: a training loop (Lightning) may have moved the model since the batch was made
    batch = to_device(calibration_batch, model_device(module))
    result = copy.deepcopy(module)
    was_training = result.training
    result.eval()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    parameters = dict(result.named_parameters())
    chosen = list(names) if names is not None else list(prunable(result))
    reference = _outputs(result, batch)
    originals = {name: parameters[name].detach().clone() for name in chosen}
    noise, sigmas, zeros = {}, {}, {}

    def set_noise(name, sigma):
        with torch.no_grad():
            zero = noise[name][0]
            parameters[name].copy_(originals[name])
            parameters[name][zero] = sigma * noise[name][1]

    for name in chosen:
        value = originals[name]
        zero = value == 0
        zeros[name] = int(zero.sum())
        sigmas[name] = 0.0
        nonzero = value[~zero]
        if zeros[name] == 0 or nonzero.numel() < 2:
            continue
        draw = torch.randn(zeros[name], generator=generator, dtype=torch.float64).to(value.dtype).to(value.device)
        noise[name] = (zero, draw)
        sigma = alpha * float(nonzero.float().std())
        for _ in range(max_halvings + 1):
            set_noise(name, sigma)
            if _relative_change(reference, result, batch) < tolerance:
                break
            sigma /= 2
        else:
            sigma = 0.0
        sigmas[name] = sigma
        set_noise(name, 0.0)  # measured alone; the joint release comes next
    for _ in range(max_halvings + 1):
        for name in noise:
            set_noise(name, sigmas[name])
        change = _relative_change(reference, result, batch)
        if change < tolerance:
            break
        sigmas = {name: s / 2 for name, s in sigmas.items()}
    result.train(was_training)
    return ReleaseResult(result, sigmas, zeros, change if noise else 0.0)
