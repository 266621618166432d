"""All per-op knowledge. Importing this package registers every rule fxmin ships in :data:`REGISTRY`.

The rule API is :mod:`fxmin.rules.api` (Rule, Registry, rule, the contexts, the edit records) and the
helpers rule families share are :mod:`fxmin.rules.kit`; each other module here is one family of rules.
"""
from .api import REGISTRY, Registry, Rule, rule  # noqa: F401
from . import attention, axes, embedding, indexing, linear, norm, pointwise, shape, sizes, structure  # noqa: F401,E402
from .pointwise import register_pointwise  # noqa: F401,E402
from . import functional  # noqa: F401,E402  (after the rules it extends)
from . import huggingface, mha  # noqa: F401,E402  (HF-traced ops; nn.MultiheadAttention)
from . import einsum, libraries, per_channel, recurrent, resample, stacking, ternary  # noqa: F401,E402
