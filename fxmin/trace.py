"""Model -> GraphModule with shapes in ``node.meta``; clear errors when tracing fails."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError, TraceError


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self._leaves = leaves
        # Errors name the user's source line (describe_node reads node.meta["stack_trace"]).
        self.record_stack_traces = True

    def is_leaf_module(self, module, qualified_name):
        from .nn import CompensatedLayerNorm

        if isinstance(module, CompensatedLayerNorm):
            return True  # its forward checks shapes: a leaf, handled by the layer_norm rule
        if self._leaves and (isinstance(module, tuple(t for t in self._leaves if isinstance(t, type)))
                             or qualified_name in {t for t in self._leaves if isinstance(t, str)}):
            return True
        return super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, *, tracer: torch.fx.Tracer | None = None, leaf_modules: Iterable = (),
          concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (a GraphModule is used as it is).

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, torch.fx.GraphModule) and tracer is None and not leaf_modules and not concrete_args:
        return model
    tracer = tracer if tracer is not None else _LeafTracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:  # FX raises TraceError, TypeError, RuntimeError, AttributeError...
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}\n"
            "Ways out: mark the submodule that fails as a leaf (leaf_modules=[MyBlock] or ['path.to.block']), "
            "fix data-dependent Python control flow with concrete_args={'flag': value}, or pass a tracer "
            "that can trace it (tracer=..., e.g. transformers.utils.fx.HFTracer())."
        ) from error
    root = getattr(tracer, "root", None)
    return torch.fx.GraphModule(root if root is not None else model, graph, type(model).__name__)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs``, recording each node's shape and dtype in ``node.meta``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # concrete_args leave placeholders with a default value (``flag_1=True``): optional inputs.
    required = sum(1 for n in placeholders if not n.args)
    if not required <= len(example_inputs) <= len(placeholders):
        raise InputError(
            f"the model takes {len(placeholders)} input(s) ({', '.join(p.name for p in placeholders)}) but "
            f"{len(example_inputs)} example input(s) were given; pass example_inputs=(x, ...) with one tensor per input."
        )
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as error:
        raise InputError(
            f"the model failed on the example inputs ({_describe_inputs(example_inputs)}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _describe_inputs(inputs) -> str:
    return ", ".join(
        f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs
    )


def infer_example_inputs(gm: torch.fx.GraphModule) -> tuple:
    """Example inputs for a one-input model whose first reader is an ``nn.Linear``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) == 1:
        node = placeholders[0]
        reader = node
        while len(reader.users) == 1:
            reader = next(iter(reader.users))
            if reader.op == "call_module":
                module = gm.get_submodule(reader.target)
                if isinstance(module, nn.Linear):
                    dtype = module.weight.dtype
                    return (torch.randn(2, module.in_features, dtype=dtype, device=module.weight.device),)
                if isinstance(module, (nn.Dropout, nn.Identity)):
                    continue
            break
        first = next(iter(node.users), None)
        what = f"its first reader is '{first.name}'" if first is not None else "nothing reads it"
    else:
        what = f"the model takes {len(placeholders)} inputs"
    raise InputError(
        f"example_inputs are required: fxmin cannot infer the input shape ({what}; only a first "
        "nn.Linear reveals it). Pass example_inputs=(torch.randn(1, 3, 224, 224),) with the shapes your model takes."
    )
