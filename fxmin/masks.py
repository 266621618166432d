"""Masks from dicts, torch.nn.utils.prune, or exact zeros; validation; the masked reference copy."""
from __future__ import annotations

import copy
import difflib
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._pytree import tree_map_only

from .errors import InputError, MaskError


def _pruned_tensors(model: nn.Module):
    """(module path, module, parameter name) for every torch.nn.utils.prune reparametrization."""
    found = []
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):  # PruningContainer included
                found.append((path, module, hook._tensor_name))
    return found


def pruned_memo(model: nn.Module) -> dict:
    """A ``copy.deepcopy`` memo that lets a pruned model be copied.

    ``torch.nn.utils.prune`` stores ``weight = weight_orig * weight_mask`` as a non-leaf
    tensor, which ``deepcopy`` refuses; the copy gets a detached clone instead (it is
    recomputed from ``weight_orig`` and ``weight_mask`` on the next forward anyway).
    """
    memo = {}
    for _, module, name in _pruned_tensors(model):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor) and not value.is_leaf:
            memo[id(value)] = value.detach().clone()
    return memo


def to_device(inputs, device) -> tuple:
    """``inputs`` (a tensor or a tuple/list of nested inputs) as a tuple with every tensor on ``device``."""
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(tree_map_only(torch.Tensor, lambda t: t.to(device), tuple(inputs)))


def model_device(model: nn.Module) -> torch.device:
    """The one device of ``model``'s parameters and buffers (CPU for a model with none).

    fxmin reasons about parameter values on the host, so :func:`fxmin.minimize` works on a CPU copy
    and puts the result back here; a model spread over several devices has no such place."""
    devices = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    if len(devices) > 1:
        raise InputError(f"the model's parameters and buffers are on several devices ({', '.join(sorted(map(str, devices)))}); "
                        "fxmin returns the smaller model on one device: minimize a copy moved to one device "
                        "(model.to('cuda:0') or model.cpu()), then place its parts again")
    return devices.pop() if devices else torch.device("cpu")


def host_memo(model: nn.Module) -> dict:
    """A ``copy.deepcopy`` memo that copies ``model``'s parameters and buffers straight to the CPU, so
    that copying a model on an accelerator to analyse it never holds a second copy there."""
    memo = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != "cpu" and id(tensor) not in memo:
            host = tensor.detach().cpu()
            memo[id(tensor)] = nn.Parameter(host, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else host
    for key, value in pruned_memo(model).items():
        memo[key] = value.cpu()
    return memo


def prune_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks ``torch.nn.utils.prune`` left on ``model``, by parameter name (``fc1.weight``)."""
    masks = {}
    for path, module, name in _pruned_tensors(model):
        key = f"{path}.{name}" if path else name
        masks[key] = getattr(module, f"{name}_mask").detach().clone().bool()
    return masks


def _as_bool(name: str, mask, parameter: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as error:
            raise MaskError(f"mask for '{name}' is a {type(mask).__name__}, not a tensor") from error
    if tuple(mask.shape) != tuple(parameter.shape):
        raise MaskError(
            f"mask for '{name}' has shape {tuple(mask.shape)} but the parameter has shape {tuple(parameter.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            bad = ~((mask == 0) | (mask == 1))
            if bad.any():
                raise MaskError(
                    f"mask for '{name}' must be boolean or 0/1; it holds other values such as "
                    f"{mask[bad].flatten()[0].item()!r}"
                )
        mask = mask != 0
    return mask.to(parameter.device)


def masked_reference(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, *, host: bool = False):
    """A deep copy of ``model`` in eval mode with every mask applied (``W * mask``); on the CPU with
    ``host=True`` (the model's tensors are copied there directly).

    Returns ``(reference, masks)`` where ``masks`` are the validated bool masks actually applied
    (the torch.nn.utils.prune masks when ``masks`` is None, else those given). The model and the
    masks passed in are not modified.

    >>> ref, used = masked_reference(nn.Linear(3, 2), {"weight": torch.tensor([[1, 0, 1], [0, 0, 1]])})
    >>> int((ref.weight == 0).sum()) >= 3
    True
    """
    if not isinstance(model, nn.Module):
        raise MaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from_prune = prune_masks(model)
    reference = copy.deepcopy(model, host_memo(model) if host else pruned_memo(model))
    if host:
        reference.cpu()  # tensors held outside parameters and buffers
        from_prune = {name: mask.cpu() for name, mask in from_prune.items()}
    for _, module, name in _pruned_tensors(reference):
        prune.remove(module, name)  # weight = weight_orig * weight_mask, as a plain parameter
    reference.eval()
    if masks is None:
        return reference, from_prune
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping from parameter names to tensors, got {type(masks).__name__}")
    parameters = dict(reference.named_parameters(remove_duplicate=False))
    applied = {}
    for name, mask in masks.items():
        if name not in parameters:
            close = difflib.get_close_matches(str(name), list(parameters), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise MaskError(
                f"mask names '{name}', which is not a parameter of {type(model).__name__}.{hint} "
                f"Names come from model.named_parameters(), e.g. {list(parameters)[:3]}."
            )
        applied[name] = _as_bool(name, mask, parameters[name])
    with torch.no_grad():
        for name, mask in applied.items():
            parameters[name].mul_(mask.to(parameters[name].dtype))
    return reference, {**from_prune, **applied}
