"""A Hugging Face Llama minimized from its safetensors checkpoint into a new one, neither model ever whole in memory.

    python -m examples.minimize_sharded_llama [--directory DIR]

What a user with a checkpoint larger than memory does (docs/scale.md, docs/transformers.md), at toy size:

1. A random ``LlamaForCausalLM`` (grouped-query attention, 4 heads over 2 key-value heads) is saved as a
   sharded checkpoint: it stands for the user's ``save_pretrained`` directory (nothing is downloaded).
2. The model is built on the meta device (``accelerate.init_empty_weights``: parameters without values,
   the rotary tables real) and half of every MLP's hidden units are masked (rows of ``gate_proj`` and
   ``up_proj``): masks are computed from shapes, no weight is needed.
3. ``fxmin.minimize(empty, masks, inputs, weights=checkpoint, write_to=out, shard_bytes=..., verify="quick")``
   reads each weight from the checkpoint when the pass needs it and writes each tensor of the result to
   ``out`` as it is made; the result is verified from those files and moved into ``out`` only then.
4. The minimized checkpoint is loaded into the result (``fxmin.shards.load_shards``) and both models
   predict the next tokens of a prompt.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import fxmin
from fxmin.shards import load_shards, write_shards

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
SHARD_BYTES = 64 * 1024  # small shards, so that this toy checkpoint has several, as a real one does


def config():
    import transformers

    return transformers.LlamaConfig(**CONFIG)


def save_checkpoint(directory: Path, seed: int = 0) -> None:
    """Step 1: a random Llama saved as safetensors shards (stands for the user's checkpoint)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config()).eval()
    write_shards(model.state_dict().items(), directory, max_shard_bytes=SHARD_BYTES)


def mlp_masks(model: torch.nn.Module) -> dict:
    """Every other hidden unit of every MLP dead: its rows of gate_proj and up_proj (from shapes alone)."""
    masks = {}
    for name, parameter in model.named_parameters():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            mask = torch.ones(parameter.shape, dtype=torch.bool)
            mask[::2] = False
            masks[name] = mask
    return masks


def main(directory: str | Path | None = None, prompt=(1, 17, 42, 7, 99, 3, 250, 11)):
    """Steps 1-4 in ``directory`` (default: a new temporary one): ``checkpoint/`` and ``minimized/``."""
    import accelerate
    import transformers

    work = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="fxmin-llama-"))
    checkpoint, out = work / "checkpoint", work / "minimized"
    save_checkpoint(checkpoint)
    with accelerate.init_empty_weights():  # step 2
        empty = transformers.LlamaForCausalLM(config()).eval()
    masks = mlp_masks(empty)
    ids = torch.tensor([prompt])
    result = fxmin.minimize(empty, masks, {"input_ids": ids, "use_cache": False}, weights=checkpoint,
                            write_to=out, shard_bytes=SHARD_BYTES, verify="quick")  # step 3
    print(result.report.table())
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {len(files) - 1} shards and {files[-1]} to {out}")
    module = load_shards(result.module, out)  # step 4
    with torch.no_grad():
        predicted = module(ids)[0].argmax(-1)  # an exported graph returns its flat outputs: (logits,)
    print(f"parameters {result.report.params_before:,} -> {result.report.params_after:,}; "
          f"next tokens of the prompt: {predicted.tolist()[0]}")
    return result, module, checkpoint


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", help="where the checkpoint and the minimized one go (default: a temporary one)")
    main(parser.parse_args().directory)
