"""CompensatedLayerNorm: a LayerNorm (or RMSNorm) over a residual stream whose dead or constant
channels have left, computing exactly what the full norm computed.

``layer_norm`` holds the module and its structure, ``forward_paths`` its arithmetic, ``compensate``
swaps a model's norms for it. See ``docs/compensated-layernorm.md``.
"""
from .compensate import compensate
from .layer_norm import CompensatedLayerNorm

__all__ = ["CompensatedLayerNorm", "compensate"]
