"""The benchmarks' own code (benchmarks/): the one markdown-section writer, the deployed-size measure, the
CLN of an earlier revision."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.markdown import replace_section
from test_experiments import _loop_with_checkpoints, _record

pytest.importorskip("tabulate")


def test_replace_section_appends_then_replaces_in_place_and_keeps_the_rest(tmp_path):
    path = tmp_path / "page.md"
    replace_section(path, "table", "| a |", heading="# Page")  # a missing page starts with the heading
    assert path.read_text() == "# Page\n\n<!-- table begins -->\n| a |\n<!-- table ends -->\n"
    path.write_text(path.read_text() + "\nby hand\n")
    replace_section(path, "other", "| x |")
    replace_section(path, "table", "| b |\n")
    text = path.read_text()
    assert text.count("<!-- table begins -->") == 1 and "| a |" not in text and "| b |" in text
    assert text.index("| b |") < text.index("by hand") < text.index("| x |")  # replaced where it was


def test_deployed_benchmark_measures_ratios_against_the_dense_model(tmp_path):
    from benchmarks.deployed import measure, tensor_bytes, weight_bytes
    import fxmin
    net, result, x = _loop_with_checkpoints(tmp_path)
    table, ratios, keys = measure({0: {"dense": net, "squeeze-release": result.module}},
                                  lambda batch: (x[:batch],), [1, 8], ["eager"], warmup=1, runs=3)
    assert keys == [(1, "eager"), (8, "eager")]
    assert ratios["dense", "bytes"] == [1.0] and ratios["dense", (1, "eager")] == [1.0]
    assert ratios["squeeze-release", "bytes"] == [weight_bytes(net) / weight_bytes(result.module)]
    assert ratios["squeeze-release", "tensor bytes"] == [tensor_bytes(net) / tensor_bytes(result.module)]
    assert tensor_bytes(net) == 4 * fxmin.count_parameters(net) < weight_bytes(net)
    assert ratios["squeeze-release", "bytes"][0] > 1 and len(ratios["squeeze-release", (8, "eager")]) == 1
    assert "Squeeze-Release (ours)" in table and "fewer MACs" in table


def test_deployed_benchmark_keeps_a_mac_priced_run_apart_from_the_plain_one(tmp_path):
    """Two raw files of one seed, one with --mac-power: both models are measured, as two methods."""
    from benchmarks.deployed import LABELS, convnext_models
    import fxmin
    net, result, x = _loop_with_checkpoints(tmp_path / "squeeze-release")
    entry = {"params": fxmin.count_parameters(result.module), "best_cycle": result.best_cycle}
    paths = []
    for power in (0.0, 0.5):
        record = _record({"squeeze-release": entry}, f"--mac-power {power}")
        record["args"].update(mac_power=power, checkpoints=str(tmp_path))
        paths.append(tmp_path / f"results-{power}.json")
        paths[-1].write_text(json.dumps(record))
    seeds, _, _ = convnext_models([str(p) for p in paths])
    assert sorted(seeds[0]) == ["dense", "squeeze-release", "squeeze-release-mac0.5"]
    assert LABELS["squeeze-release-mac0.5"] == "Squeeze-Release (ours), MAC-priced (power 0.5)"
    assert fxmin.count_parameters(seeds[0]["squeeze-release-mac0.5"]) == entry["params"]


def test_cln_revisions_runs_a_revisions_cln_on_the_same_module_and_refuses_an_unknown_revision():
    """benchmarks/cln_revisions.py: the CLN of a git revision (here HEAD) computes what this checkout's
    does on the same buffers and parameters; a revision git does not know is a clear error."""
    import os
    import shutil
    import subprocess

    import torch
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                                                    capture_output=True).returncode != 0:
        pytest.skip("needs git and a git checkout")
    from benchmarks.cln_revisions import as_revision, revision_class
    import fxmin
    cls = revision_class("HEAD")
    model = torch.nn.Sequential(torch.nn.Linear(4, 6),
                                fxmin.CompensatedLayerNorm(8, [0, 2, 3, 5, 6, 7], {1: 0.0, 4: 0.0}, [7, 0, 4]))
    copy = as_revision(model, cls)
    assert type(copy[1]) is cls and type(model[1]) is fxmin.CompensatedLayerNorm
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(copy(x), model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(SystemExit, match="cannot read fxmin at revision 'no-such-revision'"):
        revision_class("no-such-revision")


def test_deployed_reminimize_replaces_ours_by_what_minimize_makes_of_it_and_leaves_dense_alone():
    """benchmarks/deployed.py --reminimize: an emptied residual branch leaves ours; dense and (c) stay as given."""
    import torch
    from torch import nn

    from benchmarks.deployed import reminimize

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.stem(x)
            return self.head(h + self.fc2(torch.relu(self.fc1(h))))

    torch.manual_seed(0)
    ours = Residual().eval()  # as an older fxmin left an emptied branch: no units, the bias still added
    ours.fc1, ours.fc2 = nn.Linear(6, 0), nn.Linear(0, 6)
    dense, small = Residual().eval(), nn.Linear(4, 2)
    seeds = {0: {"dense": dense, "small": small, "squeeze-release": ours}}
    reminimize(seeds, lambda batch: (torch.randn(batch, 4),))
    assert seeds[0]["dense"] is dense and seeds[0]["small"] is small
    called = {n.target for n in seeds[0]["squeeze-release"].graph.nodes if n.op == "call_module"}
    assert called == {"stem", "head"}
    x = torch.randn(5, 4)
    torch.testing.assert_close(seeds[0]["squeeze-release"](x), ours(x))


@pytest.mark.parametrize("family, config", [
    ("llama", dict(vocab_size=256, dim=64, n_layer=2, heads=4, kv_heads=2, hidden=128, block_size=64)),
    ("hf-llama", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False))])
def test_scale_benchmark_minimizes_a_llama_in_bfloat16_and_counts_what_it_holds(monkeypatch, family, config):
    from benchmarks import scale

    monkeypatch.setitem(scale.MODELS, "tiny-llama", (family, config, "bfloat16", "a tiny Llama"))
    record = scale.child("tiny-llama", 8)
    assert record["verified"] and record["dtype"] == "bfloat16" and set(record["errors"]) == {"float64", "bfloat16"}
    # half of the 128 hidden units of each layer: 64 rows of gate_proj and of up_proj, 64 columns of down_proj
    assert record["params_before"] - record["params_after"] == 2 * 3 * 64 * 64
    assert record["model_bytes"] >= 2 * record["params_before"] and record["largest"] == 256 * 64 * 2
    assert set(record["phases"]) == {"trace", "analysis", "plan", "rewrite", "verify"}



def test_the_bool_kernels_benchmark_asks_torch_and_numpy_the_same_questions():
    from benchmarks import bool_kernels

    for question, in_torch, in_numpy in bool_kernels.cases(seed=0):
        assert np.array_equal(np.asarray(in_torch()), in_numpy()), question
