"""A model built on the meta device, its weights in safetensors shards (the Hugging Face layout): minimized
with ``weights=``, each weight read from the files when the pass needs it (NOTE [Weights from files]).
The result equals the in-memory pass's, is exact in float64, lives on the CPU, and the user's meta model
is untouched."""
import pytest
import torch

import fxmin
from fxmin.shards import load_shards, write_shards
from fxmin.zoo import MODELS
from tests.helpers import masked_copy

pytest.importorskip("safetensors")


def _gpt_with_half_mlp_dead():
    factory, make_inputs = MODELS["gpt"]
    torch.manual_seed(0)
    model = factory().eval()
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
             if name.endswith("mlp.c_fc.weight")}
    for mask in masks.values():
        mask[::2] = False  # half of every MLP's hidden units have no input: they fold and leave
    return factory, model, masks, make_inputs()


def test_a_meta_model_minimized_from_shards_equals_the_in_memory_pass(tmp_path):
    factory, model, masks, inputs = _gpt_with_half_mlp_dead()
    write_shards(model.state_dict().items(), tmp_path, max_shard_bytes=64_000)
    with torch.device("meta"):
        empty = factory().eval()
    result = fxmin.minimize(empty, masks, inputs, weights=tmp_path)
    in_memory = fxmin.minimize(model, masks, inputs)
    assert fxmin.count_parameters(result.module) == fxmin.count_parameters(in_memory.module) < fxmin.count_parameters(model)
    assert not any(t.is_meta for t in (*result.module.parameters(), *result.module.buffers()))
    assert all(p.is_meta for p in empty.parameters())  # the user's model is untouched
    for name, tensor in in_memory.module.state_dict().items():
        assert torch.equal(result.module.state_dict()[name], tensor), name
    torch.testing.assert_close(result.module(*inputs), masked_copy(model, masks)(*inputs), rtol=1e-5, atol=1e-6)
    float64_line = next(line for line in str(result.report).splitlines() if line.strip().startswith("float64"))
    assert "ok" in float64_line  # verification ran the reference from the files, one layer at a time


def test_a_checkpoint_that_lacks_a_weight_or_does_not_fit_says_so(tmp_path):
    factory, model, masks, inputs = _gpt_with_half_mlp_dead()
    state = model.state_dict()
    missing = next(name for name in state if name.endswith("c_proj.weight"))
    write_shards([(n, t) for n, t in state.items() if n != missing], tmp_path / "partial")
    with torch.device("meta"):
        empty = factory().eval()
    with pytest.raises(fxmin.InputError, match=f"'{missing}' is on the meta device .* hold no tensor of that name"):
        fxmin.minimize(empty, masks, inputs, weights=tmp_path / "partial")
    with pytest.raises(fxmin.InputError, match="on the meta device .* weights="):
        fxmin.minimize(empty, masks, inputs)
    with pytest.raises(fxmin.InputError, match="weights must be a checkpoint directory"):
        fxmin.minimize(empty, masks, inputs, weights=3)


def test_the_minimized_weights_go_back_to_shards_and_load(tmp_path):
    factory, model, masks, inputs = _gpt_with_half_mlp_dead()
    write_shards(model.state_dict().items(), tmp_path / "in", max_shard_bytes=64_000)
    with torch.device("meta"):
        empty = factory().eval()
    result = fxmin.minimize(empty, masks, inputs, weights=tmp_path / "in")
    write_shards(result.module.state_dict().items(), tmp_path / "out", max_shard_bytes=64_000)
    again = load_shards(result.module.to_empty(device="cpu"), tmp_path / "out")
    torch.testing.assert_close(again(*inputs), masked_copy(model, masks)(*inputs), rtol=1e-5, atol=1e-6)


def test_a_meta_model_goes_through_the_export_front_end_when_asked(tmp_path):
    factory, model, masks, inputs = _gpt_with_half_mlp_dead()
    write_shards(model.state_dict().items(), tmp_path)
    with torch.device("meta"):
        empty = factory().eval()
    result = fxmin.minimize(empty, masks, inputs, weights=tmp_path, frontend="export")
    assert result.frontend == "export" and all(p.is_meta for p in empty.parameters())
    assert fxmin.count_parameters(result.module) == fxmin.count_parameters(fxmin.minimize(model, masks, inputs).module)
    torch.testing.assert_close(result.module(*inputs), masked_copy(model, masks)(*inputs), rtol=1e-5, atol=1e-6)


def test_a_hugging_face_llama_built_without_weights_is_minimized_from_its_shards(tmp_path):
    """transformers 5.x has no torch.fx tracer: the model is exported with FakeTensors on the CPU in place of
    its meta parameters (NOTE [Exporting a model without its weights]) and its weights read from the files."""
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
             if name.endswith(("gate_proj.weight", "up_proj.weight"))}
    for mask in masks.values():
        mask[::2] = False  # half of every MLP's units
    write_shards(model.state_dict().items(), tmp_path, max_shard_bytes=40_000)
    inputs = {"input_ids": torch.randint(0, 256, (1, 8)), "use_cache": False}
    with accelerate.init_empty_weights():  # meta parameters, real rotary buffers
        empty = transformers.LlamaForCausalLM(config).eval()
    empty.tie_weights()
    result = fxmin.minimize(empty, masks, inputs, weights=tmp_path)
    in_memory = fxmin.minimize(model, masks, inputs)
    assert result.frontend == "export" and all(p.is_meta for p in empty.parameters())
    intermediate, width = 128, 64  # per layer: gate and up lose half their rows, down half its columns
    assert fxmin.count_parameters(model) - fxmin.count_parameters(result.module) == 2 * 3 * (intermediate // 2) * width
    for name, tensor in in_memory.module.state_dict().items():
        assert torch.equal(result.module.state_dict()[name], tensor), name
    float64_line = next(line for line in str(result.report).splitlines() if line.strip().startswith("float64"))
    assert "ok" in float64_line
    with torch.device("meta"):  # the rotary table is a buffer no checkpoint holds
        bare = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(fxmin.InputError, match="'model.rotary_emb.inv_freq' is on the meta device .* hold no tensor"):
        fxmin.minimize(bare, masks, inputs, weights=tmp_path)


def test_a_llama_with_real_rotary_buffers_runs_from_shards(tmp_path):
    """accelerate.init_empty_weights keeps buffers real (the rotary tables) and parameters on meta: the pass
    runs each module with its weights read from the files, shape propagation included."""
    accelerate = pytest.importorskip("accelerate")
    from fxmin.zoo import llama

    torch.manual_seed(0)
    model = llama(n_layer=2).eval()
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
             if name.endswith(("gate_proj.weight", "up_proj.weight"))}
    for mask in masks.values():
        mask[::2] = False  # half of every MLP's units: gate and up both dead
    write_shards(model.state_dict().items(), tmp_path, max_shard_bytes=20_000)
    with accelerate.init_empty_weights():
        empty = llama(n_layer=2).eval()
    inputs = (torch.randint(0, 128, (1, 8)),)
    result = fxmin.minimize(empty, masks, inputs, weights=tmp_path)
    assert fxmin.count_parameters(result.module) == fxmin.count_parameters(fxmin.minimize(model, masks, inputs).module)
    torch.testing.assert_close(result.module(*inputs), masked_copy(model, masks)(*inputs), rtol=1e-5, atol=1e-6)
