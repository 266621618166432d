"""An ``ExportedProgram`` -> the one canonical GraphModule fxmin analyses (:func:`canonical_graph`),
and the helpers that turn lifted placeholders back into module attributes (:func:`lift`,
:func:`exported_constants`). :mod:`fxmin.trace_export` exports models and calls this.

NOTE [Canonical export graph]
An exported program can take many forms (training IR with in-place ops, core ATen after the default
decompositions, lifted parameters, higher-order ops with submodule bodies). fxmin analyses one:

1. **Functional ATen with the high-level ops kept**: ``program.run_decompositions({})``. The empty
   table functionalizes (``relu_``, ``add_``, ``silu_``, ``hardswish_`` become ``relu``, ``add``...:
   no rule for an in-place op is needed) and lowers to inference IR, but decomposes nothing else:
   ``linear``, ``conv2d``, ``layer_norm``, ``group_norm``, ``embedding``, ``matmul``, ``softmax``,
   ``scaled_dot_product_attention`` stay one node each, with their torch-level signatures, so one rule
   serves ``F.linear`` and ``aten.linear.default`` alike. ``torch.export.default_decompositions()``
   (core ATen, even with those entries deleted) splits the rest into ``permute``/``addmm``/``expand``/
   ``bmm`` chains, each needing a rule of its own and hiding the layer a unit belongs to.
2. **BatchNorm as ``aten.batch_norm``**: inference IR writes eval BatchNorm as
   ``_native_batch_norm_legit_no_training(...)[0]``; the same values as ``aten.batch_norm(...,
   training=False, ...)``, which the functional BatchNorm rule reads.
3. **Parameters as ``get_attr`` nodes** named by their state-dict names (the masks' names), the
   user's tensor inputs as placeholders in call order; a non-tensor input (``use_cache=False``) was a
   constant of the export, its placeholder is replaced by the value (NOTE [Lifted parameters]).
4. **Higher-order ops inlined**: export wraps ``torch.no_grad()`` and ``torch.autocast`` regions
   (Hugging Face's rotary tables) in ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` calls
   whose body is a submodule; the lowering to inference IR in step 1 inlines them (in inference only
   the grad mode differs; autocast regions are traced with the dtypes they produce). Other
   higher-order ops (``cond``, ``map``...) stay and meet a MissingRuleError naming them.
5. **Shapes on every node**: export's ``meta["val"]`` FakeTensors become ``meta["tensor_meta"]``,
   what the analysis reads; ``meta["stack_trace"]`` is kept, so errors name the user's source line.
6. Input-metadata assertions (``_assert_tensor_metadata``) compute nothing and are dropped.
7. **Constants folded**: a value that depends on no input value and no parameter (rotary cos/sin
   tables computed from an ``inv_freq`` buffer, causal masks built from ``arange``, ``new_ones`` of
   an input's static shape) is computed once and read as a buffer (``_folded_<node>``), as torch.fx
   records such values; the rules then see a model constant they can slice and fold (a computed
   value would keep every channel it touches). Parameters are never folded (they stay trainable),
   nor are random ops.
8. **Slicing as indexing**: ``aten.slice.Tensor(x, dim, start, end, step)`` and ``aten.select.int(x,
   dim, i)`` become ``x[:, ..., start:end:step]`` and ``x[:, ..., i]`` (``operator.getitem``), what
   torch.fx records for the same Python code; the indexing rule follows slices of channels (rotary
   halves, a class token) there.
9. **No-op casts removed**: export bakes ``x.to(y.dtype)`` as ``_to_copy(x, dtype=torch.float32)``, a literal
   dtype; where it equals ``x``'s dtype (and the device too) the cast is the identity and goes, as does
   a ``dtype=`` argument of ``softmax`` equal to its input's. The graph then computes in whatever dtype
   it is run, as the model's code did (verification runs it in float64).
10. **Views as reshapes**: ``aten.view`` and ``aten._unsafe_view`` become ``aten.reshape`` (the same
   values; the view/reshape rule reads one target).
"""
from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import InputError

aten = torch.ops.aten

#: the decomposition table of the canonical form (NOTE [Canonical export graph])
CANONICAL_DECOMPOSITIONS: dict = {}

#: the compilers' node metadata (FakeTensors, Dynamo's graph arguments) that goes stale when a graph is rewritten
STALE_META = ("example_value", "val", "tensor_meta", "grapharg", "unbacked_bindings")
_DROPPED = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default, aten._assert_async.msg)


def lift(graph_module: torch.fx.GraphModule, constants: Mapping[str, tuple], *,
         keep_meta: bool = False) -> torch.fx.GraphModule:
    """A GraphModule where each placeholder named in ``constants`` reads a module attribute instead.

    ``constants`` maps placeholder name -> (qualified attribute name, tensor, is_parameter). The
    tensors (detached, sharing the program's storage: never written to) are held as parameters/buffers
    of nested modules, so ``named_parameters()`` gives the qualified names. Other placeholders stay
    inputs, in order.
    ``keep_meta=False`` drops the compiler's metadata (FakeTensors) from the copied nodes.
    """
    root = nn.Module()
    graph = torch.fx.Graph()
    env = {}
    made = {}  # id(source tensor) -> the parameter/buffer made for it: tied weights stay one tensor
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in constants:
            qualified, tensor, is_parameter = constants[node.name]
            owner = root
            *path, leaf = qualified.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if not hasattr(owner, leaf):
                value = made.get(id(tensor))
                if value is None:
                    value = tensor.detach()  # shared, never written (NOTE [Weights on demand] in fxmin/weights.py)
                    if is_parameter:
                        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    made[id(tensor)] = value
                if is_parameter:
                    owner.register_parameter(leaf, value)
                else:
                    owner.register_buffer(leaf, value)
            env[node] = graph.get_attr(qualified)
            if keep_meta:
                env[node].meta = dict(node.meta)
            continue
        new = graph.node_copy(node, env.__getitem__)
        if not keep_meta:
            for key in STALE_META:
                new.meta.pop(key, None)
        env[node] = new
    # Placeholders must come first: move the new get_attr nodes after them.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if placeholders:
        anchor = placeholders[-1]
        for node in [n for n in graph.nodes if n.op == "get_attr"]:
            anchor.append(node)
            anchor = node
    graph.lint()
    return torch.fx.GraphModule(root, graph, class_name=type(graph_module).__name__)


def exported_constants(program: torch.export.ExportedProgram) -> dict:
    """placeholder name -> (state-dict name, tensor, is_parameter) for the program's lifted parameters,
    buffers and constant tensors."""
    state = program.state_dict
    constants = {}
    for spec in program.graph_signature.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            tensor = state[spec.target] if spec.target in state else program.constants[spec.target]
            constants[spec.arg.name] = (spec.target, tensor, kind == "PARAMETER")
        elif kind == "CONSTANT_TENSOR":
            constants[spec.arg.name] = (spec.target, program.constants[spec.target], False)
        elif kind != "USER_INPUT":
            raise InputError(f"fxmin cannot minimize a program with a {kind} input ('{spec.arg.name}'); "
                             "export the model without it")
    return constants


def canonical_graph(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The canonical GraphModule of ``program`` (NOTE [Canonical export graph]): functional ATen with
    the high-level ops kept, parameters as ``get_attr``, higher-order ops inlined, shapes in
    ``meta["tensor_meta"]``. Its placeholders are the program's tensor user inputs, in order."""
    program = program.run_decompositions(CANONICAL_DECOMPOSITIONS)
    mutated = [spec for spec in program.graph_signature.output_specs if spec.kind.name != "USER_OUTPUT"]
    if mutated:
        names = ", ".join(f"{s.kind.name.lower()} '{s.target or s.arg.name}'" for s in mutated)
        raise InputError(f"the exported program writes state ({names}); fxmin minimizes inference graphs: "
                         "export the model in eval mode (model.eval()) without in-place writes to buffers")
    constants = exported_constants(program)
    source = program.graph_module
    graph_module = lift(source, constants, keep_meta=True)
    graph = graph_module.graph
    user_inputs = {spec.arg.name: spec.arg for spec in program.graph_signature.input_specs
                   if spec.kind.name == "USER_INPUT"}
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        argument = user_inputs.get(node.name)
        if argument is not None and not isinstance(argument, torch.export.graph_signature.TensorArgument):
            node.replace_all_uses_with(getattr(argument, "value", None))  # a constant of the export
            graph.erase_node(node)
    _batch_norm_as_aten_batch_norm(graph)
    _slicing_as_indexing(graph)
    _drop_no_op_casts(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default  # NOTE step 10
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPPED and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        _record_tensor_meta(node)
    _fold_constants(graph_module)
    if _returns_one_tensor(program):  # a model returning one tensor: the graph returns it, not a 1-tuple
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        if isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1:
            output.args = (output.args[0][0],)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
    graph.lint()
    graph_module.recompile()
    return graph_module


#: ops whose value depends on argument 0's shape and dtype only (static under export), not on its values
_SHAPE_ONLY = (aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.ones_like.default,
               aten.zeros_like.default, aten.full_like.default)


def _fold_constants(graph_module: torch.fx.GraphModule) -> None:
    """Compute once what depends on no input value and no parameter; read it as a buffer (NOTE step 7)."""
    graph = graph_module.graph
    parameters = {name for name, _ in graph_module.named_parameters()}
    constant: dict = {}  # node -> its value
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in parameters:
            constant[node] = _attribute(graph_module, node.target)
            continue
        if node.op != "call_function" or not _foldable_op(node):
            continue
        inputs = node.all_input_nodes
        shape_source = node.args[0] if node.target in _SHAPE_ONLY else None
        if not all(n in constant or n is shape_source for n in inputs):
            continue
        values = constant
        if shape_source is not None and shape_source not in constant:
            value = shape_source.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            values = {**constant, shape_source: torch.zeros(value.shape, dtype=value.dtype)}  # its values are unread
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
        constant[node] = node.target(*args, **kwargs)
    for node, value in constant.items():
        if node.op == "get_attr" or all(user in constant for user in node.users):
            continue
        if isinstance(value, torch.Tensor):
            name = _free_attribute(graph_module, f"_folded_{node.name}")
            graph_module.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                folded = graph.get_attr(name)
            folded.meta = dict(node.meta)
        elif isinstance(value, (int, float, bool)):
            folded = value
        else:
            continue
        node.replace_all_uses_with(folded, delete_user_cb=lambda user: user not in constant)


def _foldable_op(node: torch.fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable \
        and torch.Tag.nondeterministic_seeded not in node.target.tags


def _attribute(graph_module: torch.nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(graph_module.get_submodule(owner) if owner else graph_module, name)


def _free_attribute(graph_module: torch.nn.Module, base: str) -> str:
    name, index = base, 0
    while hasattr(graph_module, name):
        index += 1
        name = f"{base}_{index}"
    return name


def _returns_one_tensor(program: torch.export.ExportedProgram) -> bool:
    """The program returns one tensor (its output structure is a leaf)."""
    return program.call_spec.out_spec.is_leaf()


def _batch_norm_as_aten_batch_norm(graph: torch.fx.Graph) -> None:
    """``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]`` ->
    ``aten.batch_norm(x, w, b, mean, var, False, momentum, eps, False)`` when only output 0 is read."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._native_batch_norm_legit_no_training.default:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        x, weight, bias, mean, var, momentum, eps = node.args
        for user in users:
            with graph.inserting_before(user):
                new = graph.call_function(aten.batch_norm.default,
                                          (x, weight, bias, mean, var, False, momentum, eps, False))
            new.meta = dict(user.meta)
            new.meta["stack_trace"] = node.meta.get("stack_trace", user.meta.get("stack_trace"))
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        graph.erase_node(node)


def _drop_no_op_casts(graph: torch.fx.Graph) -> None:
    """Casts to the dtype (and device) their input already has are identities (NOTE step 9)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, torch.fx.Node):
            continue
        value = node.args[0].meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        kwargs = dict(node.kwargs)
        if node.target is aten._to_copy.default and len(node.args) == 1:
            device = kwargs.pop("device", value.device)
            if kwargs.pop("dtype", value.dtype) == value.dtype and torch.device(device) == value.device \
                    and kwargs.pop("layout", torch.strided) == torch.strided and not kwargs:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        elif node.target in (aten.softmax.int, aten.log_softmax.int) and len(node.args) == 3 \
                and node.args[2] == value.dtype:
            node.args = node.args[:2]


_LAST = 2 ** 63 - 1  # ATen's "to the end" of a slice


def _slicing_as_indexing(graph: torch.fx.Graph) -> None:
    """``aten.slice.Tensor`` / ``aten.select.int`` -> ``operator.getitem`` with the same index (NOTE step 8)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.select.int):
            continue
        value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        if node.target is aten.slice.Tensor:
            names = ("dim", "start", "end", "step")
            dim, start, end, step = (node.args[i + 1] if i + 1 < len(node.args) else node.kwargs.get(name, default)
                                     for i, (name, default) in enumerate(zip(names, (0, None, None, 1))))
            index = slice(start, None if end is not None and end >= _LAST else end, None if step == 1 else step)
        else:
            dim, index = node.args[1], node.args[2]
        if not all(isinstance(v, int) or v is None for v in (dim,)) or isinstance(index, torch.fx.Node):
            continue
        dim = dim % value.dim()
        with graph.inserting_before(node):
            new = graph.call_function(operator.getitem, (node.args[0], (slice(None),) * dim + (index,)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _record_tensor_meta(node: torch.fx.Node) -> None:
    value = node.meta.get("val")
    if value is None:
        return
    found = []

    def extract(item):
        if isinstance(item, torch.Tensor):
            found.append(item)
            return _extract_tensor_metadata(item, include_contiguity=False)
        return item

    meta = torch.fx.node.map_aggregate(value, extract)
    if found:
        node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)
