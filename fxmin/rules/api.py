"""The rule API: what a rule is (:class:`Rule`), where it is registered (:class:`Registry`,
:func:`rule`), and what it sees of the graph (:class:`Context`, :class:`PlanContext`).

A rule bundles three small functions for one op family:

- ``forward(ctx) -> (ValueFact | None, units | None)``: the output's value facts and the *units* of
  its tracked axis (fresh ones, or its inputs' units when channels pass through; ``ctx.unify``
  couples axes that must keep the same index set).
- ``backward(ctx)``: given which output channels are present, call ``ctx.require(input, mask)`` for
  the input channels that must stay. When the node's own value is not tracked the engine keeps every
  channel of its inputs and does not call it (unless the rule says ``backward_untracked=True``).
- ``plan(ctx)``: given the kept channels, record the edits (new modules, sliced constants, patched
  arguments) through the :class:`PlanContext`.

Targets are matched as FX records them: module types through their MRO (only when the subclass
does not override ``forward``), callables by identity (an ATen ``OpOverload`` also through its
overload packet), and method names for ``call_method`` nodes. Registering a target twice is an
error unless the call says ``override=True``; :meth:`Registry.alias` gives a target another key.

Rules import this module, :mod:`fxmin.rules.kit` and the base modules (errors, facts, units,
graph_helpers, edits); the engine reaches rules only through this module.

>>> from fxmin.rules.api import REGISTRY
>>> import torch, fxmin
>>> REGISTRY.lookup_module(torch.nn.ReLU()).name
'pointwise'
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..edits import ArgEdit, AttrEdit, ConstantOperand, ModuleEdit, ParamEdit
from ..errors import FxminError

__all__ = ["REGISTRY", "ArgEdit", "AttrEdit", "ConstantOperand", "Context", "ModuleEdit", "ParamEdit",
           "PlanContext", "Registry", "RegistryError", "Rule", "rule"]


class RegistryError(FxminError):
    """A target registered twice without ``override=True``, or an alias of an unregistered target."""


@dataclass(frozen=True)
class Rule:
    """How one family of ops transforms facts. ``exact`` says when the rule is exact."""

    name: str
    forward: Callable
    backward: Callable | None = None
    plan: Callable | None = None
    exact: str = ""
    #: (exact when, what it removes or folds, what it keeps conservatively): the rule's row in
    #: docs/exactness.md (``docs/gen_rules_table.py``); rules of one name share it
    doc: tuple = ()
    #: ``macs(module_or_target, args, kwargs, out) -> (macs, other)``: the multiply-accumulates and the
    #: cheap extras of one call on its real arguments, for ``fxmin.flops`` (NOTE [What is counted]; shared
    #: counters in ``fxmin.rules.kit.costs``); ops whose rule has none are counted by torch's FlopCounterMode
    macs: Callable | None = None
    #: backward reads the presence of its inputs too (e.g. grouped convs keep groups uniform)
    reads_input_presence: bool = False
    #: plan replaces the module's parameters; a module called from several nodes is then a barrier
    edits_module: bool = False
    #: understands channel axes split over several tensor axes (attention heads, NOTE [Heads]);
    #: other rules see such inputs as opaque and keep all of them
    heads_aware: bool = False
    #: ``input_axis(node, root)``: the axis of argument 0 the op reads as channels (-1 for a Linear,
    #: 1 for a conv), or None; it decides which axis of a model input is tracked (NOTE [Input axis])
    input_axis: Callable | None = None
    #: channels of argument 0 pass through unchanged (activations, dropout, elementwise ops)
    passes_axis: bool = False
    #: backward is called even when the node's own value is untracked (else the engine keeps its inputs)
    backward_untracked: bool = False
    # The hooks below read one node of the graph ``root``: properties of the op, not of the analysis.
    #: ``constant_view(node, root, axis) -> (source, source_axis) | None``: the node is a view of ``source``
    #: whose ``axis`` holds ``source_axis``'s channels unchanged (an expanded class token, a sliced
    #: table), so a reader adopting the node as a model constant adopts ``source`` (``Context.adopt``)
    constant_view: Callable | None = None
    #: ``mutates(node, root) -> bool``: the call writes into an input or has side effects (never dropped)
    mutates: Callable | None = None
    #: ``identity_in_eval(node, root) -> bool``: in eval mode the node returns its argument 0 unchanged
    identity_in_eval: Callable | None = None
    #: ``sums_to_one(node, root) -> bool``: the output sums to 1 along its last axis (a softmax)
    sums_to_one: Callable | None = None
    #: the tracer records a call of a module of this rule as one node instead of following its forward
    #: (a library layer that computes its weight from its parameters: timm's StdConv2d)
    leaf: bool = False
    #: ``absorbs_shift(node, root) -> bool``: the plan can subtract a constant from the node's input
    #: (a BatchNorm's running mean), which its single writer hands over with ``PlanContext.shift_input``
    absorbs_shift: Callable | None = None


def _key_name(key) -> str:
    if isinstance(key, str):
        return f"Tensor.{key}"
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    if isinstance(key, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(key)
    module = getattr(key, "__module__", None) or ""
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", repr(key))
    return f"{module}.{name}" if module else name


@dataclass
class Registry:
    """Targets -> rules. Module types, call_function targets and call_method names have a table each."""

    modules: dict = field(default_factory=dict)
    functions: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    #: new key -> the key whose rule it shares (:meth:`alias`), resolved at lookup
    aliases: dict = field(default_factory=dict)
    #: module name -> what registers the rules of that optional library once it is imported (:meth:`defer`)
    deferred: dict = field(default_factory=dict)

    def _table(self, key) -> dict:
        if isinstance(key, str):
            return self.methods
        return self.modules if isinstance(key, type) else self.functions

    def get(self, key) -> Rule | None:
        """The rule of one key, through its aliases."""
        for _ in range(len(self.aliases) + 1):
            found = self._table(key).get(key)
            if found is not None or key not in self.aliases:
                return found
            key = self.aliases[key]
        raise RegistryError(f"the aliases of {_key_name(key)} form a cycle")

    def _put(self, key, rule: Rule, override: bool) -> None:
        existing = self.get(key)
        if existing is not None and existing is not rule and not override:
            raise RegistryError(
                f"{_key_name(key)} already has rule '{existing.name}'; registering rule '{rule.name}' for it "
                "would silently replace it. Pass override=True to replace it on purpose.")
        self.aliases.pop(key, None)
        self._table(key)[key] = rule

    def register(self, rule: Rule, *, modules: Iterable[type] = (), functions: Iterable = (),
                 methods: Iterable[str] = (), override: bool = False) -> Rule:
        """Register ``rule`` for the targets; a target with another rule raises unless ``override``."""
        for key in (*modules, *functions, *methods):
            self._put(key, rule, override)
        return rule

    def defer(self, module_name: str, register: Callable) -> None:
        """Call ``register(module)`` once the module ``module_name`` is imported, by anyone: the rules of
        an optional library (torchvision, timm) whose targets exist only once it is loaded, without
        importing it. Checked at every lookup, so importing the library after fxmin works."""
        self.deferred[module_name] = register
        self.register_imported()

    def register_imported(self) -> list[str]:
        """Run the deferred registrations whose module is now imported; returns their module names."""
        done = [name for name in self.deferred if name in sys.modules]
        for name in done:
            self.deferred.pop(name)(sys.modules[name])
        return done

    def alias(self, existing, *new_keys, override: bool = False) -> None:
        """Declare that the targets ``new_keys`` (a module type, a callable, an ATen ``OpOverload`` /
        ``OpOverloadPacket``, or a method name each) compute what ``existing`` computes, with the same
        signature: they get its rule, resolved at lookup (so the order of registration does not matter).

        >>> import operator, torch
        >>> REGISTRY.alias(operator.add, torch.ops.aten.add.Tensor)  # doctest: +SKIP
        """
        for key in new_keys:
            if key == existing:
                raise RegistryError(f"cannot alias {_key_name(key)} to itself")
            if self._table(key).get(key) is not None or key in self.aliases:
                if not override:
                    raise RegistryError(f"{_key_name(key)} already has a rule or an alias; pass override=True "
                                        "to replace it on purpose")
                self._table(key).pop(key, None)
            self.aliases[key] = existing

    def rules(self) -> list[Rule]:
        """Every registered rule once, in registration order."""
        seen = {}
        for table in (self.modules, self.functions, self.methods):  # aliases add no rule
            for registered in table.values():
                seen.setdefault(id(registered), registered)
        return list(seen.values())

    def lookup_module(self, module) -> Rule | None:
        module_type = type(module)
        for base in module_type.__mro__:
            found = self.get(base)
            if found is None:
                continue
            # NOTE [Subclass forward]: a subclass that overrides forward may compute
            # anything; matching it to its base's rule would be a guess.
            if base is module_type or getattr(module_type, "forward") is getattr(base, "forward"):
                return found
            return None
        return None

    def lookup_function(self, target) -> Rule | None:
        """The rule of a call_function target; an ATen overload falls back to its overload packet."""
        try:
            found = self.get(target)
        except TypeError:  # unhashable target
            return None
        if found is None and isinstance(target, torch._ops.OpOverload):
            found = self.get(target.overloadpacket)
        return found

    def lookup(self, node, root) -> Rule | None:
        if self.deferred:
            self.register_imported()
        if node.op == "call_module":
            return self.lookup_module(root.get_submodule(node.target))
        if node.op == "call_function":
            return self.lookup_function(node.target)
        if node.op == "call_method":
            return self.get(node.target)
        return None

    def table(self) -> list[tuple[str, str, str]]:
        """(kind, target, rule name) for every registered target, sorted."""
        rows = [("module", _key_name(k), r.name) for k, r in self.modules.items()]
        rows += [("function", _key_name(k), r.name) for k, r in self.functions.items()]
        rows += [("method", _key_name(k), r.name) for k, r in self.methods.items()]
        kinds = {id(self.modules): "module", id(self.functions): "function", id(self.methods): "method"}
        rows += [(kinds[id(self._table(k))], _key_name(k), self.get(k).name) for k in self.aliases
                 if self.get(k) is not None]
        return sorted(rows)


#: the default registry; importing :mod:`fxmin.rules` fills it with every rule fxmin ships
REGISTRY = Registry()


def rule(name: str, *, modules=(), functions=(), methods=(), backward=None, plan=None, exact="",
         registry: Registry | None = None, override: bool = False, **properties):
    """Decorator: register ``forward`` (the decorated function) with its companions and properties
    (the other :class:`Rule` fields, e.g. ``heads_aware=True``) in ``registry`` (default :data:`REGISTRY`).

    >>> @rule("my erf", functions=(torch.special.erf,))  # doctest: +SKIP
    ... def erf_forward(ctx): ...
    """

    def decorate(forward):
        registered = Rule(name, forward, backward, plan, exact or (forward.__doc__ or "").strip(), **properties)
        (registry or REGISTRY).register(registered, modules=modules, functions=functions, methods=methods,
                                        override=override)
        return forward

    return decorate


from .contexts import Context, PlanContext  # noqa: E402  (the contexts name Rule in their annotations only)
