"""``random_masks``: the one maker of random unstructured masks that the tests and the benchmarks share.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> sorted(random_masks(net, 0.5))   # every parameter with 2+ axes
['0.weight', '2.weight']
"""
from __future__ import annotations

import torch


def random_masks(model: torch.nn.Module, sparsity: float | None = None, seed: int = 0, names=None) -> dict:
    """Unstructured random masks on the parameters ``names`` (default: every parameter with 2+ axes), drawn
    in that order from one seeded generator. ``sparsity``: each entry is masked with that probability;
    None: each tensor first draws its own density (kept fraction) in [0.1, 0.5]."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    names = [name for name, p in parameters.items() if p.dim() >= 2] if names is None else list(names)
    masks = {}
    for name in names:
        shape = parameters[name].shape
        if sparsity is None:
            density = 0.1 + 0.4 * float(torch.rand((), generator=generator))
            masks[name] = torch.rand(shape, generator=generator) < density
        else:
            masks[name] = torch.rand(shape, generator=generator) >= sparsity
    return masks
