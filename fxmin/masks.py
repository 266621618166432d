"""Masks from dicts, torch.nn.utils.prune, or exact zeros; validation; the reference the pass reads (sharing the
model's tensors, masks applied on load: NOTE [Weights on demand] in fxmin/weights.py) and the masked copy."""
from __future__ import annotations

import copy
import difflib
import warnings
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._pytree import tree_flatten, tree_map_only

from .errors import InputError, MaskError
from .graph_helpers import deep_copy
from .weights import ModuleWeights, storage_key


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
    """``inputs`` (a tensor or a tuple/list of nested inputs) as a tuple with every tensor on ``device``;
    a tensor on the meta device raises :class:`InputError` (fxmin runs the model on its inputs)."""
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if any(t.device.type == "meta" for t in tree_flatten(tuple(inputs))[0] if isinstance(t, torch.Tensor)):
        raise InputError("an example input is on the meta device and holds no values: fxmin runs the model on its "
                         "example inputs; pass real tensors of the same shapes and dtypes (random values will do)")
    return tuple(tree_map_only(torch.Tensor, lambda t: t.to(device), tuple(inputs)))


def require_module(model) -> None:
    """Raise :class:`InputError` saying what to do when ``model`` is not an ``nn.Module`` fxmin can read."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, torch.export.ExportedProgram):
        raise InputError("model is a torch.export.ExportedProgram: minimize it with "
                         "fxmin.minimize_exported(program, masks, example_inputs), or pass the nn.Module itself")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise InputError(f"model is a path ({model!r}), not a torch.nn.Module: load the model first "
                         "(build it and call load_state_dict(torch.load(path)), or torch.load(path, weights_only=False) "
                         "for a pickled module) and pass the module")
    if callable(model):
        raise InputError(f"model is a {type(model).__name__}, not a torch.nn.Module: fxmin reads the parameters the "
                         "masks name from a module; wrap the computation in an nn.Module whose parameters it uses")
    raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def model_device(model: nn.Module, *, files: bool = False) -> torch.device:
    """The one device of ``model``'s parameters and buffers (CPU for a model with none).

    fxmin reasons about parameter values on the host, so :func:`fxmin.minimize` works on a CPU copy
    and puts the result back here; a model spread over several devices has no such place; a model
    on the meta device has no values to reason about unless ``files`` (``minimize(weights=...)``) hold
    them (NOTE [Weights from files]), and its result lives on the CPU."""
    require_module(model)
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if on_meta and not files:
        raise InputError(f"the model's tensors are on the meta device ({len(on_meta)} of them, e.g. {on_meta[0]!r}): "
                         "they hold no values, and fxmin reads weight values to prove what the masks made dead. "
                         "Pass the checkpoint that holds them (minimize(..., weights='checkpoint/'), safetensors "
                         "files), or materialize the weights first (model.to_empty(device='cpu') then "
                         "load_state_dict(...))")
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
        given = type(mask).__name__
        try:
            mask = torch.as_tensor(mask)  # a numpy array or nested lists
        except Exception:
            mask = None
        if mask is None or mask.dim() == 0:
            raise MaskError(f"mask for '{name}' is a {given}, not a tensor: pass a bool or 0/1 tensor of the "
                            f"parameter's shape {tuple(parameter.shape)}")
    if mask.device.type == "meta":
        raise MaskError(f"mask for '{name}' is on the meta device and holds no values: compute it on the CPU "
                        "(or the model's device) and pass that tensor")
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
    return mask if parameter.is_meta else mask.to(parameter.device)  # a meta tensor's values come from files


def masked_reference(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, *, host: bool = False):
    """A deep copy of ``model`` in eval mode with every mask applied (masked entries set to zero, so a
    NaN the mask removes is gone); on the CPU with ``host=True`` (the model's tensors are copied there
    directly). A parameter or buffer that still holds NaN or inf raises :class:`InputError`: the masked
    model itself would compute non-finite values, which no verification can compare.

    Returns ``(reference, masks)`` where ``masks`` are the validated bool masks actually applied
    (the torch.nn.utils.prune masks when ``masks`` is None, else those given). The model and the
    masks passed in are not modified. :func:`shared_reference` is the same function without the copy.

    >>> ref, used = masked_reference(nn.Linear(3, 2), {"weight": torch.tensor([[1, 0, 1], [0, 0, 1]])})
    >>> int((ref.weight == 0).sum()) >= 3
    True
    """
    require_module(model)
    from_prune = prune_masks(model)
    reference = copy.deepcopy(model, host_memo(model) if host else pruned_memo(model))
    if host:
        reference.cpu()  # tensors held outside parameters and buffers
        from_prune = {name: mask.cpu() for name, mask in from_prune.items()}
    for _, module, name in _pruned_tensors(reference):
        prune.remove(module, name)  # weight = weight_orig * weight_mask, as a plain parameter
    reference.eval()
    applied = _validated(model, reference, masks)
    parameters = dict(reference.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, mask in applied.items():
            parameters[name].masked_fill_(~mask, 0)
    _require_finite(ModuleWeights(reference))
    return reference, {**from_prune, **applied}


def shared_reference(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, *, host: bool = False,
                     files: Mapping[str, torch.Tensor] | None = None):
    """What :func:`masked_reference` computes, without copying a weight: ``(reference, masks, by
    storage)``. ``reference`` is a copy of ``model``'s modules in eval mode that shares its parameters
    (NOTE [Weights on demand]; buffers, which a forward may update in place, are copied); the masks
    are not applied to it but returned by :func:`fxmin.weights.storage_key` of the tensor they mask,
    for a :class:`fxmin.weights.ModuleWeights` to apply on load. A ``torch.nn.utils.prune``
    reparametrization becomes the parameter ``weight_orig`` under the name ``weight``, its mask among
    the masks. ``host=True``: the copy's tensors are on the CPU (copied there). ``files``: where tensors
    on the meta device are read from (NOTE [Weights from files]). Same checks and errors as
    :func:`masked_reference` but finiteness, which the reader of the weights checks where it first reads
    each tensor (``attach(..., check_finite=True)``: NOTE [Finite where first read] in fxmin/weights.py);
    the model and the masks are not modified.

    >>> linear = nn.Linear(3, 2)
    >>> ref, used, by_storage = shared_reference(linear, {"weight": torch.tensor([[1, 0, 1], [0, 0, 1]])})
    >>> ref.weight is linear.weight, len(by_storage)
    (True, 1)
    """
    require_module(model)
    from_prune = prune_masks(model)
    if host:
        memo = host_memo(model)
    else:
        memo = {id(p): p for p in model.parameters()}
        memo.update({key: value.detach() for key, value in pruned_memo(model).items()})  # replaced below
    reference = deep_copy(model, memo)
    if host:
        reference.cpu()  # tensors held outside parameters and buffers
        from_prune = {name: mask.cpu() for name, mask in from_prune.items()}
    for _, module, name in _pruned_tensors(reference):
        # weight_orig stays the model's tensor under the name `weight` (prune.remove would write into it)
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
                del module._forward_pre_hooks[key]
        original = module._parameters.pop(f"{name}_orig")
        module._buffers.pop(f"{name}_mask")
        module.__dict__.pop(name, None)
        module.register_parameter(name, original)
    reference.eval()
    applied = _validated(model, reference, masks)
    parameters = dict(reference.named_parameters(remove_duplicate=False))
    by_storage: dict = {}
    for name, mask in (*from_prune.items(), *applied.items()):  # a tied tensor or a pruned one masked again: both
        key = storage_key(parameters[name])
        by_storage[key] = by_storage[key] & mask if key in by_storage else mask
    return reference, {**from_prune, **applied}, by_storage


def _validated(model: nn.Module, reference: nn.Module, masks) -> dict:
    """``masks`` as bool tensors on their parameters' devices, each name checked against ``reference``."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping from parameter names to tensors, got {type(masks).__name__}")
    parameters = dict(reference.named_parameters(remove_duplicate=False))
    applied = {}
    for name, mask in masks.items():
        if name not in parameters and name in dict(reference.named_buffers()):
            raise MaskError(f"mask names '{name}', a buffer of {type(model).__name__}, not a parameter: fxmin masks "
                            "parameters; buffers (running statistics, tables) follow the channels of the layer that owns them")
        if name not in parameters:
            close = difflib.get_close_matches(str(name), list(parameters), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise MaskError(
                f"mask names '{name}', which is not a parameter of {type(model).__name__}.{hint} "
                f"Names come from model.named_parameters(), e.g. {list(parameters)[:3]}."
            )
        applied[name] = _as_bool(name, mask, parameters[name])
    return applied


def require_read(graph_module: torch.fx.GraphModule, reference: nn.Module, masks, model_name: str) -> None:
    """NOTE [Masks of unread parameters]: a mask in ``masks`` (the user's) that removes entries of a parameter
    the traced forward (``graph_module``, traced from ``reference``) never reads could change nothing, so
    fxmin would return the model unchanged there while the user expects it smaller.

    - Its module is called but does not read it (a layer that does not read that parameter): a typo'd
      path or a mistaken mask. :class:`MaskError`, naming it and what to do.
    - Its module is never called on these inputs (an inactive branch: torchvision GoogLeNet's and
      Inception's auxiliary heads in eval mode, a head left over from another version of the model):
      its weights are masked as they would be in training, which is no mistake; the mask is ignored
      with a warning naming the modules (they are not part of the traced forward, nor of the result).

    An all-ones mask removes nothing and passes."""
    if not masks:
        return
    read, active = set(), set()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            read.update(id(p) for p in graph_module.get_submodule(node.target).parameters())
            active.add(node.target)
        elif node.op == "get_attr":
            read.add(id(_fetch(graph_module, node.target)))
            active.add(node.target.rpartition(".")[0])
    traced = dict(graph_module.named_parameters(remove_duplicate=False))
    ours = dict(reference.named_parameters(remove_duplicate=False))
    inactive = []
    for name, mask in masks.items():
        parameter = traced.get(name, ours.get(name))
        if id(parameter) in read or bool(torch.as_tensor(mask).bool().all()):
            continue
        owner = name.rpartition(".")[0]
        if not any(path == owner or path.startswith(owner + ".") or owner.startswith(path + ".") or not owner
                   for path in active):
            inactive.append(owner)
            continue
        removed = int((~torch.as_tensor(mask).bool()).sum())
        raise MaskError(
            f"mask for '{name}' removes {removed} entries of a parameter that {model_name}'s forward never "
            f"reads, although it calls '{owner}' (its traced graph has no use of that parameter): the mask would "
            "change nothing, and nothing there would get smaller. Drop it from the masks, or check the name "
            f"(squeeze_release: select={{'exclude': ['{name}']}}).")
    if inactive:
        warnings.warn(f"{model_name}'s forward never calls {', '.join(sorted(set(inactive))[:6])}"
                      f"{' and more' if len(set(inactive)) > 6 else ''} on these inputs: their masks change nothing "
                      "and these modules are not in the result (an inactive branch, e.g. an auxiliary head in eval "
                      "mode)", stacklevel=4)


def _fetch(root: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _require_finite(weights: ModuleWeights) -> None:
    """Each parameter and buffer as the masks leave it, one at a time: finite, or :class:`InputError`."""
    for name, _ in (*weights.root.named_parameters(), *weights.root.named_buffers()):
        weights.require_finite(name)
