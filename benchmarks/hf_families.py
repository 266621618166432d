"""Tiny random configs of current Hugging Face model families (transformers 5.x), for the export
front end and the coverage benchmark.

``families()`` maps a family name to a builder ``() -> (model in eval mode, keyword inputs)``; each
call builds fresh random weights (seeded), nothing is downloaded (``HF_HUB_OFFLINE=1``). The inputs
are what ``model(**inputs)`` and ``torch.export.export(model, (), inputs, strict=False)`` take:
tensors, plus ``use_cache=False`` where the model has a cache (a constant under export).

>>> builders = families()                                   # doctest: +SKIP
>>> model, inputs = builders["llama"]()                     # doctest: +SKIP
>>> result = fxmin.minimize(model, masks, inputs, frontend="export")  # doctest: +SKIP

Run as a script (``python benchmarks/hf_families.py [family ...]``) it minimizes each family with every
fourth MLP unit dead (:func:`dead_mlp_masks`) and prints the parameters before and after and the
errors verification measured, or the first line of the error that stopped it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

#: the sizes every family shares: 2 layers, hidden 32, 4 heads of 8, MLP 64, vocabulary 100, 8 tokens
LAYERS, HIDDEN, HEADS, MLP, VOCAB, BATCH, TOKENS = 2, 32, 4, 64, 100, 2, 8
SEED = 0
#: special token ids inside the small vocabulary (the configs' defaults point past it)
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(SEED + 1))


def _build(model_class, config) -> nn.Module:
    torch.manual_seed(SEED)
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    return model_class(config).eval()


def _decoder(config_name: str, model_name: str, **extra) -> Callable[[], tuple[nn.Module, dict]]:
    """A causal LM (Llama-like): ``input_ids`` and ``use_cache=False``."""

    def build():
        import transformers

        sizes = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                     num_key_value_heads=HEADS, intermediate_size=MLP, vocab_size=VOCAB, max_position_embeddings=64,
                     **TOKEN_IDS)
        sizes.update(extra)
        config = getattr(transformers, config_name)(**sizes)
        return _build(getattr(transformers, model_name), config), {"input_ids": _ids(), "use_cache": False}

    return build


def gpt2():
    import transformers

    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=MLP, vocab_size=VOCAB,
                                     n_positions=64, **TOKEN_IDS)
    return _build(transformers.GPT2LMHeadModel, config), {"input_ids": _ids(), "use_cache": False}


def bert():
    import transformers

    config = transformers.BertConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     intermediate_size=MLP, vocab_size=VOCAB, max_position_embeddings=64, **TOKEN_IDS)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, TOKENS - 2:] = 0  # padding in the second sequence
    return _build(transformers.BertModel, config), {"input_ids": _ids(), "attention_mask": mask}


def opt():
    import transformers

    config = transformers.OPTConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    ffn_dim=MLP, vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                    **TOKEN_IDS)
    return _build(transformers.OPTForCausalLM, config), {"input_ids": _ids(), "use_cache": False}


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(SEED + 1))


def vit():
    import transformers

    config = transformers.ViTConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    intermediate_size=MLP, image_size=32, patch_size=8)
    return _build(transformers.ViTModel, config), {"pixel_values": _pixels()}


def clip_text():
    import transformers

    config = transformers.CLIPTextConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                         intermediate_size=MLP, vocab_size=VOCAB, max_position_embeddings=64,
                                         projection_dim=HIDDEN, **TOKEN_IDS)
    return _build(transformers.CLIPTextModel, config), {"input_ids": _ids()}


def clip_vision():
    import transformers

    config = transformers.CLIPVisionConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                           intermediate_size=MLP, image_size=32, patch_size=8, projection_dim=HIDDEN)
    return _build(transformers.CLIPVisionModel, config), {"pixel_values": _pixels()}


def t5():
    import transformers

    config = transformers.T5Config(num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=HIDDEN, num_heads=HEADS,
                                   d_kv=HIDDEN // HEADS, d_ff=MLP, vocab_size=VOCAB, decoder_start_token_id=0,
                                   **TOKEN_IDS)
    decoder = torch.zeros(BATCH, 4, dtype=torch.long)
    return _build(transformers.T5Model, config), {"input_ids": _ids(), "decoder_input_ids": decoder, "use_cache": False}


def whisper():
    import transformers

    config = transformers.WhisperConfig(encoder_layers=LAYERS, decoder_layers=LAYERS, d_model=HIDDEN,
                                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                        encoder_ffn_dim=MLP, decoder_ffn_dim=MLP, vocab_size=VOCAB, num_mel_bins=16,
                                        max_source_positions=16, max_target_positions=16, decoder_start_token_id=1,
                                        **TOKEN_IDS)
    features = torch.randn(BATCH, 16, 32, generator=torch.Generator().manual_seed(SEED + 1))
    decoder = torch.zeros(BATCH, 4, dtype=torch.long)
    return (_build(transformers.WhisperModel, config),
            {"input_features": features, "decoder_input_ids": decoder, "use_cache": False})


#: family -> (regular expression of the MLP up-projection weights, the axis of a hidden unit): zeroing a
#: unit there kills it (its activation reads a constant, or the gated product is 0) in every family
_UP_PROJ = (r"model\.layers\.\d+\.mlp\.up_proj\.weight", 0)  # Llama-style gated MLPs
_CLIP_FC1 = (r"encoder\.layers\.\d+\.mlp\.fc1\.weight", 0)
MLP_UNITS = {
    "gpt2": (r"transformer\.h\.\d+\.mlp\.c_fc\.weight", 1),  # Conv1D stores (in, out)
    "bert": (r"encoder\.layer\.\d+\.intermediate\.dense\.weight", 0),
    **dict.fromkeys(("llama", "llama-gqa", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"), _UP_PROJ),
    "phi3": (r"model\.layers\.\d+\.mlp\.gate_up_proj\.weight", 0),  # gate rows then up rows
    "opt": (r"model\.decoder\.layers\.\d+\.fc1\.weight", 0),
    "vit": (r"layers\.\d+\.mlp\.fc1\.weight", 0),
    "clip-text": _CLIP_FC1,
    "clip-vision": _CLIP_FC1,
    "t5": (r"(en|de)coder\.block\.\d+\.layer\.\d\.DenseReluDense\.wi\.weight", 0),
    "whisper": (r"(en|de)coder\.layers\.\d+\.fc1\.weight", 0),
    "mixtral": (r"model\.layers\.\d+\.mlp\.experts\.gate_up_proj", 1),
}


def dead_mlp_masks(name: str, model: nn.Module, every: int = 4) -> dict:
    """Masks that zero every ``every``-th MLP hidden unit of ``model`` (family ``name``; for Phi-3's fused
    ``gate_up_proj`` the up half), so that those units are dead: the planted structure fxmin must remove."""
    import re

    pattern, axis = MLP_UNITS[name]
    masks = {}
    for parameter_name, parameter in model.named_parameters():
        if re.fullmatch(pattern, parameter_name):
            mask = torch.ones_like(parameter, dtype=torch.bool)
            size = parameter.shape[axis]
            start = size // 2 if name in ("phi3", "mixtral") else 0  # fused gate and up: the up half
            mask.index_fill_(axis, torch.arange(start, size, every), False)
            masks[parameter_name] = mask
    if not masks:
        raise KeyError(f"no parameter of {type(model).__name__} matches {pattern}")
    return masks


def families() -> dict[str, Callable[[], tuple[nn.Module, dict]]]:
    """Family name -> builder of (tiny random model in eval mode, keyword inputs)."""
    return {
        "gpt2": gpt2,
        "bert": bert,
        "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
        "llama-gqa": _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
        "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=HIDDEN // HEADS),
        "mistral": _decoder("MistralConfig", "MistralForCausalLM", head_dim=HIDDEN // HEADS),
        "phi3": _decoder("Phi3Config", "Phi3ForCausalLM"),
        "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=HIDDEN // HEADS),
        "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=HIDDEN // HEADS),
        "opt": opt,
        "vit": vit,
        "clip-text": clip_text,
        "clip-vision": clip_vision,
        "t5": t5,
        "whisper": whisper,
        "mixtral": _decoder("MixtralConfig", "MixtralForCausalLM", head_dim=HIDDEN // HEADS, num_local_experts=4,
                            num_experts_per_tok=2),
    }


def main(argv=None) -> int:
    import argparse

    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="families to run (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fxmin
    import fxmin

    builders = families()
    rows = []
    for name in args.names or builders:
        model, inputs = builders[name]()
        masks = dead_mlp_masks(name, model)
        try:
            result = fxmin.minimize(model, masks, inputs)
            report = result.report
            rows.append((name, result.frontend, report.params_before, report.params_after,
                         f"{report.max_error:.1e}", f"{report.max_error_in(torch.float32):.1e}"))
        except fxmin.FxminError as error:  # the first line names the op that stopped it
            rows.append((name, "", sum(p.numel() for p in model.parameters()), "", "",
                         f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
        print(*rows[-1], flush=True)
    print(tabulate(rows, headers=["family", "front end", "params before", "params after", "max err float64",
                                  "max err float32"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
