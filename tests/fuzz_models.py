"""The model a fuzz description stands for (``fuzz_descriptions``): ``build`` -> ``(model, masks)``.

Submodule ``n{i}`` is node ``i``'s layer (``n{i}.q`` ... ``n{i}.o`` for attention), so parameter names
say which node they belong to; weights, biases, norm affines and BatchNorm statistics are random from the
description's seed, and the masks plant its dead rows, columns, heads, zero biases and zero norm scales.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fuzz_descriptions import SPATIAL, family


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
