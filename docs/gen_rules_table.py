"""Regenerate the rule tables in docs/exactness.md from ``fxmin.REGISTRY``.

    python docs/gen_rules_table.py           # rewrite the generated part of docs/exactness.md
    python docs/gen_rules_table.py --check   # exit 1 if it is out of date or a rule is undescribed

The list of targets comes from the registry, so it is always complete. The three prose columns
are written by hand below (from each rule's docstring, ``Rule.exact``); a rule registered without
an entry here is listed with its docstring and flagged, so a new rule cannot go unnoticed.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import fxmin

DOC = Path(__file__).with_name("exactness.md")
BEGIN, END = "<!-- BEGIN GENERATED: python docs/gen_rules_table.py -->", "<!-- END GENERATED -->"

# rule name -> (exact when, what it removes or folds, what it keeps conservatively)
DESCRIPTIONS = {
    "linear/conv": (
        "Always (Linear, Conv1d/2d/3d, any stride/dilation/groups). Output `k` is `const(b_k + Σ tap_sum[k,j]·c_j)` "
        "iff it reads no varying input; with zero padding also no nonzero constant input.",
        "Rows of outputs that are unneeded or constant; columns of removed inputs, folding `tap_sum[:, j]·c_j` "
        "into the bias (a bias is created if absent).",
        "A nonzero constant input behind zero padding (border pixels see fewer taps). Grouped convs keep groups "
        "uniform (every live group as full as the fullest; an empty group goes whole); depthwise convs couple "
        "in/out channels. A module called from several nodes is a barrier.",
    ),
    "functional linear": (
        "As `nn.Linear` when weight (and bias) are model attributes read only by this call.",
        "As `nn.Linear`: the attributes are replaced by sliced tensors.",
        "Everything around it when the weight is computed or shared; nonzero constant inputs when there is no "
        "bias to fold into.",
    ),
    "functional conv": (
        "As `nn.ConvNd` when weight (and bias) are model attributes read only by this call.",
        "As `nn.ConvNd`.",
        "Everything around it when the weight is computed or shared; as `nn.ConvNd` otherwise.",
    ),
    "batch_norm": (
        "In eval mode: a per-channel affine map `const(c) -> const(γ(c-m)/√(v+ε)+β)`; `γ == 0` gives `const(β)`.",
        "Slices weight, bias, running mean and variance to the kept channels (couples input and output).",
        "Every channel when the input is not tracked on axis 1.",
    ),
    "functional batch_norm": (
        "With `training=False` and running statistics: the same affine map as `nn.BatchNorm`.",
        "Slices the statistics and affine attributes.",
        "Every channel otherwise.",
    ),
    "layer_norm": (
        "Through `CompensatedLayerNorm` (see `compensated-layernorm.md`): removed inputs must be constant; their "
        "constants join the statistics. `weight_i == 0` makes output `i` `const(bias_i)`.",
        "Constant input channels (into `S1`/`S2`); output channels nobody reads.",
        "Every varying input channel while any output is needed (it feeds the mean and variance). Over the head "
        "dim of heads (`q_norm`/`k_norm`, NOTE [Per-head norms]): whole heads leave; an input dim leaves when it "
        "holds one constant in every kept head; `F.rms_norm` keeps every dim of a kept head.",
    ),
    "embedding": (
        "Always: column `d` is `const(c)` iff every row of the table holds `c` there.",
        "Columns of the table; a tied unembedding loses the same columns (its input couples with the output).",
        "—",
    ),
    "pointwise": (
        "Any op applied to each element alone (activations, identity, `contiguous`, dtype casts...): "
        "`const(c) -> const(f(c))`, computed by running the op in float64, so `f(0) != 0` (sigmoid, softplus) "
        "is handled.",
        "Nothing itself: channels pass through (same units).",
        "Every input channel when another operand is a tensor (`clamp(x, min=t)`) or the input is untracked. "
        "An in-place op that overwrites a value read later is an error.",
    ),
    "dropout": (
        "In eval mode, where dropout is the identity (the module stays in place for training).",
        "Nothing itself: channels pass through.",
        "As `pointwise`.",
    ),
    "aten dropout": (
        "With `train=False` (the identity).",
        "Nothing itself.",
        "Every channel with `train=True`.",
    ),
    "elementwise": (
        "Always for add/sub/mul/div/maximum/minimum: operands' channels couple; `const ∘ const` is constant, "
        "`0 · x` is `const(0)`.",
        "A channel of the coupled group when it is removable at every member (a residual stream goes "
        "stage-wide or not at all). An operand constant in every channel, of the result's shape as the other "
        "operand is, becomes a broadcast constant (a parameter when the model trains) and the branch behind it, "
        "read by nothing else, leaves the model (NOTE [Constant operands]: a block whose MLP was emptied).",
        "Every channel with `alpha=`, or when a broadcast operand varies along the channel axis; a broadcast "
        "operand is read whole.",
    ),
    "pooling": (
        "Max/avg/adaptive pooling work within each channel: a constant stays constant.",
        "Nothing itself: channels pass through.",
        "Average pooling that counts zero padding (or uses `ceil_mode`/`divisor_override`) keeps only `const(0)` "
        "constant; `return_indices` and pooling over the channel axis are opaque (all kept).",
    ),
    "flatten": (
        "Always: channel `c` becomes a block of consecutive features.",
        "The block of every removed channel (the reader's columns follow).",
        "Every channel when the input is untracked.",
    ),
    "view/reshape": (
        "Reshapes that keep the channel axis whole, merge it into one axis, or split it into uniform blocks or "
        "heads.",
        "Follows the channels; literal sizes at the channel axis are patched.",
        "Every channel for other reshapes, and when the size at the channel axis is computed at run time, "
        "unless it is read from a tensor whose channels couple with the view's (`x.view(-1, x.size(-1))`, "
        "HF's `x.size()[:-1] + (4, 16)`: literals inside the `operator.add` tuple are patched).",
    ),
    "size": (
        "A size of a tracked axis that only scales tensors (`q.size(-1) ** -0.5`) is replaced by its original "
        "value, which is what the reference uses.",
        "—",
        "A size that shapes tensors (a `view` argument) pins its axis: every channel kept, unless it only shapes "
        "views whose channels it couples with (its run-time value is then the new size).",
    ),
    "dtype info": ("Always: `torch.finfo`/`torch.iinfo` compute no channel.", "—", "—"),
    "comparison": (
        "Comparisons (`<`, `>`, `torch.lt`...) compute no followed channel.",
        "—",
        "On tensors the result is opaque: every input channel kept.",
    ),
    "in-place fill": (
        "`masked_fill_`/`fill_`/`zero_` on a tensor that carries no channel (HF's causal mask); refused when it "
        "overwrites a tracked tensor that is read later.",
        "—",
        "Every channel around it.",
    ),
    "cast": (
        "`x.to(dtype)`/`x.type(dtype)` with the dtype read at run time (`y.dtype`) to a floating dtype: up to "
        "rounding; with literal arguments, as a pointwise op.",
        "Nothing itself.",
        "Any other operand (a tensor in `type_as`, a cast to an integer dtype read at run time).",
    ),
    "addmm (Conv1D)": (
        "`torch.addmm(b, x, W)` with `W` (in, out) and `b` model constants read only here (HF's inlined "
        "`Conv1D`): exact as `nn.Linear` with weight `W.T`.",
        "As Linear: rows (columns of `W`) of removed outputs, inputs with their constants folded into `b`.",
        "Every channel when `W`/`b` are computed or shared, or with `beta`/`alpha`.",
    ),
    "Conv1D": (
        "HF `Conv1D` kept as a leaf module (registered when transformers is imported before fxmin): as "
        "`nn.Linear` with weight `W.T`.",
        "As Linear.",
        "As Linear.",
    ),
    "multihead_attention": (
        "`nn.MultiheadAttention` analysed as the attention it computes (NOTE [MultiheadAttention]), replaced "
        "by `SlicedMultiheadAttention` (projections + SDPA, original scale) when channels go.",
        "Dead heads, value dims, `const(0)` q/k dims, input channels (constants folded into the projections), "
        "output channels.",
        "The whole module when its attention weights are read, with `add_bias_kv`, `add_zero_attn`, "
        "`kdim`/`vdim` or 3-D per-head masks.",
    ),
    "getattr": (
        "`.shape`, `.dtype`, `.device`, `.ndim`... read no channel.",
        "—",
        "Reading the size of the tracked axis pins it; an unknown attribute is a `MissingRuleError`.",
    ),
    "guard": (
        "Comparisons and asserts (guards left by `concrete_args`) compute no channel.",
        "—",
        "On tensors the result is opaque: every input channel kept.",
    ),
    "getitem": (
        "Picking a piece of a split; indexing a size; indexing a tensor with full slices before the channel "
        "axis and the channel axis whole or sliced with step 1.",
        "Follows the channels; slice bounds on the channel axis are patched.",
        "Every channel for other indexing (advanced indices, steps, indices before the channel axis but full "
        "slices and `None`).",
    ),
    "narrow": (
        "Along an axis the channels do not occupy (a rotary table cut to the sequence length).",
        "Nothing itself; a narrowed model constant is adopted by its reader.",
        "Every channel when the channel axis itself is narrowed.",
    ),
    "reduction": (
        "Reductions over axes other than the channel axis: mean/amax/amin keep a constant, sum multiplies it by "
        "the number of reduced elements.",
        "Nothing itself: channels pass through.",
        "Every channel when the channel axis is reduced, or `dim`/`dtype` are not literals.",
    ),
    "cat": (
        "Always: along the channel axis the inputs' channels line up one after the other (offsets); along "
        "another axis the inputs couple. Model constants (class tokens) are adopted on that axis.",
        "Each input's removed channels.",
        "Every channel when an input's channel axis cannot be followed.",
    ),
    "split": (
        "Always: cutting along the channel axis gives each piece its slice of the channels; along another axis "
        "every piece has all of them.",
        "Channels within each piece; split sizes are patched.",
        "Every channel when the sizes cannot be patched.",
    ),
    "permute": ("Always: the channel axis moves (both axes of attention heads).", "Nothing itself.", "—"),
    "transpose": ("Always: the channel axis swaps with another.", "Nothing itself.", "—"),
    "unsqueeze": ("Always: a new size-1 axis shifts the channel axis.", "Nothing itself.", "—"),
    "squeeze": ("Removing size-1 axes other than the channel axis.", "Nothing itself.",
                "Every channel when the channel axis itself could be squeezed."),
    "expand": (
        "Always: values repeat along size-1 axes; the channel axis keeps its channels. Repeating heads along an "
        "axis between their digits (`repeat_kv`) makes each copy a channel (NOTE [Grouped heads]).",
        "Literal sizes at the channel axes are patched; an expanded model constant is adopted by its reader.",
        "Repeated heads: equal copies per head (the fullest group's count), each copy all of its head's dims.",
    ),
    "creation": ("Always: `arange`, `zeros`... made from sizes carry no channel.", "—", "—"),
    "softmax": (
        "Along an axis the channels do not occupy: it works within each channel.",
        "Nothing itself.",
        "Every channel for a softmax along the channel axis.",
    ),
    "masked_fill": ("With a mask that is the same for every channel.", "Nothing itself.",
                    "Every channel when the mask varies along the channel axis."),
    "where": ("`torch.where(mask, x, fill)` with a mask and fill the same for every channel.", "Nothing itself.",
              "Every channel otherwise."),
    "matmul": (
        "For attention: `q @ k^T` couples q and k channels (one score channel per head); `weights @ v` keeps v's "
        "channels, and a constant v channel stays constant when the weights are a softmax.",
        "Query/key dims that are `const(0)` in q or k; value dims.",
        "Every channel for other matrix products.",
    ),
    "index_select": (
        "With a constant index along the channel axis (what minimize writes at the inputs): each output "
        "channel maps to its source.",
        "Channels nobody reads; the index is rewritten, so a minimized module minimizes again.",
        "A computed index, or one along another axis: every channel of the input.",
    ),
    "scaled_dot_product_attention": (
        "See `transformers.md` and NOTE [Attention]: q/k dims couple; a constant value channel gives a constant "
        "output when no dropout is applied.",
        "q/k dims that are `const(0)`; value dims and whole heads; the softmax scale is kept at the original "
        "head size.",
        "A nonzero constant q/k dim (it changes every score). With `enable_gqa` (NOTE [Grouped heads]): equal "
        "query heads per group (the fullest group's count); a group's query heads keep its key head's dims.",
    ),
}


def rule_objects() -> dict:
    rules = {}
    for table in (fxmin.REGISTRY.modules, fxmin.REGISTRY.functions, fxmin.REGISTRY.methods):
        for rule in table.values():
            rules.setdefault(rule.name, rule)
    return rules


def _short(target: str) -> str:
    for prefix in ("torch.nn.modules.", "torch.nn.functional.", "torch._C._nn.", "torch._C._VariableFunctions."):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    return target


def generate() -> tuple[str, list]:
    targets = defaultdict(list)
    for kind, target, name in fxmin.REGISTRY.table():
        targets[name].append(f"`{_short(target)}`")
    rules = rule_objects()
    undescribed = sorted(name for name in targets if name not in DESCRIPTIONS)
    lines = [BEGIN, "", f"{len(targets)} rules over {sum(len(t) for t in targets.values())} registered targets "
             f"(fxmin {fxmin.__version__}).", "",
             "| rule | exact when | removes / folds | keeps (conservatively) |", "|---|---|---|---|"]
    for name in sorted(targets):
        when, removes, keeps = DESCRIPTIONS.get(name, (
            "**undescribed** — docstring: " + " ".join((rules[name].exact or "(none)").split()), "?", "?"))
        lines.append(f"| `{name}` | {when} | {removes} | {keeps} |")
    lines += ["", "### Targets of each rule", ""]
    for name in sorted(targets):
        lines.append(f"- **{name}** ({len(targets[name])}): {', '.join(sorted(set(targets[name])))}")
    lines += ["", END]
    return "\n".join(lines), undescribed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/exactness.md is up to date")
    args = parser.parse_args(argv)
    generated, undescribed = generate()
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + generated + tail
    if undescribed:
        print(f"rules without a hand-written description in {__file__}: {', '.join(undescribed)}", file=sys.stderr)
    if args.check:
        if new != text or undescribed:
            print(f"{DOC} is out of date: run python docs/gen_rules_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
