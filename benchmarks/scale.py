"""Billion-parameter models: peak resident memory and time of ``fxmin.minimize`` (verification on),
each model in a fresh subprocess, writing ``docs/scale.md``.

Models (random weights, nothing downloaded): fxmin.zoo's GPT at the four GPT-2 sizes in float32,
fxmin.zoo's Llama (RMSNorm, rotary, SwiGLU, grouped-query attention) at Llama-3.2-3B's and Llama-3-8B's
shapes in bfloat16, and transformers' own LlamaForCausalLM (``hf-llama-1b``: through torch.export). Half
of every MLP's hidden units are dead: their rows of ``c_fc`` (GPT) or of ``gate_proj`` and ``up_proj``
(Llama) are masked, with masks that are expanded views of one row mask
(they cost no memory, so the peak is the pass's own). Inputs: one sequence of ``--tokens`` tokens.

Per model the child process reports: the bytes of the model, of the result and of the largest single
tensor; the resident memory after ``import torch, fxmin`` and a pass over a tiny model of the same family
(the interpreter, with the modules a pass imports on first use); the peak resident memory of
the whole process (``ru_maxrss`` of the child, read by the parent with ``os.wait4``) and the peak as each
phase ended (``VmHWM``); the time of each phase (trace, analysis, plan, rewrite, verify, timed around the
functions ``fxmin.minimize`` calls); parameters before and after; the verification's errors per dtype.
``budget`` = model + result + largest tensor + interpreter; the pass is within it when peak <= budget.

A model whose budget (plus 2 GiB) exceeds the memory available now (``MemAvailable``) is skipped and the
table says so: the machine is shared.

    python -m benchmarks.scale [--models gpt2-124m gpt2-355m ...] [--tokens 32] [--write]
    python -m benchmarks.scale --child gpt2-124m   # one model, prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3
DOC = Path(__file__).resolve().parent.parent / "docs" / "scale.md"

#: name -> (family, config, dtype name, description)
MODELS = {
    "gpt2-124m": ("gpt", dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), "float32",
                  "GPT, GPT-2 small shape (12 x 768)"),
    "gpt2-355m": ("gpt", dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024), "float32",
                  "GPT, GPT-2 medium shape (24 x 1024)"),
    "gpt2-774m": ("gpt", dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280), "float32",
                  "GPT, GPT-2 large shape (36 x 1280)"),
    "gpt2-1.5b": ("gpt", dict(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600), "float32",
                  "GPT, GPT-2 XL shape (48 x 1600)"),
    "llama-1b": ("llama", dict(vocab_size=128256, dim=2048, n_layer=16, heads=32, kv_heads=8, hidden=8192,
                               block_size=64), "bfloat16", "Llama, Llama-3.2-1B shape (16 x 2048, GQA 32/8), untied"),
    "llama-3b": ("llama", dict(vocab_size=128256, dim=3072, n_layer=28, heads=24, kv_heads=8, hidden=8192,
                               block_size=64), "bfloat16", "Llama, Llama-3.2-3B shape (28 x 3072, GQA 24/8), untied"),
    # Llama-3-70B's width with 1 and 2 of its 80 decoder layers: what one more layer costs, from shards
    # (benchmarks.scale_shards), extrapolated to 80 layers in docs/scale.md
    "llama-70b-1l": ("llama", dict(vocab_size=128256, dim=8192, n_layer=1, heads=64, kv_heads=8, hidden=28672,
                                   block_size=64), "bfloat16", "Llama, Llama-3-70B shape cut to 1 of its 80 layers"),
    "llama-70b-2l": ("llama", dict(vocab_size=128256, dim=8192, n_layer=2, heads=64, kv_heads=8, hidden=28672,
                                   block_size=64), "bfloat16", "Llama, Llama-3-70B shape cut to 2 of its 80 layers"),
    "llama-8b": ("llama", dict(vocab_size=128256, dim=4096, n_layer=32, heads=32, kv_heads=8, hidden=14336,
                               block_size=64), "bfloat16", "Llama, Llama-3-8B shape (32 x 4096, GQA 32/8)"),
    # transformers 5.x's own LlamaForCausalLM (no torch.fx tracer: through torch.export)
    "hf-llama-1b": ("hf-llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
                    "bfloat16", "Hugging Face LlamaForCausalLM (transformers 5.x, torch.export), Llama-3.2-1B shape, untied"),
}

#: the keys of each family's configuration: width, layers, vocabulary, MLP width, heads, key-value heads
_SIZES = {"gpt": ("n_embd", "n_layer", "vocab_size", None, "n_head", None),
          "llama": ("dim", "n_layer", "vocab_size", "hidden", "heads", "kv_heads"),
          "hf-llama": ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads")}


def make_model(family: str, config: dict | None = None):
    """The model of ``family`` (``config``: its keyword arguments; None: a tiny one), in float32, random."""
    if family == "hf-llama":
        import transformers

        tiny = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(config or tiny)))
    from fxmin import zoo

    return (zoo.gpt if family == "gpt" else zoo.llama)(**(config or {}))


def model_inputs(family: str, ids):
    """What ``fxmin.minimize`` takes as the example inputs of ``ids`` (token ids) for ``family``."""
    return {"input_ids": ids, "use_cache": False} if family == "hf-llama" else (ids,)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimate(name: str) -> int:
    """Bytes of model + result + largest tensor, from the configuration alone (for the skip test)."""
    family, config, dtype, _ = MODELS[name]
    size = 4 if dtype == "float32" else 2
    d, layers, vocab, hidden, heads, kv_heads = (config.get(key) for key in _SIZES[family])
    if family == "gpt":
        model = vocab * d + config["block_size"] * d + layers * 12 * d * d
        result = model - layers * 4 * d * d
        largest = vocab * d
    else:
        kv = d // heads * kv_heads
        attention = 2 * d * d + 2 * d * kv
        model = 2 * vocab * d + layers * (attention + 3 * d * hidden)
        result = model - layers * 3 * d * hidden // 2
        largest = vocab * d
    return (model + result + largest) * size


def _tensor_bytes(module) -> tuple[int, int]:
    """(bytes of the unique parameters and buffers, bytes of the largest)."""
    seen, total, largest = set(), 0, 0
    for tensor in (*module.parameters(), *module.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        total, largest = total + size, max(largest, size)
    return total, largest


def _build(name: str, tokens: int):
    """(model, masks of half of every MLP's hidden units, inputs), the model built in its dtype."""
    import torch

    family, config, dtype_name, _ = MODELS[name]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy on the way
    try:
        model = make_model(family, config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    masks = mlp_masks(model, family, generator)
    inputs = model_inputs(family, torch.randint(0, config["vocab_size"], (1, tokens), generator=generator))
    return model, masks, inputs


def mlp_masks(model, family: str, generator) -> dict:
    """Half of every MLP's hidden units dead (their rows of ``c_fc``, or of ``gate_proj`` and ``up_proj``),
    as expanded views of one row mask each (no memory); from the modules' shapes, so a model on the
    meta device gets them too."""
    import torch

    masks = {}
    for path, module in model.named_modules():
        if path.endswith(("mlp.c_fc", "mlp.gate_proj")):
            hidden = module.out_features
            alive = torch.ones(hidden, dtype=torch.bool)
            alive[torch.randperm(hidden, generator=generator)[: hidden // 2]] = False
            owners = [path] if family == "gpt" else [path, path.replace("gate_proj", "up_proj")]
            for owner in owners:
                weight = model.get_submodule(owner).weight
                masks[f"{owner}.weight"] = alive[:, None].expand(weight.shape)  # a view: no memory
    return masks


def _warm(name: str, tool: str) -> int:
    """Run the tool once on a tiny model of the family (the modules it imports on first use); the RSS then."""
    import torch

    import fxmin

    family, dtype = MODELS[name][0], getattr(torch, MODELS[name][2])
    tiny = make_model(family).to(dtype).eval()
    inputs = model_inputs(family, torch.randint(0, 128, (1, 8)))
    if tool == "fxmin":
        fxmin.minimize(tiny, None, inputs, progress=False)
    else:
        try:
            _torch_pruning(tiny.requires_grad_(True), {}, inputs)
        except Exception:  # noqa: BLE001 - the measured run reports it
            pass
    return _rss("VmRSS")


def _torch_pruning(model, masks: dict, inputs: tuple) -> None:
    """Torch-Pruning 1.6.1 in place, as a user would: the dead rows zeroed in the weights, then for each
    MLP input layer the group of its all-zero rows (``get_pruning_group(layer, prune_out_channels, rows)``)
    pruned. Attention projections are left alone (their reshapes carry head counts it cannot rewrite)."""
    import torch
    import torch_pruning as tp

    layers = [m for path, m in model.named_modules() if path.endswith(("mlp.c_fc", "mlp.gate_proj"))]
    ignored = [m for path, m in model.named_modules() if path.endswith(("attn.c_attn", "q_proj", "k_proj", "v_proj"))
               or path == "lm_head"]
    graph = tp.DependencyGraph().build_dependency(model, inputs, ignored_layers=ignored, verbose=False)
    for layer in layers:
        rows = torch.nonzero((layer.weight == 0).all(dim=1)).flatten().tolist()
        if rows:
            group = graph.get_pruning_group(layer, tp.prune_linear_out_channels, rows)
            if graph.check_pruning_group(group):
                group.prune()


def child_torch_pruning(name: str, tokens: int) -> dict:
    import torch

    interpreter = _warm(name, "torch_pruning")
    model, masks, inputs = _build(name, tokens)
    model.requires_grad_(True)  # Torch-Pruning traces the autograd graph of one forward
    model_bytes, largest = _tensor_bytes(model)
    with torch.no_grad():
        for parameter, mask in masks.items():  # what a user hands Torch-Pruning: the zeros in the weights
            model.get_parameter(parameter).masked_fill_(~mask, 0)
        expected = model(*inputs)
    start = time.perf_counter()
    try:
        _torch_pruning(model, masks, inputs)
    except Exception as error:  # noqa: BLE001 - the table says where Torch-Pruning does not run
        return {"name": name, "tool": "torch_pruning", "failed": f"{type(error).__name__}: {error}"[:200]}
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = float((model(*inputs).double() - expected.double()).abs().max())
    result_bytes, _ = _tensor_bytes(model)
    return {"name": name, "tool": "torch_pruning", "interpreter": interpreter, "model_bytes": model_bytes,
            "result_bytes": result_bytes, "largest": largest, "total_s": seconds, "max_error": error,
            "params_after": sum(p.numel() for p in model.parameters())}


def time_phases() -> tuple[dict, dict]:
    """``(seconds, peak RSS)`` by phase of every later ``fxmin.minimize`` in this process, filled as they run."""
    pipeline = sys.modules["fxmin.minimize"]  # the module (fxmin.minimize is also the function)
    phases, peaks = {}, {}

    def timed(label, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start
                peaks[label] = _rss("VmHWM")
        return wrapper

    for attribute, label in (("prepare", "trace"), ("analyze_graph", "analysis"), ("make_plan", "plan"),
                             ("rewrite", "rewrite"), ("verify_equivalence", "verify")):
        setattr(pipeline, attribute, timed(label, getattr(pipeline, attribute)))
    return phases, peaks


def child(name: str, tokens: int, level: str = "full") -> dict:
    """Build ``name``, minimize it with verification at ``level``, return the measurements."""
    import fxmin

    interpreter = _warm(name, "fxmin")
    dtype_name = MODELS[name][2]
    model, masks, inputs = _build(name, tokens)
    model_bytes, largest = _tensor_bytes(model)
    built = _rss("VmRSS")

    phases, peaks = time_phases()
    start = time.perf_counter()
    result = fxmin.minimize(model, masks, inputs, verify=level, progress=False)
    total = time.perf_counter() - start
    result_bytes, _ = _tensor_bytes(result.module)
    verification = result.report.verification
    return {
        "name": name, "dtype": dtype_name, "tokens": tokens, "interpreter": interpreter, "built": built,
        "model_bytes": model_bytes, "result_bytes": result_bytes, "largest": largest,
        "params_before": result.report.params_before, "params_after": result.report.params_after,
        "phases": phases, "phase_peaks": peaks, "total_s": total,
        "verified": bool(verification.ok), "level": level,
        "errors": {str(d).replace("torch.", ""): [verification.max_error(d), verification.tolerance(d)]
                   for d in verification.dtypes},
    }


def run_child(name: str, tokens: int, tool: str = "fxmin", torch_pruning_path: str | None = None,
              level: str = "full") -> dict:
    """``name`` in a fresh ``nice`` subprocess; its peak RSS is ``ru_maxrss`` from ``os.wait4``."""
    import tempfile

    command = [sys.executable, "-m", "benchmarks.scale", "--child", name, "--tool", tool, "--tokens", str(tokens),
               "--verify", level]
    env = dict(os.environ)
    if torch_pruning_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [torch_pruning_path, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=Path(__file__).resolve().parent.parent,
                                   preexec_fn=lambda: os.nice(10), env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        return {"name": name, "error": f"exit {process.returncode}: {last}"}
    record = json.loads(stdout.strip().splitlines()[-1])
    record["peak"] = usage.ru_maxrss * 1024
    return record


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _peer(record: dict | None) -> str:
    if record is None:
        return "not run"
    if "failed" in record or "error" in record:
        return "does not run: " + (record.get("failed") or record.get("error"))
    return f"{_gib(record['peak'])}, {record['total_s']:.1f}, {record['max_error']:.1e}"


def parameters_text(record: dict) -> str:
    return f"{record['params_before'] / 1e6:,.0f}M -> {record['params_after'] / 1e6:,.0f}M"


def verification_text(record: dict) -> str:
    errors = ", ".join(f"{d} {e:.1e} (tol {t:.0e})" for d, (e, t) in record["errors"].items())
    level = record.get("level", "full")
    return ("ok" if record["verified"] else "FAILED") + ("" if level == "full" else f" ({level})") + ": " + errors


def add_verify_option(parser) -> None:
    """``--verify``: the verification level each child's ``fxmin.minimize`` runs."""
    parser.add_argument("--verify", choices=("full", "quick"), default="full",
                        help="minimize's verification level (quick: the model's dtype and the analysis's constants)")


def level_of(records: list, default: str) -> str:
    """The verification level the records were measured at (``default`` for records older than the option)."""
    return next((r["level"] for r in records if "level" in r), default)


def table(records: list) -> str:
    from tabulate import tabulate

    rows = []
    for r in records:
        what = MODELS[r["name"]][3]
        if "skipped" in r or "error" in r:
            rows.append([what, MODELS[r["name"]][2], r.get("skipped") or r.get("error")] + [""] * 9)
            continue
        budget = r["model_bytes"] + r["result_bytes"] + r["largest"]
        phases = " / ".join(f"{r['phases'].get(p, 0):.1f}" for p in ("trace", "analysis", "plan", "rewrite", "verify"))
        rows.append([
            what, r["dtype"], parameters_text(r),
            f"{_gib(r['model_bytes'])} / {_gib(r['result_bytes'])} / {_gib(r['largest'])}",
            _gib(r["interpreter"]), _gib(r["peak"]),
            f"{(r['peak'] - r['interpreter']) / budget:.2f}",
            "yes" if r["peak"] <= budget + r["interpreter"] else "NO",
            phases, f"{r['total_s']:.0f}", verification_text(r),
            _peer(r.get("torch_pruning"))])
    headers = ["model", "dtype", "parameters", "model / result / largest tensor GiB", "interpreter GiB",
               "peak RSS GiB", "(peak - interpreter) / (model + result + largest)", "within budget",
               "trace / analysis / plan / rewrite / verify s", "total s", "verification (max abs error)",
               "Torch-Pruning: peak RSS GiB, s, max abs error"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="fxmin", help=argparse.SUPPRESS)
    parser.add_argument("--torch-pruning", metavar="SITE_PACKAGES",
                        help="also run Torch-Pruning on each model, importing it from this directory")
    add_verify_option(parser)
    parser.add_argument("--write", action="store_true", help="write the table into docs/scale.md")
    parser.add_argument("--json", help="also append each record to this JSON-lines file")
    parser.add_argument("--from-json", help="make the table from the records of an earlier run's --json file")
    parser.add_argument("--wait-minutes", type=float, default=0,
                        help="wait up to this long for the memory a model needs to be available")
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        record = child(args.child, args.tokens, args.verify) if args.tool == "fxmin" \
            else child_torch_pruning(args.child, args.tokens)
        print(json.dumps(record), flush=True)
        return
    records = []
    if args.from_json:
        records = [json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]
    for name in [] if args.from_json else args.models:
        need, deadline = estimate(name) + 2 * GIB, time.monotonic() + 60 * args.wait_minutes
        while available() < need and time.monotonic() < deadline:
            time.sleep(20)  # other jobs on the machine may free memory
        free = available()
        if need > free:
            record = {"name": name, "skipped": f"skipped: needs ~{_gib(need)} GiB, {_gib(free)} GiB available"}
        else:
            record = run_child(name, args.tokens, level=args.verify)
            if args.torch_pruning and available() > need:
                record["torch_pruning"] = run_child(name, args.tokens, "torch_pruning", args.torch_pruning)
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(record) + "\n")
    text = table(records)
    print(text)
    if args.write:
        from benchmarks.markdown import replace_section
        from benchmarks.pass_speed import section

        command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
        level = level_of(records, args.verify)
        if args.from_json:  # the run that made the records
            tokens = next((r["tokens"] for r in records if "tokens" in r), args.tokens)
            peer = " --torch-pruning SITE_PACKAGES" if any("torch_pruning" in r for r in records) else ""
            quick = "" if level == "full" else f" --verify {level}"
            command = (f"python -m benchmarks.scale --models {' '.join(r['name'] for r in records)} --tokens {tokens}"
                       f"{peer}{quick} --json FILE")
        title = "Peak memory and time at scale" + ("" if level == "full" else f", verify={level!r}")
        replace_section(DOC, title, section(command.strip(), text, title), heading="# fxmin at scale")


if __name__ == "__main__":
    main()
