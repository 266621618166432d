"""Replacement modules that compute exactly what a full module computed, with channels gone:
CompensatedLayerNorm, a LayerNorm (or RMSNorm) over a residual stream whose dead or constant
channels have left, and SlicedMultiheadAttention (``attention``), a sliced nn.MultiheadAttention.

``layer_norm`` holds the module and its structure, ``forward_paths`` its arithmetic, ``compensate``
swaps a model's norms for it. See ``docs/compensated-layernorm.md``.
"""
from .attention import SlicedMultiheadAttention
from .compensate import compensate
from .layer_norm import CompensatedLayerNorm

__all__ = ["CompensatedLayerNorm", "SlicedMultiheadAttention", "compensate"]
