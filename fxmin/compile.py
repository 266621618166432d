"""torch.compile and torch.export integration.

NOTE [Lifted parameters]
Dynamo (torch >= 2.x with inlined built-in modules) and ``torch.export`` hand over graphs whose
parameters and buffers are *inputs* (placeholders), not ``get_attr`` nodes. fxmin can only
shrink what it owns, so :func:`fxmin.canonical_export.lift` turns each such placeholder back into a ``get_attr`` of a
module attribute with the parameter's qualified name (``layer1.0.conv1.weight``), which is
also the name masks use. The values are frozen at compile time: the compiled function
computes with the weights the model had then (inference, as with ``torch.compile`` freezing).

Parameters are recognised by identity when the model is known (``backend(..., model=net)``),
else by Dynamo's ``source`` (``L['self']._modules['conv']._parameters['weight']``), and for
``torch.export`` by the graph signature.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Mapping

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import FxminError, InputError
from .minimize import MinimizeResult, minimize
from .canonical_export import STALE_META, canonical_graph, lift
from .trace_export import calling_convention, split_inputs

log = logging.getLogger(__name__)

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.([A-Za-z_]\w*)")


def _source_name(node) -> tuple[str | None, bool]:
    """(qualified name, is a parameter/buffer) from Dynamo's source of a placeholder."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None, False
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
    if "_parameters[" not in name and "_buffers[" not in name:
        return None, False
    body = name.split("]", 1)[1] if name.startswith(("L[", "G[")) else name  # drop L['self'] / G['model']
    parts = [a or b for a, b in _SOURCE_PART.findall(body)]
    return (".".join(parts) if parts else None), True


def _dynamo_constants(graph_module, example_inputs, model: nn.Module | None) -> dict:
    by_id = {}
    if model is not None:
        by_id = {id(t): name for name, t in model.named_parameters(remove_duplicate=False)}
        by_id.update({id(t): name for name, t in model.named_buffers(remove_duplicate=False)})
    constants = {}
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        name = by_id.get(id(value))
        if name is None:
            name, known = _source_name(node)
            if name is None and (known or isinstance(value, nn.Parameter)):
                name = f"_fxmin_constant_{index}"
        if name is not None:
            constants[node.name] = (name, value, isinstance(value, nn.Parameter))
    return constants


def minimize_graph(graph_module: torch.fx.GraphModule, constants: Mapping[str, tuple], masks: Mapping | None,
                   example_inputs: Iterable, **options) -> tuple[MinimizeResult, list]:
    """Lift ``constants`` to attributes, then :func:`fxmin.minimize`. Returns (result, input positions kept)."""
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    positions = [i for i, n in enumerate(placeholders) if n.name not in constants]
    lifted = lift(graph_module, constants)
    names = {qualified for qualified, _, _ in constants.values()}
    used = None if masks is None else {k: v for k, v in masks.items() if k in names}
    inputs = tuple(list(example_inputs)[i] for i in positions)
    return minimize(lifted, used, inputs, **options), positions


def backend(masks: Mapping | None = None, inner: str | Callable = "inductor", *, model: nn.Module | None = None,
            on_error: str = "raise", **options) -> Callable:
    """A ``torch.compile`` backend that minimizes each captured graph, then hands it to ``inner``.

    ``masks`` map the model's parameter names to masks (``None``: the exact zeros in the weights);
    ``inner`` is a backend name (``"inductor"``, ``"eager"``, ...) or callable; ``model`` (optional)
    matches lifted parameters by identity instead of by Dynamo's source names; ``on_error="fallback"``
    compiles a graph unminimized (with a warning) when fxmin cannot handle it. Other ``options`` go
    to :func:`fxmin.minimize` (``barriers``, ``verify``, ...). Weights are frozen at compile time.
    ``.results`` lists the :class:`MinimizeResult` of every graph compiled so far.

    >>> compiled = torch.compile(net, backend=fxmin.backend(masks, inner="eager"))  # doctest: +SKIP
    >>> compiled(x)  # the masked model's outputs, computed by the smaller graph  # doctest: +SKIP
    """
    if on_error not in ("raise", "fallback"):
        raise InputError(f"on_error must be 'raise' or 'fallback', got {on_error!r}")
    if options.get("write_to") is not None:
        raise InputError("a compiled graph runs with its weights in memory: write_to= is for fxmin.minimize")

    def inner_backend():
        if callable(inner):
            return inner
        from torch._dynamo import lookup_backend

        return lookup_backend(inner)

    def compile_graph(graph_module: torch.fx.GraphModule, example_inputs):
        try:
            constants = _dynamo_constants(graph_module, example_inputs, model)
            result, positions = minimize_graph(graph_module, constants, masks, example_inputs, **options)
        except FxminError as error:
            if on_error == "raise":
                raise
            log.warning("fxmin: compiling a graph unminimized: %s", error)
            return inner_backend()(graph_module, example_inputs)
        compile_graph.results.append(result)
        module = result.module
        for node in module.graph.nodes:
            for key in STALE_META:
                node.meta.pop(key, None)
        compiled = inner_backend()(module, [example_inputs[i] for i in positions])

        def run(*args):
            return compiled(*[args[i] for i in positions])

        return run

    compile_graph.results = []
    return compile_graph


# -- torch.export --------------------------------------------------------------------------------------

def minimize_exported(program, masks: Mapping | None = None, example_inputs=None, **options):
    """Minimize a ``torch.export.ExportedProgram``; returns ``(new ExportedProgram, MinimizeResult)``.

    The program is brought to fxmin's canonical form (NOTE [Canonical export graph] in
    :mod:`fxmin.canonical_export`), minimized, and exported again with its calling convention.
    ``example_inputs`` default to the program's own (``program.example_inputs``); give a tuple of
    positional inputs, a dict of keyword inputs or an ``(args, kwargs)`` pair otherwise. ``masks``
    use the program's state-dict names (``layer1.0.conv1.weight``). Other ``options`` go to
    :func:`fxmin.minimize`.

    >>> program = torch.export.export(net, (x,))  # doctest: +SKIP
    >>> smaller, result = fxmin.minimize_exported(program, masks)  # doctest: +SKIP
    """
    if example_inputs is None:
        example_inputs = getattr(program, "example_inputs", None)
        if example_inputs is None:
            raise InputError("this ExportedProgram holds no example inputs; pass example_inputs=(x, ...)")
    if not (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict)):
        example_inputs = split_inputs(example_inputs)
    if options.get("write_to") is not None:
        raise InputError("minimize_exported returns an ExportedProgram, which holds its weights: write_to= is for "
                         "fxmin.minimize; write the program's weights with fxmin.shards.write_shards("
                         "program.state_dict.items(), directory)")
    graph_module = canonical_graph(program)
    convention = calling_convention(program, example_inputs)
    leaves, _ = tree_flatten(example_inputs)
    inputs = tuple(leaves[i] for i in convention.tensor_leaves)
    user = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if len(user) != len(inputs):
        raise InputError(f"the exported program takes {len(user)} tensor input(s), {len(inputs)} example input(s) given")
    result = minimize(graph_module, masks, inputs, frontend="fx", **options)
    result.frontend, result.convention, result.report.frontend = "export", convention, "export"
    return result.program, result


def export(result: MinimizeResult, example_inputs=None, **kwargs):
    """``torch.export.export`` of a minimized module (on the example inputs it was minimized with)."""
    inputs = tuple(example_inputs) if example_inputs is not None else tuple(result.example_inputs)
    return torch.export.export(result.module, inputs, **kwargs)
