"""Model or ``ExportedProgram`` -> the canonical GraphModule fxmin analyses, through ``torch.export``.

The front end for models ``torch.fx`` cannot trace (data-dependent Python control flow, current
Hugging Face models): :func:`export_trace` exports the model,
:func:`fxmin.canonical_export.canonical_graph` brings the program to one canonical form (NOTE
[Canonical export graph] there), and :func:`reexport` gives the minimized module the program's calling
convention again (``torch.export.save`` / ``load`` work on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

# the canonical form's public names, importable from here as before
from .canonical_export import CANONICAL_DECOMPOSITIONS, STALE_META, canonical_graph, exported_constants, lift  # noqa: F401
from .errors import InputError, TraceError
from .graph_helpers import share_module
from .weights import ModuleWeights


@dataclass
class CallingConvention:
    """How the exported model is called: ``in_spec`` of ``(args, kwargs)``, which flat leaves are the
    graph's tensor inputs (``tensor_leaves``), and ``out_spec`` of its outputs."""

    in_spec: TreeSpec
    out_spec: TreeSpec
    tensor_leaves: tuple
    args: tuple
    kwargs: dict


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from what ``minimize`` accepts: a tensor, a tuple of inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                     f"got {type(example_inputs).__name__}")


def export_program(model: nn.Module, example_inputs) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, kwargs, strict=False)``; a failure is a :class:`TraceError`."""
    if example_inputs is None:
        raise InputError("the export front end needs example_inputs: pass example_inputs=(x, ...) or a dict of "
                         "keyword inputs ({'input_ids': ids, 'use_cache': False})")
    args, kwargs = split_inputs(example_inputs)
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:
        raise TraceError(
            f"torch.export could not export {type(model).__name__}: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}\n"
            "Ways out: make the failing code export (torch._check for data-dependent sizes, torch.cond for "
            "branches on tensor values), or use the torch.fx front end (frontend='fx') with leaf_modules=[...] "
            "or concrete_args={...}."
        ) from error


def calling_convention(program: torch.export.ExportedProgram, example_inputs: tuple[tuple, dict]) -> CallingConvention:
    """The program's input and output structure, and which leaves of ``(args, kwargs)`` are graph inputs."""
    args, kwargs = example_inputs
    leaves, in_spec = tree_flatten((args, kwargs))
    tensors = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    return CallingConvention(in_spec, program.call_spec.out_spec, tensors, args, kwargs)


def export_trace(model: nn.Module, example_inputs) -> tuple[torch.fx.GraphModule, tuple, CallingConvention]:
    """Export ``model`` and canonicalize it: ``(graph module, flat tensor example inputs, calling convention)``."""
    program = export_program(model, example_inputs)
    convention = calling_convention(program, split_inputs(example_inputs))
    leaves, _ = tree_flatten((convention.args, convention.kwargs))
    return canonical_graph(program), tuple(leaves[i] for i in convention.tensor_leaves), convention


# NOTE [Exporting a model without its weights]
# torch.export runs the model on FakeTensors, but the tensors a model creates as it runs (causal masks,
# position ids, rotary tables) take the device of its parameters, so a model on the meta device exports
# a program that computes on no values. Its parameters are instead swapped, in a copy of its structure,
# for FakeTensors on the CPU (shapes and dtypes, no memory), which export traces through as it traces
# fake inputs; its meta buffers (running statistics, small) are read from the files, real, since
# export folds what is computed from them. The canonical graph then holds the model's own meta
# parameters again, under the names export gave them (the state-dict names), and the pass reads them
# from the files as on the torch.fx front end (NOTE [Weights from files] in fxmin/weights.py).


def export_without_weights(model: nn.Module, example_inputs, files) -> tuple[torch.fx.GraphModule, tuple, CallingConvention]:
    """:func:`export_trace` of ``model``, whose tensors are on the meta device and whose values ``files`` hold
    (NOTE [Exporting a model without its weights]); the graph holds ``model``'s meta parameters."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    source = ModuleWeights(model, files=files)
    shell = share_module(model)
    meta_parameters: dict = {}  # state-dict name -> the model's meta parameter
    fakes: dict = {}  # id(meta parameter) -> its fake CPU stand-in: tied parameters stay tied
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for path, module in shell.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.is_meta:
                continue
            source.stored_name(prefix + name, parameter)  # held by the files, or a clear error now
            meta_parameters[prefix + name] = parameter
            if id(parameter) not in fakes:
                with mode:
                    fakes[id(parameter)] = nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype),
                                                        parameter.requires_grad)
            module._parameters[name] = fakes[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = source.load(prefix + name)
    graph_module, inputs, convention = export_trace(shell, example_inputs)
    for name, _ in list(graph_module.named_parameters(remove_duplicate=False)):
        owner_path, _, leaf = name.rpartition(".")
        graph_module.get_submodule(owner_path).register_parameter(leaf, meta_parameters[name])
    return graph_module, inputs, convention


class CallWithConvention(nn.Module):
    """Calls a flat-input GraphModule as the exported model was called: ``forward(*args, **kwargs)``
    takes the model's inputs (non-tensor ones as given at export), returns its output structure. It
    holds the GraphModule's own submodules, parameters and buffers and runs its generated code on
    itself, so the state-dict names stay the model's (``layer1.0.conv1.weight``)."""

    def __init__(self, graph_module: torch.fx.GraphModule, convention: CallingConvention):
        super().__init__()
        for name, child in graph_module.named_children():
            self.add_module(name, child)
        for name, parameter in graph_module.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in graph_module.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self._graph_forward = type(graph_module).forward
        self.convention = convention

    def forward(self, *args, **kwargs):
        leaves, _ = tree_flatten((args, kwargs))
        outputs = self._graph_forward(self, *[leaves[i] for i in self.convention.tensor_leaves])
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        return tree_unflatten(outputs, self.convention.out_spec)


def reexport(graph_module: torch.fx.GraphModule, convention: CallingConvention) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``graph_module`` with the original program's calling convention."""
    wrapper = CallWithConvention(graph_module, convention)
    return torch.export.export(wrapper, tuple(convention.args), dict(convention.kwargs), strict=False)
