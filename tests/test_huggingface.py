"""Hugging Face GPT-2 and BERT (small configs, no weights) traced with transformers' FX tracer:
planted dead structure goes exactly, random masks stay exact. The legacy path: transformers 4.46.3
(``fxmin[hf-legacy]``, ``make test-hf-legacy``); skipped with transformers 5.x, which removed the tracer."""
from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
if not transformers.__version__.startswith("4."):
    pytest.skip(f"legacy HFTracer path: needs transformers 4.46.3, found {transformers.__version__} (5.x removed "
                "its FX tracer; its models go through torch.export, tests/test_hf_export.py). Run it with "
                "`make test-hf-legacy`.", allow_module_level=True)
from transformers.utils.fx import symbolic_trace  # noqa: E402

import fxmin  # noqa: E402
from fxmin.verify import default_dtype  # noqa: E402
from helpers import masked_copy  # noqa: E402

H, HD, D, VOCAB = 4, 16, 64, 100
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def gpt2(attention="sdpa"):
    config = transformers.GPT2Config(n_layer=2, n_head=H, n_embd=D, vocab_size=VOCAB, n_positions=32,
                                     attn_implementation=attention)
    return transformers.GPT2LMHeadModel(config).eval()


def bert(attention="sdpa"):
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=H, hidden_size=D, intermediate_size=128,
                                     vocab_size=VOCAB, max_position_embeddings=32, attn_implementation=attention)
    return transformers.BertModel(config).eval()


def gpt2_inputs(generator):
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=generator)}


def bert_inputs(generator):
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # padding in the second sequence
    types = torch.zeros(2, 8, dtype=torch.long)
    types[:, 4:] = 1
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=generator), "attention_mask": mask,
            "token_type_ids": types}


def assert_exact(model, masks, result, make_inputs, keys, tolerance=1e-6) -> float:
    """The untraced HF model with the masks applied vs the minimized GraphModule, in float64,
    on the example inputs and two random ones; returns the max error. The result holds float32
    weights (folded constants rounded to float32), hence agreement to float32 rounding."""
    reference = masked_copy(model, masks).double()
    minimized = copy.deepcopy(result.module).double().eval()
    names = [n.target for n in minimized.graph.nodes if n.op == "placeholder"]
    generator = torch.Generator().manual_seed(11)
    worst = 0.0
    with torch.no_grad(), default_dtype(torch.float64):
        for inputs in [dict(zip(names, result.example_inputs))] + [make_inputs(generator) for _ in range(2)]:
            expected = reference(**inputs)
            actual = minimized(*[inputs[name] for name in names])
            for key in keys:
                assert actual[key].shape == expected[key].shape
                scale = max(1.0, float(expected[key].abs().max()))
                worst = max(worst, float((actual[key] - expected[key]).abs().max()) / scale)
    assert worst <= tolerance, f"max relative error {worst:.3g}"
    return worst


def plant_gpt2(model):
    """Head 1 dead, q dim 3 of each head const(0), 10 constant MLP units, stream channel 5 dead.
    Conv1D stores weights as (in, out): an output unit is a column, an input feature a row."""
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()  # nonzero biases and LayerNorm parameters
        for i, block in enumerate(model.transformer.h):
            prefix = f"transformer.h.{i}."
            masks[prefix + "attn.c_proj.weight"][HD:2 * HD, :] = False
            for h in range(H):
                masks[prefix + "attn.c_attn.weight"][:, h * HD + 3] = False
                block.attn.c_attn.bias[h * HD + 3] = 0
            masks[prefix + "mlp.c_fc.weight"][:, :10] = False
            for name, layer in (("attn.c_proj", block.attn.c_proj), ("mlp.c_proj", block.mlp.c_proj)):
                masks[prefix + name + ".weight"][:, 5] = False
                layer.bias[5] = 0
        masks["transformer.wte.weight"][:, 5] = False  # tied with lm_head
        masks["transformer.wpe.weight"][:, 5] = False
    return masks


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_planted_structure_goes(attention):
    torch.manual_seed(0)
    model = gpt2(attention)
    masks = plant_gpt2(model)
    inputs = gpt2_inputs(torch.Generator().manual_seed(0))
    result = fxmin.minimize(model, masks, inputs, tracer=functools.partial(symbolic_trace, input_names=["input_ids"]))
    # before: wte 100x64, wpe 32x64, per block ln_1 128, c_attn 64x192+192, c_proj 64x64+64, ln_2 128,
    # c_fc 64x256+256, c_proj 256x64+64; ln_f 128; lm_head tied with wte
    block = 128 + 12_480 + 4_160 + 128 + 16_640 + 16_448
    assert result.report.params_before == 6_400 + 2_048 + 2 * block + 128 == 108_544
    # after: stream 63 wide; c_attn keeps 3 heads x (15 q + 15 k + 16 v) = 138 columns; c_proj reads
    # 48 value dims; 246 MLP units; ln_1/ln_2 keep 64 outputs (CompensatedLayerNorm), ln_f 63
    block = 128 + (64 * 138 + 138) + (48 * 63 + 63) + 128 + (64 * 246 + 246) + (246 * 63 + 63)
    assert result.report.params_after == 100 * 63 + 32 * 63 + 2 * block + 126 == 96_170
    assert result.module.lm_head.weight is result.module.transformer.wte.weight  # still tied
    assert tuple(result.module.transformer.wte.weight.shape) == (VOCAB, 63)
    assert_exact(model, masks, result, gpt2_inputs, ["logits"])


def plant_bert(model):
    """Head 1 dead, q dim 3 const(0), 10 constant MLP units, and stream channel 5 constant:
    every LayerNorm has weight 0 there (output const(bias)), its writers have zero rows."""
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        masks[f"embeddings.{name}.weight"][:, 5] = False
    layer_norms = ["embeddings.LayerNorm.weight"]
    for i, layer in enumerate(model.encoder.layer):
        prefix = f"encoder.layer.{i}."
        masks[prefix + "attention.output.dense.weight"][:, HD:2 * HD] = False
        with torch.no_grad():
            for h in range(H):
                masks[prefix + "attention.self.query.weight"][h * HD + 3] = False
                layer.attention.self.query.bias[h * HD + 3] = 0
        masks[prefix + "intermediate.dense.weight"][:10] = False
        masks[prefix + "attention.output.dense.weight"][5] = False  # nonzero bias: a constant channel
        masks[prefix + "output.dense.weight"][5] = False
        layer_norms += [prefix + "attention.output.LayerNorm.weight", prefix + "output.LayerNorm.weight"]
    for name in layer_norms:
        masks[name] = torch.ones(D, dtype=torch.bool)
        masks[name][5] = False
    return masks


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bert_planted_structure_goes(attention):
    torch.manual_seed(0)
    model = bert(attention)
    masks = plant_bert(model)
    inputs = bert_inputs(torch.Generator().manual_seed(0))
    result = fxmin.minimize(model, masks, inputs, tracer=functools.partial(symbolic_trace, input_names=BERT_INPUTS))
    # before: embeddings 100x64 + 32x64 + 2x64 + LN 128; per layer q/k/v/o 4 x 4160, LN 128,
    # intermediate 64x128+128, output 128x64+64, LN 128; pooler 64x64+64
    layer = 4 * 4_160 + 128 + 8_320 + 8_256 + 128
    assert result.report.params_before == 6_400 + 2_048 + 128 + 128 + 2 * layer + 4_160 == 79_808
    # after: stream 63 wide inside; q/k 3 heads x 15, v 48, 118 MLP units; the last LayerNorm is the
    # model output and keeps its 64 outputs; the pooler reads them all
    layer = (45 * 63 + 45) * 2 + (48 * 63 + 48) + (63 * 48 + 63) + 126 + (118 * 63 + 118) + (63 * 118 + 63) + 126
    assert result.report.params_after == 100 * 63 + 32 * 63 + 2 * 63 + 126 + 2 * layer + 2 + 4_160 == 67_170
    assert_exact(model, masks, result, bert_inputs, ["last_hidden_state", "pooler_output"])


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_random_masks_exact_on_a_traced_graph_module(family, density):
    """An already-traced GraphModule is used as it is; its parameter names are the model's."""
    torch.manual_seed(1)
    model, make_inputs, names = (gpt2(), gpt2_inputs, ["input_ids"]) if family == "gpt2" else \
        (bert(), bert_inputs, BERT_INPUTS)
    traced = symbolic_trace(model, input_names=names)
    generator = torch.Generator().manual_seed(int(density * 10))
    masks = {n: torch.rand(p.shape, generator=generator) < density for n, p in traced.named_parameters() if p.dim() > 1}
    inputs = make_inputs(torch.Generator().manual_seed(2))
    result = fxmin.minimize(traced, masks, inputs)
    assert result.report.params_after <= result.report.params_before
    keys = ["logits"] if family == "gpt2" else ["last_hidden_state", "pooler_output"]
    assert_exact(traced, masks, result, make_inputs, keys)


def test_keyword_inputs_name_the_graph_inputs():
    model = bert()
    with pytest.raises(fxmin.InputError, match="token_types"):
        fxmin.minimize(model, None, {"input_ids": torch.zeros(1, 4, dtype=torch.long), "token_types": None},
                       tracer=functools.partial(symbolic_trace, input_names=BERT_INPUTS), verify=False)


def test_conv1d_as_a_leaf_module_is_a_transposed_linear():
    """A tracer that keeps HF's Conv1D whole (leaf_modules) gets the Conv1D rule."""
    from transformers.pytorch_utils import Conv1D

    from fxmin.rules.huggingface import register_conv1d

    assert register_conv1d()
    from helpers import check_minimize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(16, 8), Conv1D(4, 16)  # (out, in): weights stored (in, out)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Net().eval()
    masks = {"a.weight": torch.ones(8, 16, dtype=torch.bool), "b.weight": torch.ones(16, 4, dtype=torch.bool)}
    masks["a.weight"][:, :5] = False  # 5 hidden units const(relu(b)): folded into b's bias
    masks["a.weight"][2] = False  # input feature 2 is read by nobody: dropped at the input
    result = check_minimize(model, masks, (torch.randn(3, 8),), leaf_modules=[Conv1D],
                            expected_params=(7 * 11 + 11) + (11 * 4 + 4))
    assert (result.module.a.nx, result.module.a.nf, result.module.b.nx) == (7, 11, 11)
