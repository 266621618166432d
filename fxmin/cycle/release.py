"""Release, the inverse of pruning: the exact zeros left inside compacted weights become small noise,
calibrated so that the output moves by less than a tolerance (the "release" of Squeeze-Release)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..masks import model_device, to_device
from .criteria import prunable
from ..verify import full_precision


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
