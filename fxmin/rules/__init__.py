"""All per-op knowledge. Importing this package registers every rule in :data:`REGISTRY`."""
from .registry import REGISTRY, Registry, Rule, rule  # noqa: F401
from . import attention, embedding, indexing, linear, norm, pointwise, shape, sizes, structure  # noqa: F401,E402
from .pointwise import register_pointwise  # noqa: F401,E402
from . import functional  # noqa: F401,E402  (after the rules it extends)
from . import huggingface, mha  # noqa: F401,E402  (HF-traced ops; nn.MultiheadAttention)
from . import libraries, per_channel, stacking  # noqa: F401,E402  (torchvision/timm ops: registered once imported)
