"""Random DAG models for the fuzzer: a description (plain data) -> an ``nn.Module`` and its masks.

A *description* is a dict ``{"kind", "width", "nodes", "outputs", "seed"}``. ``nodes[0]`` is the model
input; every other node is one op reading earlier nodes by index, with the sizes and the planted dead
structure it was drawn with. The same description is read by :class:`FuzzModel` (which runs it) and
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

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

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


# -- the model a description stands for ----------------------------------------------------------------------

def example_inputs(description: dict, batch: int = 2, seed: int = 0) -> tuple:
    kind, width = description["kind"], description["width"]
    if family(kind) == "attention":
        shape = (batch, SPATIAL[kind][0], width)
    else:
        shape = (batch, width, *SPATIAL[kind])
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections; grouped-query when ``kv_heads < heads``."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, form: str, bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.form = heads, kv_heads, head_dim, form
        self.q = nn.Linear(width, heads * head_dim, bias=bias)
        self.k = nn.Linear(width, kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(width, kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(heads * head_dim, width, bias=bias)

    def _repeat_kv(self, x):
        if self.kv_heads == self.heads:
            return x
        batch, _, tokens, _ = x.shape
        repeats = self.heads // self.kv_heads
        x = x.unsqueeze(2).expand(batch, self.kv_heads, repeats, tokens, self.head_dim)
        return x.reshape(batch, self.heads, tokens, self.head_dim)

    def forward(self, x):
        batch, tokens = x.shape[0], x.shape[1]
        q = self.q(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self._repeat_kv(self.k(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2))
        v = self._repeat_kv(self.v(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2))
        if self.form == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            y = scores.softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))


def _norm_module(node: dict, kind: str) -> nn.Module:
    channels, name = node["channels"], node["norm"]
    affine = node["affine"]
    if name == "bn":
        return (nn.BatchNorm1d if kind in ("mlp", "conv1d") else nn.BatchNorm2d)(channels, affine=affine)
    if name == "gn1":
        return nn.GroupNorm(1, channels, affine=affine)
    if name.startswith("ln"):
        return nn.LayerNorm(channels, elementwise_affine=affine, bias=affine and node["bias"])
    return nn.RMSNorm(channels, elementwise_affine=affine)


def _layer_module(node: dict, kind: str, cin: int) -> nn.Module:
    op = node["op"]
    if op == "conv":
        conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        return conv(cin, node["channels"], node["kernel"], padding=node["kernel"] // 2, groups=node["groups"],
                    bias=node["bias"])
    if op == "flatten_linear":
        cin = cin * math.prod(SPATIAL[kind])
    return nn.Linear(cin, node["channels"], bias=node["bias"])


class FuzzModel(nn.Module):
    """The model of a description: submodule ``n{i}`` is node ``i``'s layer; ``forward`` runs the nodes
    in order (FX traces the loop away)."""

    def __init__(self, description: dict):
        super().__init__()
        self.description = description
        kind, nodes = description["kind"], description["nodes"]
        for i, node in enumerate(nodes):
            cin = nodes[node["inputs"][0]]["channels"] if node["inputs"] else 0
            if node["op"] in ("linear", "conv", "cl_linear", "flatten_linear"):
                self.add_module(f"n{i}", _layer_module(node, kind, cin))
            elif node["op"] == "norm":
                self.add_module(f"n{i}", _norm_module(node, kind))
            elif node["op"] == "attention":
                self.add_module(f"n{i}", Attention(cin, node["heads"], node["kv_heads"], node["head_dim"],
                                                   node["form"], node["bias"]))
        self._initialize(description["seed"])

    def _initialize(self, seed: int) -> None:
        """Random weights, nonzero biases, norm scales and BatchNorm statistics away from 1 / 0."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
                if name.endswith("running_var"):
                    tensor.copy_(0.5 + 1.5 * torch.rand(tensor.shape, generator=generator))
                elif tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))

    def forward(self, x):
        kind = self.description["kind"]
        axis = -1 if family(kind) == "attention" else 1
        values, splits = [x], {}
        for i, node in enumerate(self.description["nodes"][1:], 1):
            args = [values[j] for j in node["inputs"]]
            values.append(self._run(i, node, args, axis, splits))
        outputs = tuple(values[j] for j in self.description["outputs"])
        return outputs[0] if len(outputs) == 1 else outputs

    def _run(self, i: int, node: dict, args: list, axis: int, splits: dict):
        op = node["op"]
        layer = getattr(self, f"n{i}", None)
        if op in ("linear", "conv", "attention") or (op == "norm" and not node["norm"].endswith("_cl")):
            return layer(args[0])
        if op in ("cl_linear", "norm"):  # channels-last: move the channels to the end and back
            rank = 2 + len(SPATIAL[self.description["kind"]])
            last = (0, *range(2, rank), 1)
            back = (0, rank - 1, *range(1, rank - 1))
            return layer(args[0].permute(*last)).permute(*back)
        if op == "flatten_linear":
            return layer(torch.flatten(args[0], 1))
        if op == "act":
            fn = node["fn"]
            if fn == "scale":
                return args[0] * node["scale"]
            return getattr(torch, fn)(args[0]) if fn != "gelu" else F.gelu(args[0])
        if op == "add":
            return args[0] + args[1]
        if op == "mul":
            return args[0] * args[1]
        if op == "cat":
            return torch.cat(args, dim=axis)
        if op == "piece":
            key = (node["inputs"][0], node["how"], tuple(node["sizes"]))
            if key not in splits:
                splits[key] = (args[0].chunk(len(node["sizes"]), dim=axis) if node["how"] == "chunk"
                               else torch.split(args[0], node["sizes"], dim=axis))
            return splits[key][node["index"]]
        raise ValueError(f"unknown op {op!r}")


def _dead_mask(shape, spec: dict, generator, head_rows=(), head_cols=()) -> torch.Tensor:
    mask = torch.rand(shape, generator=generator) < spec["density"]
    mask[spec["dead_rows"]] = False
    mask[:, spec["dead_cols"]] = False
    for rows in head_rows:
        mask[rows] = False
    for cols in head_cols:
        mask[:, cols] = False
    return mask


def build(description: dict) -> tuple:
    """``(model, masks)``: the model of ``description`` and its masks (random at the drawn densities,
    with the planted dead rows, columns, heads, zero biases and zero norm scales)."""
    model = FuzzModel(description).eval()
    generator = torch.Generator().manual_seed(description["seed"] + 1)
    masks = {}
    for i, node in enumerate(description["nodes"]):
        op = node["op"]
        if op in ("linear", "conv", "cl_linear", "flatten_linear"):
            layer = getattr(model, f"n{i}")
            masks[f"n{i}.weight"] = _dead_mask(layer.weight.shape, node["dead"], generator)
            if layer.bias is not None:
                masks[f"n{i}.bias"] = _bias_mask(layer.bias.shape[0], node["dead"]["zero_bias"])
        elif op == "norm" and node["affine"]:
            layer = getattr(model, f"n{i}")
            masks[f"n{i}.weight"] = _bias_mask(node["channels"], node["zero_weight"])
            if getattr(layer, "bias", None) is not None:
                masks[f"n{i}.bias"] = _bias_mask(node["channels"], node["zero_bias"])
        elif op == "attention":
            attention, hd = getattr(model, f"n{i}"), node["head_dim"]
            heads = node["dead_heads"]
            for name in ("q", "k", "v", "o"):
                linear = getattr(attention, name)
                blocks = [list(range(h * hd, (h + 1) * hd)) for h in heads[name]]
                rows, cols = (blocks, ()) if name != "o" else ((), blocks)
                masks[f"n{i}.{name}.weight"] = _dead_mask(linear.weight.shape, node["dead"][name], generator, rows, cols)
                if linear.bias is not None:
                    zero = node["dead"][name]["zero_bias"] + (sum(blocks, []) if name != "o" else [])
                    masks[f"n{i}.{name}.bias"] = _bias_mask(linear.bias.shape[0], zero)
    return model, masks


def _bias_mask(size: int, zero) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[list(zero)] = False
    return mask
