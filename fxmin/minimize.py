"""``minimize``: trace -> analyze -> plan -> rewrite -> verify."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.fx
from torch import nn

from .analysis import Analysis, analyze_graph
from .masks import masked_reference, model_device, to_device
from .plan import Plan, make_plan
from .report import Report, build_report
from .rewrite import rewrite
from .trace import arrange_inputs, infer_example_inputs, propagate_shapes, trace
from .verify import verify as verify_equivalence


@dataclass
class MinimizeResult:
    """``module``: the smaller GraphModule; ``report``: what changed and the errors measured;
    ``plan``: what each parameter keeps and where constants were folded; ``analysis``: the facts."""

    module: torch.fx.GraphModule
    report: Report
    plan: Plan
    analysis: Analysis
    reference: torch.fx.GraphModule
    masks: dict
    example_inputs: tuple


def prepare(model: nn.Module, masks: Mapping | None = None, example_inputs=None, *, tracer=None,
            leaf_modules: Iterable = (), concrete_args=None):
    """Masked reference copy, traced with shapes: ``(graph_module, masks applied, example inputs)``; all
    three on the CPU, where the analysis reads parameter values (whatever device ``model`` is on)."""
    host = model_device(model).type != "cpu"
    reference, used_masks = masked_reference(model, masks, host=host)
    graph_module = trace(reference, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
    graph_module.eval()
    if example_inputs is None:
        example_inputs = infer_example_inputs(graph_module)
    elif isinstance(example_inputs, Mapping):
        example_inputs = arrange_inputs(graph_module, example_inputs)
    example_inputs = to_device(example_inputs, "cpu")  # a bare tensor becomes a 1-tuple
    propagate_shapes(graph_module, example_inputs)
    return graph_module, used_masks, example_inputs


def minimize(model: nn.Module, masks: Mapping | None = None, example_inputs=None, *, tracer=None,
             leaf_modules: Iterable = (), concrete_args=None, barriers: Iterable = (), verify: bool = True,
             trials: int = 2, tolerances: dict | None = None, seed: int = 0) -> MinimizeResult:
    """Return a physically smaller GraphModule that computes ``model`` with ``masks`` applied.

    ``masks`` maps parameter names (as in ``model.named_parameters()``) to bool or 0/1 tensors of the
    same shape; ``None`` reads ``torch.nn.utils.prune`` masks, else the exact zeros in the weights.
    ``barriers`` (module paths, node names, module types or functions) keep every channel around
    those ops. ``verify`` checks the result in float64 and in the model's dtype on the example inputs and
    ``trials`` random ones, each dtype held to its tolerance (``fxmin.verify.TOLERANCES``; ``tolerances``
    overrides them per dtype, e.g. ``{torch.bfloat16: 0.1}``). The model and the masks are never modified. A model on an accelerator is analysed,
    rewritten and verified as a CPU copy (float64 there); ``module`` and ``reference`` are returned on
    the model's device.

    >>> import torch, fxmin
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> mask = torch.ones(8, 4, dtype=torch.bool); mask[5:] = False
    >>> result = fxmin.minimize(net, {"0.weight": mask})
    >>> result.module.get_submodule("0").out_features  # 3 units with no input fold into the next bias
    5
    """
    graph_module, used_masks, example_inputs = prepare(model, masks, example_inputs, tracer=tracer,
                                                       leaf_modules=leaf_modules, concrete_args=concrete_args)
    analysis = analyze_graph(graph_module, barriers)
    plan = make_plan(analysis)
    module = rewrite(plan)
    verification = None
    if verify:
        verification = verify_equivalence(graph_module, module, example_inputs, exact_result=rewrite(plan, torch.float64),
                                          plan=plan, trials=trials, seed=seed, tolerances=tolerances)
    report = build_report(plan, graph_module, module, verification)
    device = model_device(model)
    if device.type != "cpu":
        module, graph_module = module.to(device), graph_module.to(device)
        example_inputs = to_device(example_inputs, device)
    return MinimizeResult(module, report, plan, analysis, graph_module, used_masks, example_inputs)
