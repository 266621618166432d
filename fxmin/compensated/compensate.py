"""``compensate``: a copy of a model with every LayerNorm it can replace turned into an equal
:class:`~fxmin.compensated.layer_norm.CompensatedLayerNorm` (bit for bit the same output), so that it trains as it will be
minimized."""
from __future__ import annotations

import copy

from torch import nn

from .layer_norm import CompensatedLayerNorm

__all__ = ["compensate"]


def compensate(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LayerNorm replaced by an equal :class:`CompensatedLayerNorm`.

    Replaced: ``nn.LayerNorm`` and ``nn.RMSNorm`` with a 1-D ``normalized_shape``, and
    ``nn.GroupNorm(1, C)``, including subclasses that do not override ``forward``. A subclass that
    overrides ``forward`` (the channels-first ``LayerNorm2d`` of timm and torchvision permutes
    around ``F.layer_norm``) is left as it is: swapping the module would drop its own forward;
    ``fxmin.minimize`` handles its ``F.layer_norm`` call in the traced graph instead. A module
    shared under several names becomes one shared CLN. Hooks on replaced modules are not copied.
    The output is bit for bit the same; ``model`` is not modified.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    >>> type(compensate(model)[1]).__name__, type(model[1]).__name__
    ('CompensatedLayerNorm', 'LayerNorm')
    """
    result = copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}
    targets = []
    for name, module in result.named_modules(remove_duplicate=False):
        if id(module) not in replaced:
            replacement = _compensated(module)
            if replacement is None:
                continue
            replaced[id(module)] = replacement
        targets.append((name, replaced[id(module)]))
    for name, replacement in targets:
        if not name:
            return replacement
        parent_name, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent_name), child, replacement)
    return result



def _compensated(module: nn.Module) -> CompensatedLayerNorm | None:
    """The CLN for a module ``compensate`` replaces, else ``None``."""
    kinds = ((nn.LayerNorm, CompensatedLayerNorm.from_layer_norm),
             (nn.RMSNorm, CompensatedLayerNorm.from_rms_norm),
             (nn.GroupNorm, CompensatedLayerNorm.from_group_norm))
    for base, convert in kinds:
        if isinstance(module, base) and type(module).forward is base.forward:
            if base is nn.GroupNorm and module.num_groups != 1:
                return None
            if base is not nn.GroupNorm and len(module.normalized_shape) != 1:
                return None
            return convert(module)
    return None
