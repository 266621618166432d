"""Random DAG models for the fuzzer, as descriptions (plain data); ``fuzz_models`` builds them.

A *description* is a dict ``{"kind", "width", "nodes", "outputs", "seed"}``. ``nodes[0]`` is the model
input; every other node is one op reading earlier nodes by index, with the sizes and the planted dead
structure it was drawn with. The same description is read by ``fuzz_models.FuzzModel`` (which runs it) and
by ``fuzz_oracle`` (which reasons about it), so the oracle never looks at fxmin's graph.

Kinds (the layout of every tensor in the graph):

- ``mlp``: ``(N, C)``; Linear, BatchNorm1d, LayerNorm, RMSNorm.
- ``conv1d`` / ``conv2d``: ``(N, C, L)`` / ``(N, C, H, W)``; Conv (groups 1, grouped, depthwise; kernel 1
  unpadded or kernel 3 zero-padded), channels-last Linear and LayerNorm/RMSNorm through ``permute``,
  BatchNorm, ``GroupNorm(1, C)``, and optionally a ``flatten -> Linear`` head at the end.
- ``attention`` / ``gqa``: ``(N, T, D)``; Linear, LayerNorm, RMSNorm and multi-head attention
  (hand-written softmax or ``F.scaled_dot_product_attention``); ``gqa`` has fewer key/value heads
  than query heads, repeated with ``unsqueeze/expand/reshape`` (repeat_kv).

Every kind also draws residual ``add`` and ``mul``, ``cat``, ``split``/``chunk`` pieces, and
elementwise ops (relu, gelu, tanh, sigmoid, multiplication by a constant).

Draws go through a *drawer* (``integer``, ``choice``, ``chance``), so one generator serves hypothesis
(:func:`descriptions`) and the benchmark's seeded ``random.Random`` (:class:`RandomDraw`): a benchmark
case is reproduced from its seed alone.
"""
from __future__ import annotations

import math
import random

from hypothesis import strategies as st

KINDS = ("mlp", "conv1d", "conv2d", "attention", "gqa")
SPATIAL = {"mlp": (), "conv1d": (5,), "conv2d": (3, 3), "attention": (3,), "gqa": (3,)}
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "scale")
SCALES = (0.5, -2.0, 3.0)

# op -> weight in the draw, per family of kinds
_OPS = {
    "mlp": {"linear": 30, "act": 12, "norm": 12, "add": 14, "mul": 6, "cat": 8, "piece": 8},
    "conv": {"conv": 28, "cl_linear": 6, "act": 10, "norm": 12, "add": 12, "mul": 5, "cat": 8, "piece": 8},
    "attention": {"linear": 14, "act": 8, "norm": 12, "add": 16, "mul": 4, "cat": 6, "piece": 6, "attention": 20},
}
_NORMS = {"mlp": ("bn", "ln", "rms"), "conv": ("bn", "gn1", "ln_cl", "rms_cl"), "attention": ("ln", "rms")}


def family(kind: str) -> str:
    return "conv" if kind.startswith("conv") else "attention" if kind in ("attention", "gqa") else "mlp"


class RandomDraw:
    """Drawer over ``random.Random(seed)`` (the benchmark's)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options):
        return self.rng.choice(list(options))

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent


class HypothesisDraw:
    """Drawer over hypothesis' ``draw`` (shrinks towards small integers and the first options)."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) < percent


def _weighted(draw, weights: dict) -> str:
    roll = draw.integer(0, sum(weights.values()) - 1)
    for name, weight in weights.items():
        roll -= weight
        if roll < 0:
            return name
    raise AssertionError("unreachable")


def _subset(draw, size: int, percent: int) -> list:
    return [i for i in range(size) if draw.chance(percent)]


def _source(draw, nodes) -> int:
    """A node to read: usually one of the last three, sometimes any earlier one."""
    if draw.chance(70):
        return draw.integer(max(0, len(nodes) - 3), len(nodes) - 1)
    return draw.integer(0, len(nodes) - 1)


def _dead(draw, rows: int, cols: int) -> dict:
    """Planted structure of one weight: density of the random mask, dead rows, dead columns, zero biases."""
    return {"density": draw.choice((1.0, 0.8, 0.5, 0.25)), "dead_rows": _subset(draw, rows, 20),
            "dead_cols": _subset(draw, cols, 15), "zero_bias": _subset(draw, rows, 15)}


def _layer(draw, kind: str, src: int, cin: int, cout: int | None = None) -> dict:
    """A Linear (``mlp``, ``attention``) or a Conv (``conv*``) from ``cin`` channels to ``cout`` (drawn
    when None)."""
    node = {"op": "linear", "inputs": [src], "bias": draw.chance(70)}
    cols = cin
    if family(kind) == "conv":
        style = draw.choice(("dense", "dense", "grouped", "depthwise"))
        if style == "depthwise" and cout is None:
            cout = cin * draw.choice((1, 2))
        cout = cout if cout is not None else draw.integer(1, 6)
        groups = 1
        if style == "depthwise" and cout in (cin, 2 * cin):
            groups = cin
        elif style == "grouped" and math.gcd(cin, cout) > 1:
            common = math.gcd(cin, cout)
            groups = draw.choice([g for g in range(2, common + 1) if common % g == 0])
        node.update(op="conv", kernel=draw.choice((1, 3)), groups=groups)
        cols = cin // groups
    node["channels"] = cout if cout is not None else draw.integer(1, 6)
    node["dead"] = _dead(draw, node["channels"], cols)
    return node


def _attention(draw, kind: str, src: int, width: int) -> dict:
    if kind == "gqa":
        heads, kv_heads = draw.choice(((2, 1), (4, 2), (4, 1), (3, 1)))
    else:
        heads = draw.integer(1, 3)
        kv_heads = heads
    head_dim = draw.integer(1, 3)
    return {"op": "attention", "inputs": [src], "channels": width, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "form": draw.choice(("manual", "sdpa")), "bias": draw.chance(70),
            "dead": {name: _dead(draw, rows, cols) for name, rows, cols in (
                ("q", heads * head_dim, width), ("k", kv_heads * head_dim, width),
                ("v", kv_heads * head_dim, width), ("o", width, heads * head_dim))},
            "dead_heads": {name: _subset(draw, count, 20) for name, count in
                           (("q", heads), ("k", kv_heads), ("v", kv_heads), ("o", heads))}}


def _draw_op(draw, kind: str, nodes: list) -> None:
    fam = family(kind)
    op = _weighted(draw, _OPS[fam])
    if kind in ("attention", "gqa") and not any(n["op"] == "attention" for n in nodes) and len(nodes) >= 2:
        op = "attention"  # every attention case has at least one
    src = _source(draw, nodes)
    cin = nodes[src]["channels"]
    if op in ("linear", "conv"):
        nodes.append(_layer(draw, kind, src, cin))
    elif op == "cl_linear":
        nodes.append({"op": "cl_linear", "inputs": [src], "channels": (c := draw.integer(1, 6)),
                      "bias": draw.chance(70), "dead": _dead(draw, c, cin)})
    elif op == "act":
        nodes.append({"op": "act", "inputs": [src], "channels": cin, "fn": draw.choice(ACTIVATIONS),
                      "scale": draw.choice(SCALES)})
    elif op == "norm":
        nodes.append({"op": "norm", "inputs": [src], "channels": cin, "norm": draw.choice(_NORMS[fam]),
                      "affine": draw.chance(80), "bias": draw.chance(70),
                      "zero_weight": _subset(draw, cin, 15), "zero_bias": _subset(draw, cin, 15)})
    elif op in ("add", "mul"):
        partners = [i for i, n in enumerate(nodes) if n["channels"] == cin]
        if len(partners) < 2 or draw.chance(40):  # a fresh branch of the right width: a residual block
            nodes.append(_branch(draw, kind, nodes, cin))
            other = len(nodes) - 1
        else:
            other = draw.choice(partners)
        operands = [src, other] if draw.chance(50) else [other, src]
        nodes.append({"op": op, "inputs": operands, "channels": cin})
    elif op == "cat":
        other = src if draw.chance(10) else _source(draw, nodes)
        nodes.append({"op": "cat", "inputs": [src, other], "channels": cin + nodes[other]["channels"]})
    elif op == "piece":
        if cin < 2:
            nodes.append({"op": "act", "inputs": [src], "channels": cin, "fn": "relu", "scale": 1.0})
            return
        earlier = [n for n in nodes if n["op"] == "piece" and n["inputs"] == [src]]
        if earlier and draw.chance(60):  # another piece of the same split
            how, sizes = earlier[0]["how"], earlier[0]["sizes"]
        elif draw.chance(50):
            how, pieces = "chunk", draw.integer(2, cin)
            step = -(-cin // pieces)
            sizes = [min(step, cin - start) for start in range(0, cin, step)]
        else:
            how, cut = "split", sorted(set(draw.integer(1, cin - 1) for _ in range(draw.integer(1, 2))))
            sizes = [b - a for a, b in zip([0] + cut, cut + [cin])]
        index = draw.integer(0, len(sizes) - 1)
        nodes.append({"op": "piece", "inputs": [src], "channels": sizes[index], "how": how, "sizes": sizes,
                      "index": index})
    elif op == "attention":
        nodes.append(_attention(draw, kind, src, cin))


def _branch(draw, kind: str, nodes: list, width: int) -> dict:
    src = _source(draw, nodes)
    return _layer(draw, kind, src, nodes[src]["channels"], width) if family(kind) != "conv" or draw.chance(80) \
        else {"op": "cl_linear", "inputs": [src], "channels": width, "bias": draw.chance(70),
              "dead": _dead(draw, width, nodes[src]["channels"])}


def describe(draw, kind: str | None = None, steps: int | None = None) -> dict:
    """Draw a description (see the module docstring); ``kind`` and ``steps`` fix what they name."""
    kind = kind or draw.choice(KINDS)
    width = draw.integer(2, 8) if family(kind) == "attention" else draw.integer(1, 6)
    nodes = [{"op": "input", "inputs": [], "channels": width}]
    if family(kind) == "attention":  # NOTE: keeps (N, T, D) inputs tracked on D (named limit input-axis)
        nodes.append(_layer(draw, kind, 0, width) if draw.chance(50) else
                     {"op": "norm", "inputs": [0], "channels": width, "norm": draw.choice(_NORMS["attention"]),
                      "affine": draw.chance(80), "bias": draw.chance(70),
                      "zero_weight": _subset(draw, width, 15), "zero_bias": _subset(draw, width, 15)})
    for _ in range(steps if steps is not None else draw.integer(2, 7)):
        _draw_op(draw, kind, nodes)
    if family(kind) == "conv" and draw.chance(30):
        src = len(nodes) - 1
        features = nodes[src]["channels"] * math.prod(SPATIAL[kind])
        nodes.append({"op": "flatten_linear", "inputs": [src], "channels": (c := draw.integer(1, 4)),
                      "bias": draw.chance(70), "dead": _dead(draw, c, features)})
    outputs = [len(nodes) - 1]
    if len(nodes) > 2 and draw.chance(30):
        extra = draw.integer(1, len(nodes) - 2)
        if nodes[extra]["op"] != "flatten_linear":
            outputs.append(extra)
    return {"kind": kind, "width": width, "nodes": nodes, "outputs": outputs, "seed": draw.integer(0, 2**31 - 1)}


@st.composite
def descriptions(draw, kind: str | None = None):
    """Hypothesis strategy of descriptions (``kind`` fixed, or drawn)."""
    return describe(HypothesisDraw(draw), kind)
