"""Helpers for *your* training loop while fxmin prunes: masks held at zero whatever the optimizer does
(:func:`hold_masks`) and a group-lasso penalty that drives whole units to zero (:func:`group_lasso`).

Masks are the dicts of :mod:`fxmin.prune`. :func:`hold_masks` modifies the model it is given: keeping
masked weights at zero while your loop runs is its purpose.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import InputError, MaskError
from .criteria import prunable


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

    On a model sharded by FSDP2 (DTensor parameters) it is a collective (every rank calls it) and
    returns a plain scalar whose gradient reaches the shards.
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
    total = sum(n.sum() * (s / mean) for s, n in zip(scale, norms))
    return total.full_tensor() if _is_sharded(total) else total  # FSDP2: a plain scalar to add to the loss


class MaskHold:
    """Keeps masked entries at exactly zero while any optimizer and loop trains the model.

    Applies the masks now, zeroes the masked gradients (a tensor hook), re-applies the masks before
    every forward of the owning module (so momentum or weight decay cannot revive a weight) and, when
    an ``optimizer`` is given, after every ``optimizer.step()``. ``remove()`` applies them a last time
    and detaches every hook. Use :func:`hold_masks` as a context manager.

    NOTE [Masks on sharded parameters]
    Under FSDP2 a parameter is a DTensor shard that takes no part in autograd (the forward runs on an
    all-gathered copy), so neither the gradient hook nor the forward hook reaches the weights the
    forward uses. What holds them is the step hook: the shard's masked entries are zeroed after every
    ``optimizer.step()``, so every all-gather brings zeros. The optimizer is therefore required for a
    sharded parameter, and its mask is sharded the way the parameter is.
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
            if _is_sharded(parameter):
                if optimizer is None:
                    raise InputError(f"hold_masks: '{name}' is sharded (FSDP2); its masks are held through the "
                                     f"optimizer: pass it, hold_masks(model, masks, optimizer)")
                continue  # NOTE [Masks on sharded parameters]
            if parameter.requires_grad:
                self._handles.append(parameter.register_hook(lambda grad, pair=pair: grad * _keep(pair, grad.device)))
            path = name.rpartition(".")[0]
            owner = model.get_submodule(path) if path else model
            self._handles.append(owner.register_forward_pre_hook(_mask_hook(pair)))
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


def _mask_hook(pair):
    """The forward pre-hook that applies ``pair``'s mask, marked so that :func:`strip_mask_holds` finds it."""
    def hook(*_):
        _apply(pair)
    hook.fxmin_mask_hold = True
    return hook


def strip_mask_holds(model: nn.Module) -> None:
    """Remove from a *copy* of a held model the forward hooks :class:`MaskHold` put on the original: a deep
    copy keeps them, and they would go on applying the original's masks to the original's weights."""
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if getattr(hook, "fxmin_mask_hold", False)]:
            del hooks[key]


def _is_sharded(parameter) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(parameter, DTensor)


def _keep(pair, device):
    """The 0/1 mask of ``pair = [parameter, mask]`` on ``device``: the loop may move the model after the
    hold began (Lightning's fit moves it to the accelerator); the mask follows once, not every step. The
    mask of a sharded parameter is sharded like it (every rank holds the whole mask, so nothing is sent)."""
    if _is_sharded(pair[0]):
        from torch.distributed.tensor import DTensor, distribute_tensor
        if not isinstance(pair[1], DTensor):
            mesh = pair[0].device_mesh
            pair[1] = distribute_tensor(pair[1].to(mesh.device_type), mesh, pair[0].placements, src_data_rank=None)
        return pair[1]
    if pair[1].device != device:
        pair[1] = pair[1].to(device)
    return pair[1]


def _apply(pair):
    with torch.no_grad():
        pair[0].data.mul_(_keep(pair, pair[0].device))


@contextlib.contextmanager
def hold_masks(model: nn.Module, masks: Mapping, optimizer: torch.optim.Optimizer | None = None):
    """Context manager: inside it, masked weights stay exactly zero whatever your loop does.

    >>> import fxmin
    >>> net = torch.nn.Linear(4, 4)
    >>> masks = fxmin.global_magnitude(net, 0.5)
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
