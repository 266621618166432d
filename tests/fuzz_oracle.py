"""The fuzzer's oracle: what may leave a model of ``fuzz_descriptions``, from its description alone.

Plain numpy over the masked weights and the description; it shares no code with fxmin (it never sees
an FX graph). It states fxmin's contract (docs/concepts.md, docs/exactness.md,
docs/compensated-layernorm.md) for the ops the generator draws:

- **Constants, forward.** A layer's output channel is ``const(b + Σ tap_sum·c)`` iff every nonzero
  weight into it reads a constant channel, and, behind zero padding, a ``const(0)`` one. Elementwise
  ops, BatchNorm (``γ == 0`` gives ``const(β)``), ``cat`` and pieces carry constants; a LayerNorm /
  RMSNorm / ``GroupNorm(1, C)`` output is constant iff its scale is 0 there or all its inputs are
  constant; an attention output dim is constant iff its value dim is (softmax weights sum to 1).
- **Units.** Channels that must stay or go together are joined (``networkx`` union-find): the
  operands and result of ``add``/``mul`` (unless an operand is constant in every channel: it becomes a
  broadcast constant and its branch is cut off), BatchNorm and elementwise ops, depthwise conv inputs
  and outputs, ``cat`` and pieces by offset, query and key dims of a head (all query heads of a
  key/value group), a value dim and the output dims of its heads.
- **Need, backward to a fixed point.** The outputs need all their channels. A layer needs the varying
  input channels its kept rows read (and the nonzero constant ones behind zero padding); a norm needs
  all its varying inputs while any output is kept; attention needs the q/k dims of a head whose
  output varies in some kept dim, except where the key dim is constant (softmax ignores a shift per
  query) or the query dim is ``const(0)``. A unit is kept iff something needs it.

That is the *ideal*. fxmin documents conservative choices beyond it; :data:`LIMITS` names those the
oracle can also apply (``limits=True``), so a difference between fxmin and the ideal is either one
of them or a finding.
"""
from __future__ import annotations

import math

import numpy as np
from networkx.utils import UnionFind

from fuzz_descriptions import SPATIAL

#: named limits: documented choices by which fxmin keeps more than the ideal (docs/reliability.md)
LIMITS = {
    "no-empty-conv": "a conv keeps channel 0 of its input and output when all would go (torch has no "
                     "zero-channel convolution)",
    "no-empty-batchnorm": "a BatchNorm keeps channel 0 when all would go (torch has no zero-feature BatchNorm)",
    "uniform-groups": "a grouped conv keeps every surviving group as full as the fullest one",
    "uniform-chunks": "the pieces of a chunk keep equally many channels (chunk makes equal pieces): a "
                      "smaller piece keeps its first missing channels too",
    "coupled-constant-operand": "an operand constant in every channel still couples with the stream: its "
                                "channels stay in the plan (its layers leave as 'read by nothing')",
    "constant-operand-read-twice": "c + c (or c * c) with c constant in every channel stays as it is: "
                                   "the other read would keep c, and gives the result its shape",
    "constant-branch-needs": "a branch that leaves as a constant operand still made its requirements during "
                             "the analysis (e.g. no-empty-conv keeps channel 0 of the input it read)",
    "constant-key-dim": "a q/k dim that is a nonzero constant in q or k stays (softmax's shift "
                        "invariance along the keys is not used)",
    "head-alive-by-constant": "an attention head stays when any of its output dims is kept, even a "
                              "constant one, and keeps its q/k dims",
    "head-keeps-a-dim": "a kept head keeps at least one q/k dim and one value dim",
    "uniform-heads": "every kept head keeps as many dims as the fullest one (the views need one head size)",
    "attention-not-followed": "attention with head_dim 1, or with grouped-query heads (repeat_kv), is not "
                              "followed: every q/k/v/o channel stays",
}

_LAYERS = ("linear", "conv", "cl_linear", "flatten_linear")
_erf = np.vectorize(math.erf)
_ACT = {
    "relu": lambda x, s: np.maximum(x, 0.0),
    "gelu": lambda x, s: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "tanh": lambda x, s: np.tanh(x),
    "sigmoid": lambda x, s: 1.0 / (1.0 + np.exp(-x)),
    "scale": lambda x, s: x * s,
}


class Layer:
    """One weight as the oracle reads it: which input channels each row reads (nonzero taps), the
    sums of its taps, its bias, and where it sits (``path``, input and output tensors)."""

    def __init__(self, path, source, target, weight, bias, groups=1, padded=False, block=1):
        out = weight.shape[0]
        if block > 1:  # flatten: input channel c is the block of features c*block .. (c+1)*block - 1
            weight = weight.reshape(out, -1, block)
        taps = tuple(range(2, weight.ndim))
        per_group = weight.shape[1]
        cin = per_group * groups
        self.nonzero = np.zeros((out, cin), bool)
        self.tap_sum = np.zeros((out, cin))
        for row in range(out):
            group = row // (out // groups)
            cols = slice(group * per_group, (group + 1) * per_group)
            self.nonzero[row, cols] = (weight[row] != 0).any(axis=tuple(t - 1 for t in taps)) if taps else weight[row] != 0
            self.tap_sum[row, cols] = weight[row].sum(axis=tuple(t - 1 for t in taps)) if taps else weight[row]
        self.bias = bias if bias is not None else np.zeros(out)
        self.path, self.source, self.target = path, source, target
        self.node = int(path.split(".")[0][1:])  # the description's node: path 'n3' or 'n3.q'
        self.conv = weight.ndim > 2 and block == 1
        self.groups, self.padded, self.block = groups, padded, block
        self.depthwise = groups > 1 and per_group == 1 and groups == cin

    def forward(self, const, value):
        reads_varying = (self.nonzero & (~const | (self.padded & (value != 0)))).any(axis=1)
        out_value = self.bias + self.tap_sum @ np.where(const, value, 0.0)
        return ~reads_varying, np.where(reads_varying, 0.0, out_value)


class Oracle:
    """Facts, units and kept channels of one description, with or without the named limits."""

    def __init__(self, description: dict, params: dict, buffers: dict, limits: bool = False):
        self.description = description
        self.params, self.buffers = params, buffers
        self.limits = limits
        self.fired: set = set()  # the limits that kept anything
        self.opaque = {i for i, node in enumerate(description["nodes"]) if limits and node["op"] == "attention"
                       and node["head_dim"] == 1}
        self.facts: dict = {}  # tensor key -> (const, value); keys: node index, or (index, 'q'|'k'|'v'|'o')
        self.layers: list = []
        self._forward()
        self.cut = self._cut_operands()
        self.dropped = self._dropped()

    def _cut_operands(self) -> set:
        """``(operand, node, slot)`` reads of ``add``/``mul`` whose operand is constant in every channel: it
        becomes a broadcast constant (the ideal cuts every such read; fxmin the first one, and none of
        ``c + c``, where the other read keeps ``c``: ``constant-operand-read-twice``)."""
        cut = set()
        for i, node in enumerate(self.description["nodes"]):
            if node["op"] in ("add", "mul"):
                full = [(j, i, slot) for slot, j in enumerate(node["inputs"]) if self._full(j)]
                if self.limits:
                    full = [] if len(set(node["inputs"])) < len(node["inputs"]) else full[:1]
                cut.update(full)
        return cut

    def _dropped(self) -> set:
        """Nodes that nothing reads once the cut reads are gone (their layers leave the model)."""
        nodes, outputs = self.description["nodes"], set(self.description["outputs"])
        dropped: set = set()
        for j in reversed(range(1, len(nodes))):
            users = [(k, slot) for k, n in enumerate(nodes) for slot, src in enumerate(n["inputs"]) if src == j]
            if users and j not in outputs and all((j, k, slot) in self.cut or k in dropped for k, slot in users):
                dropped.add(j)
        return dropped

    # -- constants ----------------------------------------------------------------------------------------------
    def _layer(self, path, source, target, node, kind) -> Layer:
        weight, bias = self.params.get(f"{path}.weight"), self.params.get(f"{path}.bias")
        padded = node.get("kernel", 1) > 1
        block = math.prod(SPATIAL[kind]) if node["op"] == "flatten_linear" else 1
        layer = Layer(path, source, target, weight, bias, node.get("groups", 1), padded, block)
        self.layers.append(layer)
        self.facts[target] = layer.forward(*self.facts[source])
        return layer

    def _forward(self) -> None:
        kind = self.description["kind"]
        for i, node in enumerate(self.description["nodes"]):
            op, inputs = node["op"], node["inputs"]
            c = node["channels"]
            if op == "input":
                self.facts[i] = (np.zeros(c, bool), np.zeros(c))
            elif op in _LAYERS:
                self._layer(f"n{i}", inputs[0], i, node, kind)
            elif op == "norm":
                self.facts[i] = self._norm(i, node, *self.facts[inputs[0]])
            elif op == "act":
                const, value = self.facts[inputs[0]]
                self.facts[i] = (const, np.where(const, _ACT[node["fn"]](value, node["scale"]), 0.0))
            elif op in ("add", "mul"):
                (ca, va), (cb, vb) = self.facts[inputs[0]], self.facts[inputs[1]]
                const = ca & cb
                value = va + vb if op == "add" else va * vb
                if op == "mul":
                    zero = (ca & (va == 0)) | (cb & (vb == 0))
                    const, value = const | zero, np.where(zero, 0.0, value)
                self.facts[i] = (const, np.where(const, value, 0.0))
            elif op == "cat":
                parts = [self.facts[j] for j in inputs]
                self.facts[i] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            elif op == "piece":
                start = sum(node["sizes"][:node["index"]])
                const, value = self.facts[inputs[0]]
                self.facts[i] = (const[start:start + c], value[start:start + c])
            elif op == "attention":
                for name in ("q", "k", "v"):
                    self._layer(f"n{i}.{name}", inputs[0], (i, name), node, kind)
                const, value = self.facts[(i, "v")]
                self.facts[(i, "o")] = (const[self._value_dim(node)], value[self._value_dim(node)])
                if i in self.opaque:  # not followed: its output varies everywhere
                    self.facts[(i, "o")] = (np.zeros(len(self._value_dim(node)), bool), np.zeros(len(self._value_dim(node))))
                self._layer(f"n{i}.o", (i, "o"), i, node, kind)

    @staticmethod
    def _value_dim(node) -> np.ndarray:
        """For each output dim ``h * hd + e`` of attention, the value dim it copies."""
        heads, kv_heads, hd = node["heads"], node["kv_heads"], node["head_dim"]
        group = heads // kv_heads
        return np.array([(h // group) * hd + e for h in range(heads) for e in range(hd)], int)

    def _norm(self, i, node, const, value):
        c = node["channels"]
        weight = self.params.get(f"n{i}.weight")
        weight = weight if weight is not None else np.ones(c)
        bias = self.params.get(f"n{i}.bias")
        bias = bias if bias is not None else np.zeros(c)
        if node["norm"] == "bn":
            mean, var = self.buffers[f"n{i}.running_mean"], self.buffers[f"n{i}.running_var"]
            out = weight * (value - mean) / np.sqrt(var + 1e-5) + bias
            out = np.where(weight == 0, bias, out)
            return const | (weight == 0), np.where(const | (weight == 0), out, 0.0)
        if const.all():  # every input constant: the whole normalized vector is
            if node["norm"].startswith("rms"):
                out = value / np.sqrt((value ** 2).mean() + 1e-12) * weight
            else:
                centered = value - value.mean()
                out = centered / np.sqrt((centered ** 2).mean() + 1e-5) * weight + bias
            return np.ones(c, bool), out
        return weight == 0, np.where(weight == 0, bias, 0.0)

    # -- units and need ----------------------------------------------------------------------------------------
    def _full(self, key) -> bool:
        return bool(self.facts[key][0].all())

    def units(self) -> UnionFind:
        units = UnionFind()
        for key, (const, _) in self.facts.items():
            for ch in range(len(const)):
                units[(key, ch)]
        for i, node in enumerate(self.description["nodes"]):
            op, inputs = node["op"], node["inputs"]
            if op in ("act",) or (op == "norm" and node["norm"] == "bn"):
                for ch in range(node["channels"]):
                    units.union((inputs[0], ch), (i, ch))
            elif op in ("add", "mul"):
                joined = [j for slot, j in enumerate(inputs) if self.limits or (j, i, slot) not in self.cut]
                for ch in range(node["channels"]):
                    units.union((i, ch), *[(j, ch) for j in joined])
            elif op == "cat":
                offset = 0
                for j in inputs:
                    size = len(self.facts[j][0])
                    for ch in range(size):
                        units.union((i, offset + ch), (j, ch))
                    offset += size
            elif op == "piece":
                start = sum(node["sizes"][:node["index"]])
                for ch in range(node["channels"]):
                    units.union((i, ch), (inputs[0], start + ch))
            elif op == "attention" and i not in self.opaque:
                group, hd = node["heads"] // node["kv_heads"], node["head_dim"]
                for h in range(node["heads"]):
                    for e in range(hd):
                        kv = (h // group) * hd + e
                        units.union(((i, "q"), h * hd + e), ((i, "k"), kv))
                        units.union(((i, "v"), kv), ((i, "o"), h * hd + e))
        for layer in self.layers:
            if layer.depthwise:
                multiplier = layer.nonzero.shape[0] // layer.nonzero.shape[1]
                for row in range(layer.nonzero.shape[0]):
                    units.union((layer.source, row // multiplier), (layer.target, row))
        return units

    def kept(self):
        """``(present, fired)``: per tensor key the kept channels (bool), and the limits that kept any."""
        units = self.units()
        present: set = set()
        fired: set = set(self.fired)

        def mask(key):
            return np.array([units[(key, ch)] in present for ch in range(len(self.facts[key][0]))], bool)

        def require(key, wanted, limit=None):
            roots = {units[(key, ch)] for ch in np.nonzero(wanted)[0]} - present
            if roots:
                present.update(roots)
                if limit:
                    fired.add(limit)
                return True
            return False

        nodes = self.description["nodes"]
        if self.limits and any(n["op"] in ("add", "mul") and any(self._full(j) for j in n["inputs"]) for n in nodes):
            fired.add("coupled-constant-operand")
        if self.limits and any(n["op"] in ("add", "mul") and len(set(n["inputs"])) < len(n["inputs"])
                               and self._full(n["inputs"][0]) for n in nodes):
            fired.add("constant-operand-read-twice")
        for j in self.description["outputs"]:
            require(j, np.ones(len(self.facts[j][0]), bool))
        changed = True
        while changed:
            changed = False
            for layer in reversed(self.layers):
                needs = self._needs_of(layer.node, require)
                if needs is not None:
                    changed |= self._layer_needs(layer, mask, needs)
            for i, node in reversed(list(enumerate(nodes))):
                require_here = self._needs_of(i, require)
                if require_here is None:
                    continue
                const = self.facts[node["inputs"][0]][0] if node["inputs"] else None
                if node["op"] == "norm" and node["norm"] != "bn":
                    if mask(i).any():
                        changed |= require_here(node["inputs"][0], ~const)
                elif node["op"] == "norm" and self.limits and not mask(i).any():  # a BatchNorm
                    changed |= require_here(i, np.eye(1, len(const), dtype=bool)[0], "no-empty-batchnorm")
                elif node["op"] == "attention":
                    changed |= self._attention_needs(i, node, mask, require_here)
            if self.limits:
                changed |= self._uniform_chunks(mask, require)
        return {key: mask(key) for key in self.facts}, fired

    def _needs_of(self, node: int, require):
        """How node ``node`` requires channels: not at all when the ideal drops it; fxmin's analysis runs
        before its plan drops a constant branch, so there the branch's requirements count (a limit)."""
        if node not in self.dropped:
            return require
        if not self.limits:
            return None
        return lambda key, wanted, limit=None: require(key, wanted, limit or "constant-branch-needs")

    def _uniform_chunks(self, mask, require) -> bool:
        """Pieces of a chunk keep equally many channels: a smaller piece keeps its first missing ones too."""
        changed = False
        chunks = {(n["inputs"][0], tuple(n["sizes"])) for n in self.description["nodes"]
                  if n["op"] == "piece" and n["how"] == "chunk"}
        for src, sizes in sorted(chunks):
            present = mask(src)
            bounds = np.cumsum((0,) + sizes)
            target = max(int(present[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
            grow = np.zeros_like(present)
            for a, b in zip(bounds[:-1], bounds[1:]):
                grow[a + np.nonzero(~present[a:b])[0][:target - int(present[a:b].sum())]] = True
            changed |= require(src, grow, "uniform-chunks")
        return changed

    def _layer_needs(self, layer, mask, require) -> bool:
        const, value = self.facts[layer.source]
        rows = mask(layer.target)
        changed = False
        conv = layer.conv
        if self.limits and conv and not rows.any():
            changed |= require(layer.target, np.eye(1, len(rows), dtype=bool)[0], "no-empty-conv")
            rows = mask(layer.target)
        reads = layer.nonzero[rows].any(axis=0)
        changed |= require(layer.source, reads & ~const)
        if layer.padded:
            changed |= require(layer.source, reads & const & (value != 0))
        if self.limits and conv and layer.groups > 1 and not layer.depthwise:
            inputs, outputs = _uniform_groups(mask(layer.source), mask(layer.target), layer.groups)
            changed |= require(layer.source, inputs, "uniform-groups")
            changed |= require(layer.target, outputs, "uniform-groups")
        if self.limits and conv and not mask(layer.source).any():
            changed |= require(layer.source, np.eye(1, len(const), dtype=bool)[0], "no-empty-conv")
        return changed

    def _attention_needs(self, i, node, mask, require) -> bool:
        heads, hd, group = node["heads"], node["head_dim"], node["heads"] // node["kv_heads"]
        if i in self.opaque:
            return any([require((i, name), np.ones(len(self.facts[(i, name)][0]), bool), "attention-not-followed")
                        for name in ("q", "k", "v", "o")])
        o_const = self.facts[(i, "o")][0]
        kept_o = mask((i, "o")).reshape(heads, hd)
        qc, qv = self.facts[(i, "q")]
        kc, kv = self.facts[(i, "k")]
        to_key = _query_to_key(heads, group, hd)
        zero = (qc & (qv == 0)) | (kc & (kv == 0))[to_key]
        key_const = kc[to_key]
        alive = (kept_o & ~o_const.reshape(heads, hd)).any(axis=1)
        changed = require((i, "q"), np.repeat(alive, hd) & ~zero & ~key_const)
        if not self.limits:
            return changed
        changed |= require((i, "q"), np.repeat(alive, hd) & ~zero & key_const, "constant-key-dim")
        alive_any = kept_o.any(axis=1)
        if node["form"] == "sdpa":
            alive_any |= mask((i, "q")).reshape(heads, hd).any(axis=1)
        changed |= require((i, "q"), np.repeat(alive_any, hd) & ~zero, "head-alive-by-constant")
        first = np.zeros((heads, hd), bool)
        first[:, 0] = alive_any
        for name in ("q", "o"):
            changed |= require((i, name), first.reshape(-1) & ~mask((i, name)).reshape(heads, hd).any(axis=1).repeat(hd),
                               "head-keeps-a-dim")
        for name, count in (("q", heads), ("k", node["kv_heads"]), ("v", node["kv_heads"]), ("o", heads)):
            changed |= require((i, name), _uniform_heads(mask((i, name)).reshape(count, hd)), "uniform-heads")
        return changed


def _query_to_key(heads: int, group: int, hd: int) -> np.ndarray:
    """For each query dim ``h * hd + e``, the key dim it meets."""
    return np.array([(h // group) * hd + e for h in range(heads) for e in range(hd)], int)


def _uniform_heads(grid: np.ndarray) -> np.ndarray:
    """Every head with a kept dim keeps as many as the fullest (its first missing dims are added)."""
    grid = grid.copy()
    alive = grid.any(axis=1)
    if alive.any():
        target = grid.sum(axis=1).max()
        for h in np.nonzero(alive)[0]:
            grid[h, np.nonzero(~grid[h])[0][:target - grid[h].sum()]] = True
    return grid.reshape(-1)


def _uniform_groups(inputs: np.ndarray, outputs: np.ndarray, groups: int):
    """Grow the masks so that every group with anything left keeps as many inputs, and as many
    outputs, as the fullest group (the first channels of a group that are missing are added)."""
    inputs, outputs = inputs.reshape(groups, -1).copy(), outputs.reshape(groups, -1).copy()
    alive = inputs.any(axis=1) | outputs.any(axis=1)
    for grid in (inputs, outputs):
        target = grid[alive].sum(axis=1).max() if alive.any() else 0
        for g in np.nonzero(alive)[0]:
            missing = np.nonzero(~grid[g])[0][:target - grid[g].sum()]
            grid[g, missing] = True
    return inputs.reshape(-1), outputs.reshape(-1)


def layer_kept(oracle: Oracle, present: dict) -> dict:
    """Per layer path: ``(rows kept, input channels kept)`` as sets (both empty for a layer with no row)."""
    kept = {}
    for layer in oracle.layers:
        if layer.node in oracle.dropped:
            kept[layer.path] = (set(), set())
            continue
        rows = set(np.nonzero(present[layer.target])[0].tolist())
        cols = set(np.nonzero(present[layer.source])[0].tolist()) if rows else set()
        kept[layer.path] = (rows, cols)
    return kept


__all__ = ["LIMITS", "Layer", "Oracle", "layer_kept"]
