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
