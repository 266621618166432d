"""Random DAG models (residual adds and muls, cat, split/chunk, grouped and depthwise convs, norms,
attention, permutes, planted dead rows/columns/heads): fxmin is exact or loud, and removes what the
independent oracle (``fuzz_oracle``) proves removable, up to the named limits of docs/reliability.md.

Each case (``fuzz_case.run_case``) compares ``result.module`` with the masked model in float64 on fresh
inputs of another batch size, reads what was removed from ``result.plan`` / ``result.report``, compares it
with the oracle, and perturbs what was removed in the masked model (the outputs must not move). The
derandomized subset runs here; ``benchmarks/fuzz_graphs.py`` runs thousands of cases.

A bug the fuzzer found is reduced to a reproducer below, marked ``xfail(strict=True)`` with its
diagnosis; the random cases that hit the same bug (same error text) are set aside with ``assume`` so that
the subset stays green until the fix, when the strict reproducer turns red and this list is updated.
"""
from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from torch import nn

import fxmin
from fuzz_case import compare, run_case
from fuzz_descriptions import KINDS, RandomDraw, describe, descriptions
from fuzz_models import build, example_inputs
from fuzz_oracle import Oracle, layer_kept
from helpers import masked_copy

#: error text of a known bug -> the reproducer test that pins it (none open)
KNOWN_BUGS: dict = {}


def _known_bug(outcome) -> bool:
    """A case that shows a bug pinned by a strict-xfail reproducer below (its error text)."""
    return any(text in outcome.error for text in KNOWN_BUGS)


def _check(description: dict) -> None:
    outcome = run_case(description)
    assume(not _known_bug(outcome))
    gqa_loud = outcome.status == "loud" and description["kind"] == "gqa"  # GQA may be loud until it is followed
    assert outcome.status == "exact" or gqa_loud, f"{outcome.status}: {outcome.error}\n{description}"
    if gqa_loud:
        return
    assert outcome.perturbation == "ok", f"{outcome.perturbation}\n{description}"
    # The oracle's grouped heads are coarser than fxmin's since fxmin follows them (NOTE [Grouped heads]):
    # there fxmin may remove more than the oracle proves, and the perturbation check above proves each removal.
    accepted = ("match", "limits", "removes-more") if description["kind"] == "gqa" else ("match", "limits")
    assert outcome.removal in accepted, f"{outcome.removal}: {outcome.differences}\n{description}"


def _kind_test(kind: str):
    """One derandomized property test per kind (a strategy cannot take a pytest parameter)."""
    @settings(max_examples=40, derandomize=True)
    @given(description=descriptions(kind))
    def test(description):
        _check(description)
    test.__name__ = f"test_random_{kind}_graphs_are_exact_and_remove_what_the_oracle_proves"
    test.__doc__ = f"Random {kind} graphs: exact (float64, fresh inputs), removal = oracle up to named limits."
    return test


for _kind in KINDS:
    globals()[f"test_random_{_kind}_graphs_are_exact_and_remove_what_the_oracle_proves"] = _kind_test(_kind)


def test_benchmark_cases_are_reproducible_from_their_seed():
    first, second = describe(RandomDraw(7)), describe(RandomDraw(7))
    assert first == second
    (model_a, masks_a), (model_b, masks_b) = build(first), build(second)
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name])
    x = example_inputs(first)
    assert torch.equal(masked_copy(model_a, masks_a)(*x), masked_copy(model_b, masks_b)(*x))


def test_oracle_on_a_residual_block_with_a_dead_unit():
    """x -> fc1 -> relu -> fc2 (+ x): hidden unit 1 of fc1 has no input (const(relu(b))), fc2 reads
    hidden 2 with nothing (dead); the stream keeps every channel."""
    description = {"kind": "mlp", "width": 3, "seed": 0, "outputs": [4], "nodes": [
        {"op": "input", "inputs": [], "channels": 3},
        {"op": "linear", "inputs": [0], "channels": 4, "bias": True},
        {"op": "act", "inputs": [1], "channels": 4, "fn": "relu", "scale": 1.0},
        {"op": "linear", "inputs": [2], "channels": 3, "bias": True},
        {"op": "add", "inputs": [3, 0], "channels": 3}]}
    for node in description["nodes"][1::2]:
        node["dead"] = {"density": 1.0, "dead_rows": [], "dead_cols": [], "zero_bias": []}
    description["nodes"][1]["dead"]["dead_rows"] = [1]
    description["nodes"][3]["dead"]["dead_cols"] = [2]
    model, masks = build(description)
    reference = masked_copy(model, masks).double()
    params = {name: p.detach().numpy() for name, p in reference.named_parameters()}
    oracle = Oracle(description, params, {})
    present, _ = oracle.kept()
    kept = layer_kept(oracle, present)
    assert kept["n1"] == ({0, 3}, {0, 1, 2})
    assert kept["n3"] == ({0, 1, 2}, {0, 3})
    result = fxmin.minimize(model, masks, example_inputs(description))
    assert result.plan.keeps("n1.weight")[0].tolist() == [0, 3]
    assert run_case(description).removal == "match"


# -- reproducers of the bugs the fuzzer found, fixed (an open one is marked xfail strict) ------------------------

class SquaredConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        c = self.fc(x)  # every weight masked: constant in every channel
        return self.out(c * c)


def test_constant_operand_read_twice():
    """Found by the fuzzer: in c * c with c constant in every channel, NOTE [Constant operands] replaced
    argument 0 and the plan dropped c although argument 1 still read it ('Tried to erase Node fc but it
    still had 1 users'). c * c is left as it is now, and the plan counts a reader's reads."""
    torch.manual_seed(0)
    model = SquaredConstant()
    x = torch.randn(3, 2)
    result = fxmin.minimize(model, {"fc.weight": torch.zeros(2, 2)}, (x,))
    reference = masked_copy(model, {"fc.weight": torch.zeros(2, 2)}).double()
    assert compare(reference, result.module.double(), [(x.double(),), (torch.randn(5, 2).double(),)]) == ""
    assert result.plan.dropped == ()
    # the product is a constant that `out` folds into its bias: `out` keeps its 2 biases and reads nothing
    assert result.report.params_after == 2


class ConstantSumAsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        c = self.fc(x)  # every weight masked: constant in every channel
        return c + c  # the output: c stays to give it its shape (named limit constant-operand-read-twice)


def test_constant_added_to_itself_at_the_output_stays_whole():
    torch.manual_seed(0)
    model = ConstantSumAsOutput()
    masks = {"fc.weight": torch.zeros(3, 3)}
    x = torch.randn(2, 3)
    result = fxmin.minimize(model, masks, (x,))
    assert compare(masked_copy(model, masks).double(), result.module.double(), [(torch.randn(4, 3).double(),)]) == ""
    assert result.plan.operands == {} and result.plan.dropped == ()
    assert result.report.params_after == 3  # fc reads nothing and keeps its 3 biases; no constant beside it


class UnusedShapeRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)  # every weight masked: constant in every channel
        batch = h.shape[0]  # noqa: F841 - read and unused, as repeat_kv's `batch, _, tokens, _ = x.shape`
        return x + h


def test_constant_branch_read_only_by_an_unused_shape_leaves():
    """Found by the fuzzer in gqa cases: the unused getitem of h.shape kept h's getattr, hence fc, alive
    beside the constant operand that replaced it (12 -> 15 parameters). NOTE [Unused size reads]."""
    torch.manual_seed(0)
    model = UnusedShapeRead()
    masks = {"fc.weight": torch.zeros(3, 3)}
    x = torch.randn(2, 3)
    result = fxmin.minimize(model, masks, (x,))
    assert compare(masked_copy(model, masks).double(), result.module.double(), [(x.double(),)]) == ""
    assert "fc.weight" not in dict(result.module.named_parameters())
    assert result.report.params_after == 3  # the constant operand: fc's 3 biases


def test_group_norm_of_one_constant_channel():
    """Found by the fuzzer: the constant output of a norm of constant inputs was computed on one value
    per channel, which F.group_norm refuses for GroupNorm(1, 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.GroupNorm(1, 1), nn.Conv2d(1, 2, 1))
    masks = {"0.weight": torch.zeros(1, 1, 1, 1)}
    x = torch.randn(2, 1, 4, 4)
    result = fxmin.minimize(model, masks, (x,))
    assert compare(masked_copy(model, masks).double(), result.module.double(), [(x.double(),)]) == ""


def test_copies_of_a_repeated_value_head_keep_the_same_dims():
    """Found by the fuzzer (seed 948 of benchmarks/fuzz_graphs.py; 12 of 11,532 cases): repeat_kv's
    expand evened out its copies by adding a copy at dim 0, so two copies of one value head held
    different dims, their source kept the union and every value dim stayed. Here (4 query heads, 2
    key/value heads, head_dim 3) the output projection reads dims {2}, {1, 2}, none, {2} of the query
    heads: value head 0 keeps its dims {1, 2} and value head 1 as many, 2 ({0, 2}), 4 value rows of 6."""
    description = describe(RandomDraw(948))
    attention = description["nodes"][2]
    assert (attention["op"], attention["heads"], attention["kv_heads"], attention["head_dim"]) == ("attention", 4, 2, 3)
    outcome = run_case(description)
    assert (outcome.status, outcome.perturbation) == ("exact", "ok")
    assert outcome.removal in ("match", "limits"), outcome.differences
    model, masks = build(description)
    result = fxmin.minimize(model, masks, example_inputs(description))
    rows, _ = result.plan.keeps("n2.v.weight")
    assert sorted(int(r) for r in rows) == [1, 2, 3, 5]
