"""The rule API as a layer: the engine runs on any registry, the registry refuses surprises, aliases
(ATen overloads included) resolve at lookup, and nn.MultiheadAttention pickles of 0.1.0 still load."""
from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import fxmin
from fxmin.analysis import analyze_graph
from fxmin.minimize import prepare
from fxmin.rules.api import REGISTRY, Registry, RegistryError, Rule, rule

aten = torch.ops.aten


def _identity_forward(ctx):
    return ctx.fact(ctx.arg(0)), ctx.units(ctx.arg(0))


def test_the_engine_runs_on_an_empty_registry_and_names_the_node_without_a_rule():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    graph_module, *_ = prepare(model, None, (torch.randn(2, 3),))
    with pytest.raises(fxmin.MissingRuleError) as caught:
        analyze_graph(graph_module, registry=Registry())
    assert caught.value.node_name == "_0"
    assert "node '_0'" in str(caught.value) and "torch.nn.modules.linear.Linear" in str(caught.value)
    assert "Other nodes without a rule: '_1'" in str(caught.value)


def test_a_target_registered_twice_raises_naming_both_rules_unless_overridden():
    registry = Registry()
    first = registry.register(Rule("first", _identity_forward), functions=(torch.erf,))
    with pytest.raises(RegistryError) as caught:
        registry.register(Rule("second", _identity_forward), functions=(torch.erf,))
    assert "'first'" in str(caught.value) and "'second'" in str(caught.value) and "override=True" in str(caught.value)
    assert isinstance(caught.value, fxmin.FxminError)
    assert registry.lookup_function(torch.erf) is first
    second = registry.register(Rule("second", _identity_forward), functions=(torch.erf,), override=True)
    assert registry.lookup_function(torch.erf) is second
    registry.register(second, functions=(torch.erf,))  # the same rule again is no surprise


def test_the_default_registry_has_one_rule_per_target():
    # .to / .type_as were registered by two rules before, the later one silently winning
    assert REGISTRY.methods["to"].name == "cast" and REGISTRY.methods["type_as"].name == "cast"
    with pytest.raises(RegistryError):
        rule("another relu", modules=(nn.ReLU,), registry=REGISTRY)(_identity_forward)
    assert REGISTRY.lookup_module(nn.ReLU()).name == "pointwise"


def test_aliases_resolve_at_lookup_for_aten_overloads_and_packets():
    registry = Registry()
    # declared before the rule exists: the order of registration does not matter
    registry.alias(torch.relu, aten.relu.default, "relu")
    registry.alias(torch.sigmoid, aten.sigmoid)  # an overload packet covers its overloads
    assert registry.lookup_function(aten.relu.default) is None
    relu = registry.register(Rule("relu", _identity_forward), functions=(torch.relu,))
    sigmoid = registry.register(Rule("sigmoid", _identity_forward), functions=(torch.sigmoid,))
    assert registry.lookup_function(aten.relu.default) is relu
    assert registry.methods.get("relu") is None and registry.get("relu") is relu
    assert registry.lookup_function(aten.sigmoid.default) is sigmoid
    assert registry.lookup_function(aten.tanh.default) is None
    assert ("function", "aten.relu.default", "relu") in registry.table()
    with pytest.raises(RegistryError):
        registry.alias(torch.sigmoid, aten.relu.default)  # already an alias of another target
    with pytest.raises(RegistryError):
        registry.register(Rule("other", _identity_forward), functions=(aten.relu.default,))
    # the shipped ATen aliases (fxmin.rules.functional) resolve the same way
    assert REGISTRY.lookup_function(aten.add.Tensor).name == "elementwise"
    assert REGISTRY.lookup_function(aten.linear.default).name == "functional linear"


def test_a_rule_registered_in_a_registry_of_its_own_runs_through_the_engine():
    registry = Registry()
    rule("identity", modules=(nn.Identity,), registry=registry)(_identity_forward)
    model = nn.Sequential(nn.Identity())
    graph_module, *_ = prepare(model, None, (torch.randn(2, 3),))
    analysis = analyze_graph(graph_module, registry=registry)
    assert analysis.rules[analysis.node("_0")].name == "identity"


def test_flops_counts_an_op_with_its_rules_counter(monkeypatch):
    counted = Rule("counted tanh", _identity_forward, macs=lambda module, args, kwargs, out: (7 * out.numel(), 0))
    monkeypatch.setitem(REGISTRY.modules, nn.Tanh, counted)
    assert fxmin.flops(nn.Sequential(nn.Tanh()), (torch.randn(2, 3),)).macs == 7 * 6
    assert REGISTRY.lookup_module(nn.Linear(2, 3)).macs is not None  # layers count through their rule


def _old_pickle_of(obj, old_module: str, name: str) -> bytes:
    """Pickle bytes naming ``old_module.name`` as the class, as fxmin 0.1.0 wrote them."""
    cls = type(obj)
    saved = cls.__module__
    cls.__module__ = old_module
    try:
        buffer = io.BytesIO()
        pickle.Pickler(buffer, protocol=4).dump(obj)
    finally:
        cls.__module__ = saved
    data = buffer.getvalue()
    assert f"{old_module}".encode() in data and name.encode() in data
    return data


def test_a_sliced_multihead_attention_pickled_under_its_old_module_still_loads():
    from fxmin.compensated.attention import SlicedMultiheadAttention

    torch.manual_seed(0)
    linear = [nn.Linear(4, 4, dtype=torch.float64) for _ in range(4)]
    module = SlicedMultiheadAttention(*linear, heads=2, scale=0.5, batch_first=True, dropout=0.0).eval()
    data = _old_pickle_of(module, "fxmin.rules.mha", "SlicedMultiheadAttention")
    loaded = pickle.loads(data)
    assert type(loaded) is SlicedMultiheadAttention
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(loaded(x, x, x)[0], module(x, x, x)[0], rtol=0, atol=0)
