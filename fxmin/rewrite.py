"""Plan -> new GraphModule. Installs what the plan says; decides nothing."""
from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from .graph_helpers import copy_module, free_name, moved, share_module
from .plan import Plan
from .progress import phase
from .weights import storage_key, weights_of


@phase("rewrite")
def rewrite(plan: Plan, dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """Build the minimized GraphModule.

    ``dtype=None`` gives each replaced module its original dtype; ``dtype=torch.float64`` builds the
    exact float64 version (folded constants not rounded). Every other weight is copied once from the
    analysed graph's weights, masked (NOTE [Weights on demand] in fxmin/weights.py). With ``dtype=None``
    the replaced modules hold the plan's own tensors (the plan stores them in the model's dtype, so
    the result holds them once, not twice). When the plan writes the result to files (``plan.files``),
    every other tensor is written there too as it is copied, and the result holds stand-ins on the meta
    device (NOTE [Results written as they are made] in fxmin/result_shards.py).
    """
    source = plan.graph_module
    if dtype is not None and plan.files is not None:
        raise ValueError("a plan whose result was written to files holds no tensors to build it in another dtype: "
                         "verification streams the float64 build from the files (NOTE [Results written as they are made])")
    store = plan.store
    graph = torch.fx.Graph()
    env: dict = {}
    attributes: dict = {}
    for node in source.graph.nodes:
        edit = plan.args.get(node.name)
        if edit is not None:
            args = torch.fx.node.map_arg(edit.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(edit.kwargs, env.__getitem__)
            new = graph.create_node(edit.op or node.op, edit.target if edit.target is not None else node.target,
                                    args, kwargs, name=node.name)
            new.meta = copy.copy(node.meta)
        else:
            new = graph.node_copy(node, env.__getitem__)
        operand = plan.operands.get(node.name)
        if operand is not None:  # NOTE [Constant operands]
            value = store(operand.target, operand.value.to(dtype if dtype is not None else operand.dtype))
            attributes[operand.target] = nn.Parameter(value, requires_grad=operand.trainable) if operand.trainable \
                else value
            with graph.inserting_before(new):
                new.update_arg(operand.index, graph.get_attr(operand.target))
        env[node] = new
        select = plan.inputs.get(node.name)
        if select is not None:
            buffer = free_name(source, f"_fxmin_input_{node.name}", attributes)
            attributes[buffer] = store(buffer, torch.as_tensor(select.index, dtype=torch.long))
            with graph.inserting_after(new):
                index = graph.get_attr(buffer)
            with graph.inserting_after(index):
                env[node] = graph.call_function(torch.index_select, (new, select.axis, index))
    for name in reversed(plan.dropped):  # NOTE [Constant operands]: readers first
        graph.erase_node(env[plan.analysis.node(name)])
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)  # e.g. the affine parameters of a norm replaced by a module
    load = _copies(source, store)
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in attributes:
            attributes[node.target] = _module(plan, source, node.target, dtype, load)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in attributes:
            attributes[node.target] = _attribute(plan, source, node.target, dtype, load)
    _retie(source, attributes, plan.modules)
    graph.lint()
    result = torch.fx.GraphModule(attributes, graph, class_name=f"Minimized{type(source).__name__}")
    result.eval()
    return result


def _copies(source, store):
    """``load(name)``: a copy of the (masked) tensor ``name`` of ``source``, one per tensor: a tied table read
    by two unchanged modules is copied once (NOTE [Weights on demand] in fxmin/weights.py), and handed to
    ``store(name, copy)`` (NOTE [Results written as they are made])."""
    weights, made = weights_of(source), {}

    def load(name: str) -> torch.Tensor:
        key = storage_key(weights.tensor(name))
        if key not in made:
            value = weights.load(name)
            fresh = value.numel() > 0 and value.data_ptr() != weights.tensor(name).data_ptr()
            made[key] = store(name, value if fresh else value.clone())
        return made[key]

    return load


def _module(plan: Plan, source, target: str, dtype, load):
    edit = plan.modules.get(target)
    if edit is not None:
        if dtype is None:
            shared = share_module(edit.module)
            return shared if plan.files is not None else moved(shared, edit.device)  # written: on the meta device
        values = dict(edit.module.named_parameters(remove_duplicate=False))
        values.update(edit.module.named_buffers(remove_duplicate=False))
        return copy_module(edit.module, dtype, edit.device, load=lambda name: edit.exact.get(name, values[name]))
    return copy_module(source.get_submodule(target), dtype, load=lambda name: load(f"{target}.{name}"))


def _attribute(plan: Plan, source, target: str, dtype, load):
    edit = plan.attrs.get(target)
    if edit is not None:
        floating = edit.dtype.is_floating_point or edit.dtype.is_complex
        value = edit.exact if edit.exact is not None and dtype is not None else edit.value
        value = value.to(dtype if dtype is not None and floating else edit.dtype)
        return nn.Parameter(value, requires_grad=edit.requires_grad) if edit.is_parameter else value
    module_path, _, name = target.rpartition(".")
    value = getattr(source.get_submodule(module_path), name)
    if isinstance(value, torch.Tensor):
        copied = load(target)
        if dtype is not None and copied.is_floating_point():
            copied = copied.to(dtype)
        return nn.Parameter(copied, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else copied
    return copy.deepcopy(value)


def _retie(source, attributes: dict, edited: dict) -> None:
    """Parameters shared in the model (tied embeddings) stay one Parameter when they still agree: when no
    module holding one was edited (copies of one tensor, cast alike, agree), or when the edited ones compare equal."""
    owners: dict = {}
    for target, value in attributes.items():
        if not isinstance(value, nn.Module):
            continue
        try:
            original = source.get_submodule(target)
        except AttributeError:
            continue
        for name, parameter in original.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append((value, name, target in edited))
    for members in owners.values():
        if len(members) < 2:
            continue
        first_module, first_name, _ = members[0]
        shared = getattr(first_module, first_name)
        if not any(was_edited for _, _, was_edited in members) or (not shared.is_meta and all(
                getattr(m, n) is not None and getattr(m, n).shape == shared.shape and torch.equal(getattr(m, n), shared)
                for m, n, _ in members[1:])):  # written ones (on the meta device) stay apart: both were written
            for module, name, _ in members[1:]:
                setattr(module, name, shared)
