"""Current Hugging Face families (transformers 5.x; tiny random configs from benchmarks/hf_families.py,
nothing downloaded) through the torch.export front end: planted dead MLP units go and the result
computes the masked model in float64. A family whose canonical graph still holds an op without a
rule raises MissingRuleError naming that op: xfail(strict=True), so the test flips when the rule lands.

The families beyond a fast few are marked slow (seconds of export each): ``pytest -m slow tests/test_hf_export.py``.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils._pytree import tree_flatten

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"needs transformers 5.x (the test extra pins 5.23.0), found {transformers.__version__}; "
                "transformers 4.x models go through its FX tracer: tests/test_huggingface.py", allow_module_level=True)

import fxmin  # noqa: E402
from benchmarks.hf_families import dead_mlp_masks, families  # noqa: E402
from fxmin.verify import default_dtype  # noqa: E402
from tests.helpers import masked_copy  # noqa: E402

#: run in `make test` (Llama in test_llama_program_keeps_the_model_output_and_names); the others are slow
FAST = ("gpt2", "vit")

#: family -> the op named by the MissingRuleError it raises until a rule for it lands (the first in graph
#: order; the next one may follow). Mixture-of-experts routing is refused loudly, never guessed.
MISSING = {"mixtral": "torch.ops.aten.topk.default"}


def _case(name):
    marks = [] if name in FAST else [pytest.mark.slow]
    if name in MISSING:
        marks.append(pytest.mark.xfail(strict=True, raises=fxmin.MissingRuleError,
                                       reason=f"no rule yet for {MISSING[name]}"))
    return pytest.param(name, marks=marks, id=name)


def _flat_outputs(outputs) -> list:
    leaves, _ = tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def assert_exact(model, masks, inputs, result) -> float:
    """The HF model with the masks applied vs the minimized module, both in float64, on the example inputs."""
    reference = masked_copy(model, masks).double()
    minimized = copy.deepcopy(result.module).double().eval()
    as64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), default_dtype(torch.float64):
        expected = _flat_outputs(reference(**as64))
        tensors = [as64[name] for name in (n.target for n in minimized.graph.nodes if n.op == "placeholder")]
        actual = _flat_outputs(minimized(*tensors))
    assert len(actual) == len(expected)
    worst = 0.0
    for want, got in zip(expected, actual):
        assert got.shape == want.shape
        worst = max(worst, float((want - got).abs().max()) / max(1.0, float(want.abs().max())))
    assert worst < 1e-6, f"max relative error {worst:.3g}"
    return worst


@pytest.mark.parametrize("name", [_case(name) for name in families()])
def test_dead_mlp_units_go_exactly(name):
    model, inputs = families()[name]()
    masks = dead_mlp_masks(name, model)
    try:
        result = fxmin.minimize(model, masks, inputs)
    except fxmin.MissingRuleError as error:
        assert name in MISSING and MISSING[name] in str(error), str(error)
        raise
    assert result.frontend == "export"  # torch.fx cannot trace transformers 5.x models
    planted_rows = sum(int((~mask).sum()) for mask in masks.values())  # the masked weights' zeroed entries
    assert result.report.params_after <= result.report.params_before - planted_rows
    assert_exact(model, masks, inputs, result)


def test_llama_program_keeps_the_model_output_and_names(tmp_path):
    """Rotary tables (a no_grad region: a higher-order op), RMSNorm as pow/mean/rsqrt/mul, SDPA with a causal mask."""
    model, inputs = families()["llama"]()
    masks = dead_mlp_masks("llama", model)
    result = fxmin.minimize(model, masks, inputs)
    assert result.frontend == "export"
    assert_exact(model, masks, inputs, result)
    torch.export.save(result.program, tmp_path / "llama.pt2")
    loaded = torch.export.load(tmp_path / "llama.pt2")
    kept = model.config.intermediate_size - len(range(0, model.config.intermediate_size, 4))
    assert tuple(loaded.state_dict["model.layers.0.mlp.up_proj.weight"].shape) == (kept, model.config.hidden_size)
    with torch.no_grad():
        logits = loaded.module()(**inputs).logits
        torch.testing.assert_close(logits, masked_copy(model, masks)(**inputs).logits, atol=1e-5, rtol=1e-5)
