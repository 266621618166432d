"""Model -> GraphModule with shapes in ``node.meta``; clear errors when tracing fails."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Iterable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import InputError, TraceError
from .progress import phase
from .rules.api import REGISTRY
from .shape_only import product_placeholder, values_needed
from .weights import Unread, call_loaded, read_unread, weights_of


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self._leaves = leaves
        self._parameter_names = None  # (root, {id(parameter): its first name}), for getattr

    def create_node(self, *args, **kwargs):
        # Errors name the user's source line (describe_node reads node.meta["stack_trace"]).
        # NOTE [Stack traces]: torch's own recorder (record_stack_traces=True) symbolizes frames
        # with CapturedTraceback, whose first use imports torch._dynamo and torch._inductor
        # (several seconds of CPU per process); the stdlib traceback module gives the same lines.
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            node.stack_trace = _user_stack_trace()
        return node

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # torch.fx looks a parameter's name up by walking every parameter of the model at each access;
        # this finds the same (first) name in a table made once per traced model
        if isinstance(attr_val, torch.nn.Parameter):
            if self._parameter_names is None or self._parameter_names[0] is not self.root:
                self._parameter_names = (self.root, {})
                for name, parameter in self.root.named_parameters():
                    self._parameter_names[1].setdefault(id(parameter), name)
            name = self._parameter_names[1].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, module, qualified_name):
        from .compensated.layer_norm import CompensatedLayerNorm

        if isinstance(module, CompensatedLayerNorm):
            return True  # its forward checks shapes: a leaf, handled by the layer_norm rule
        found = REGISTRY.lookup_module(module)  # library rules are registered before tracing (trace())
        if found is not None and found.leaf:
            return True  # a rule that reads the module whole (Rule.leaf)
        if self._leaves and (isinstance(module, tuple(t for t in self._leaves if isinstance(t, type)))
                             or qualified_name in {t for t in self._leaves if isinstance(t, str)}):
            return True
        return super().is_leaf_module(module, qualified_name)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXMIN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stack_trace() -> str | None:
    """The frames from the first ``forward`` on, without torch's and fxmin's own (as torch.fx does).

    The same text as filtering ``traceback.extract_stack()``, but only the user's frames have their
    source lines looked up (the stack under a trace is deep: torch.fx's and the model's calls)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()  # outermost first, as extract_stack lists them
    for index, frame in enumerate(frames):
        if frame.f_code.co_name == "forward":
            user = [(f, f.f_lineno) for f in frames[index:] if not f.f_code.co_filename.startswith((_TORCH_DIR, _FXMIN_DIR))]
            return "".join(traceback.StackSummary.extract(user).format()).strip() or None
    return None


@phase("trace")
def trace(model: nn.Module, *, tracer: torch.fx.Tracer | None = None, leaf_modules: Iterable = (),
          concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (a GraphModule is used as it is).

    ``tracer`` is a ``torch.fx.Tracer`` (its ``trace`` gives the graph) or a function from the
    model to a GraphModule, such as transformers' ``symbolic_trace`` with its ``input_names``.

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, torch.fx.GraphModule) and tracer is None and not leaf_modules and not concrete_args:
        return model
    if tracer is not None and not isinstance(tracer, torch.fx.Tracer) and callable(tracer):
        # a tracing function model -> GraphModule, e.g.
        # functools.partial(transformers.utils.fx.symbolic_trace, input_names=["input_ids"])
        try:
            traced = tracer(model)
        except Exception as error:
            raise TraceError(f"the tracer {tracer!r} could not trace {type(model).__name__}: "
                             f"{type(error).__name__}: {error}") from error
        if not isinstance(traced, torch.fx.GraphModule):
            raise TraceError(f"the tracer {tracer!r} returned a {type(traced).__name__}, not a torch.fx.GraphModule")
        return traced
    tracer = tracer if tracer is not None else _LeafTracer(tuple(leaf_modules))
    # NOTE [Register before tracing]: the rules of a loaded library (REGISTRY.defer) read its functions
    # now: while FX traces, it swaps the functions marked with torch.fx.wrap for wrappers in their modules
    REGISTRY.register_imported()
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


@phase("trace (shapes)")
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
    try:  # NOTE [Products computed for their shape alone]; a failure there is decided by a full run
        with torch.no_grad():
            _ShapeRecorder(gm, skip_products=True).run(*example_inputs)
        return
    except Exception:
        pass
    recorder = _ShapeRecorder(gm, skip_products=False)
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as error:
        where = f" at node '{recorder.current.name}'" if recorder.current is not None else ""
        raise InputError(
            f"the model failed on the example inputs ({_describe_inputs(example_inputs)}){where}: "
            f"{type(error).__name__}: {str(error).split(_INTERPRETER_NOTE)[0].strip()}. Pass example inputs the model "
            "accepts: the shapes, dtypes and device of a real batch"
        ) from error


_INTERPRETER_NOTE = "\n\nWhile executing"  # what torch.fx.Interpreter appends to the error message


class _ShapeRecorder(torch.fx.Interpreter):
    """``ShapeProp`` without its import of ``torch.fx.experimental.symbolic_shapes`` (and sympy),
    which costs seconds in every fresh process: records ``tensor_meta`` and ``type`` the same way.
    ``skip_products``: products whose values no op reads for a shape are not computed (NOTE [Products
    computed for their shape alone] in fxmin/shape_only.py)."""

    current = None

    def __init__(self, gm: torch.fx.GraphModule, skip_products: bool):
        super().__init__(gm)
        self.files = weights_of(gm) if any(t.is_meta for t in (*gm.parameters(), *gm.buffers())) else None
        self.needed = values_needed(gm) if skip_products else None

    def _placeholder(self, node) -> torch.Tensor | None:
        if self.needed is None or node.name in self.needed or node.op not in ("call_module", "call_function"):
            return None
        def fetch():  # a weight not read yet stays so: only its shape and dtype are looked at
            return torch.fx.node.map_aggregate(super(_ShapeRecorder, self).fetch_args_kwargs_from_env(node), _unread_tensor)

        return product_placeholder(node, self.module, fetch)

    # NOTE [Weights from files] (fxmin/weights.py): a model built on the meta device runs with each
    # weight read from its files at the node that uses it, and let go (what the streamed verification
    # does; NOTE [Weights read where they are used]).
    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return Unread(target, value) if self.files is not None and getattr(value, "is_meta", False) else value

    def fetch_args_kwargs_from_env(self, node):
        args, kwargs = super().fetch_args_kwargs_from_env(node)
        return read_unread((args, kwargs), self.files.load) if self.files is not None else (args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        if self.files is None or not any(t.is_meta for _, t in named):
            return super().call_module(target, args, kwargs)
        return call_loaded(module, target, self.files.load, args, kwargs)

    def run_node(self, node):
        self.current = node
        result = self._placeholder(node)
        result = super().run_node(node) if result is None else result
        found = []

        def extract(value):
            if isinstance(value, torch.Tensor):
                found.append(value)
                return _extract_tensor_metadata(value, include_contiguity=False)  # contiguity checks import sympy
            return value

        meta = torch.fx.node.map_aggregate(result, extract)
        if found:
            node.meta["tensor_meta"] = meta
        node.meta["type"] = type(result)
        self.current = None
        return result


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


def arrange_inputs(gm: torch.fx.GraphModule, inputs) -> tuple:
    """Keyword example inputs (``{"input_ids": ids, "attention_mask": mask}``) in the order of the
    graph's placeholders; inputs not given fall back to the placeholder's default.

    >>> gm = trace(torch.nn.Linear(4, 2))
    >>> [tuple(x.shape) for x in arrange_inputs(gm, {"input": torch.randn(3, 4)})]
    [(3, 4)]
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.target for n in placeholders]
    unknown = [name for name in inputs if name not in names]
    if unknown:
        raise InputError(f"example input(s) {unknown} name no input of the model; its inputs are {names}.")
    arranged = []
    for node in placeholders:
        if node.target in inputs:
            arranged.append(inputs[node.target])
        elif node.args:
            arranged.append(node.args[0])
        else:
            raise InputError(f"example input '{node.target}' is missing; the model's inputs are {names}.")
    return tuple(arranged)


def _unread_tensor(value):
    """The tensor an :class:`Unread` stands for (its shape and dtype; it stays unread), else ``value``."""
    return value.tensor if isinstance(value, Unread) else value
