"""The channel dependency graph: groups, explanations, exports, tables."""
from __future__ import annotations

import json
import shutil

import networkx as nx
import pytest
import torch
from torch import nn

import fxmin
from examples.audit_resnet_like import build_masks, build_model

INPUT = (torch.randn(1, 3, 16, 16),)


@pytest.fixture(scope="module")
def audit():
    return fxmin.dependency_graph(build_model(), build_masks(), INPUT)


def test_groups_are_coupled_axes(audit):
    groups = audit.graph.nodes
    # The residual stream: the stem and both blocks' second convs write the same 16 channels.
    stream = groups["stem"]
    assert stream["kind"] == "coupled"
    assert set(stream["writers"].split(",")) == {"stem", "layer1_0_conv2", "layer1_1_conv2"}
    assert (stream["size"], stream["kept"]) == (16, 16)
    # A block's inner conv: 6 filters pruned, 3 of them removed, 3 blocked by the padded reader.
    inner = groups["layer1.0.conv1"]
    assert (inner["size"], inner["kept"], inner["removed"], inner["blocked"]) == (16, 13, 3, 3)
    assert "layer1_0_bn1" in inner["members"].split(",")


def test_edges_are_read_write_dependencies(audit):
    edges = set(audit.graph.edges)
    assert ("input:x", "stem") in edges
    assert ("stem", "layer1.0.conv1") in edges and ("layer1.0.conv1", "stem") in edges
    assert ("fc", "output") in edges
    assert audit.graph.edges["layer1.0.conv1", "stem"]["via"] == "layer1_0_conv2"


def test_sizes_agree_with_minimize():
    model, masks = build_model(), build_masks()
    audit = fxmin.dependency_graph(model, masks, INPUT)
    result = fxmin.minimize(model, masks, INPUT)
    assert result.module.get_submodule("layer1.0.conv1").out_channels == audit.graph.nodes["layer1.0.conv1"]["kept"] == 13
    rows = {row["layer"]: row for row in audit.layer_rows()}
    assert rows["layer1.0.conv1"]["before"] == "16x16x3x3" and rows["layer1.0.conv1"]["after"] == "13x16x3x3"
    assert rows["layer1.0.conv2"]["after"] == "16x13x3x3"


def test_explain_removed_kept_and_blocked(audit):
    removed = audit.explain("layer1.0.conv1.weight", 0)
    assert removed.startswith("removed:") and "constant 0" in removed and "folded" in removed
    blocked = [audit.explain("layer1.0.conv1.weight", c) for c in range(6)]
    blocked = [text for text in blocked if text.startswith("kept")]
    assert len(blocked) == 3
    assert all("nonzero constant into zero-padded conv layer1.0.conv2" in text for text in blocked)
    needed = audit.explain("layer1.0.conv1.weight", 10)
    assert needed.startswith("kept:") and "reader 'layer1_0_conv2'" in needed
    assert "model output" in audit.explain("fc.weight", 3)
    # module paths and node names work too
    assert audit.explain("layer1.0.conv1", 0) .startswith("removed")
    with pytest.raises(KeyError, match="neither a parameter"):
        audit.explain("no.such.weight", 0)
    with pytest.raises(IndexError, match="out of range"):
        audit.explain("layer1.0.conv1.weight", 99)


def test_explain_unneeded_channel():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 3] = False  # nobody reads hidden unit 3
    audit = fxmin.dependency_graph(net, {"2.weight": mask})
    text = audit.explain("0.weight", 3)
    assert text.startswith("removed:") and "no surviving computation reads it" in text
    assert audit.explain("0.weight", 2).startswith("kept:")


def test_exports_round_trip(audit, tmp_path):
    data = json.loads(audit.to_json())
    graph = nx.node_link_graph(data, edges="links")
    assert set(graph.nodes) == set(audit.graph.nodes) and set(graph.edges) == set(audit.graph.edges)
    assert {row["layer"] for row in data["layers"]} >= {"stem", "fc", "layer1.0.conv1"}
    audit.to_graphml(tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.nodes["layer1.0.conv1"]["kept"] == 13
    dot = audit.to_dot()
    assert dot.startswith("digraph") and '"layer1.0.conv1" -> "stem"' in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")
def test_svg(audit, tmp_path):
    svg = audit.to_svg(tmp_path / "g.svg")
    assert "<svg" in svg and (tmp_path / "g.svg").exists()


def test_table(audit):
    text = audit.table()
    assert "layer1.0.conv1" in text and "16x16x3x3" in text and "13x16x3x3" in text
    assert "nonzero constant into zero-padded conv layer1.0.conv2 (3)" in text


def test_the_audit_keeps_its_0_1_0_name():
    assert fxmin.analyze is fxmin.dependency_graph
