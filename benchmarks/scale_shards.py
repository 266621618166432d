"""Minimizing from safetensors shards (issue #20, item 3): a model built without its weights, its weights in
files, each read when the pass needs it. Peak RSS against the result plus one shard, in a fresh process.

    python -m benchmarks.scale_shards --models gpt2-124m llama-1b llama-3b hf-llama-1b --write

For each model of ``benchmarks.scale.MODELS``: synthetic weights (random, in the model's dtype, generated
and written one tensor at a time: the full model is never in memory) go to shards of ``--shard-gib`` in the
Hugging Face layout (``fxmin.shards.write_shards``); then a fresh ``nice`` process builds the model with
``accelerate.init_empty_weights`` (parameters on the meta device, buffers real), kills half of every MLP's
hidden units as ``benchmarks.scale`` does, and calls ``fxmin.minimize(model, masks, inputs,
weights=directory)`` with verification on. Its peak RSS is ``ru_maxrss`` from ``os.wait4``.

``--write-to``: the result is written as shards of ``--shard-gib`` as the pass makes it (``minimize(...,
write_to=, shard_bytes=)``, NOTE [Results written as they are made]) instead of held, and the peak is set
against one result shard plus the largest input shard. ``--verify quick``: ``minimize(verify="quick")``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scale import (DOC, GIB, MODELS, _gib, _rss, _tensor_bytes, _warm, add_verify_option, level_of, make_model,
                              mlp_masks, model_inputs, parameters_text, time_phases, verification_text)

SECTION = "Minimized from safetensors shards"


def _empty(name: str):
    """The model of ``name`` with its parameters on the meta device (buffers real), in its dtype; tied
    weights tied as the family ties them."""
    import accelerate
    import torch

    family, config, dtype_name, _ = MODELS[name]
    with accelerate.init_empty_weights():
        model = make_model(family, config)
    if family == "gpt":
        model.lm_head.weight = model.transformer.wte.weight  # init_empty_weights unties what zoo.gpt ties
    return model.to(getattr(torch, dtype_name)).eval().requires_grad_(False)


def write_synthetic(name: str, directory: Path, shard_bytes: int) -> None:
    """Random weights for ``name`` in safetensors shards, generated one tensor at a time."""
    import torch

    from fxmin.shards import write_shards

    model = _empty(name)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for path, tensor in model.state_dict().items():
            if not tensor.is_meta:
                continue  # buffers the model computes itself (rotary tables)
            value = torch.empty(tensor.shape, dtype=tensor.dtype)
            if tensor.dim() >= 2:
                value.normal_(0.0, 0.02, generator=generator)
            else:
                value.fill_(1.0 if path.endswith("weight") else 0.0)
            yield path, value

    write_shards(tensors(), directory, max_shard_bytes=shard_bytes)


def child(name: str, directory: str, tokens: int, level: str = "full", shard_bytes: int | None = None) -> dict:
    """Minimize ``name`` from the shards in ``directory``; with ``shard_bytes``, its result is written as
    shards of that size beside them (``write_to=``) and removed after."""
    import torch

    import fxmin
    from fxmin.shards import ShardedWeights

    interpreter = _warm(name, "fxmin")
    family, config, dtype_name, _ = MODELS[name]
    model = _empty(name)
    generator = torch.Generator().manual_seed(0)
    masks = mlp_masks(model, family, generator)  # the same masks and inputs as benchmarks.scale
    inputs = model_inputs(family, torch.randint(0, config["vocab_size"], (1, tokens), generator=generator))
    weights = ShardedWeights(directory)
    phases, peaks = time_phases()
    start = time.perf_counter()
    out = Path(directory).parent / f"{Path(directory).name}-result"
    written = {} if shard_bytes is None else {"write_to": out, "shard_bytes": shard_bytes}
    try:
        result = fxmin.minimize(model, masks, inputs, weights=weights, verify=level, progress=False, **written)
        seconds = time.perf_counter() - start
        result_bytes, _ = _tensor_bytes(result.module)
        out_shards = sorted(out.glob("*.safetensors"))
        out_largest = max((p.stat().st_size for p in out_shards), default=0)
        if shard_bytes is not None:  # stand-ins on the meta device share no storage to count: count the files
            result_bytes = sum(p.stat().st_size for p in out_shards)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    verification = result.report.verification
    shards = sorted(Path(directory).glob("*.safetensors"))
    return {"name": name, "dtype": dtype_name, "interpreter": interpreter, "checkpoint_bytes": weights.nbytes(),
            "shards": len(shards), "largest_shard": max(p.stat().st_size for p in shards),
            "result_bytes": result_bytes, "params_before": result.report.params_before,
            "params_after": result.report.params_after, "total_s": seconds, "verified": bool(verification.ok),
            "level": level, "written_shard_bytes": shard_bytes, "result_shards": len(out_shards),
            "result_largest_shard": out_largest,
            "errors": {str(d).replace("torch.", ""): [verification.max_error(d), verification.tolerance(d)]
                       for d in verification.dtypes}, "after_pass_rss": _rss("VmRSS"), "phases": phases,
            "phase_peaks": peaks}


def run(name: str, tokens: int, shard_bytes: int, keep: Path | None, level: str = "full", write: bool = False) -> dict:
    directory = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=f"fxmin-shards-{name}-"))
    try:
        started = time.perf_counter()
        write_synthetic(name, directory, shard_bytes)
        written = time.perf_counter() - started
        command = [sys.executable, "-m", "benchmarks.scale_shards", "--child", name, "--directory", str(directory),
                   "--tokens", str(tokens), "--verify", level] + (["--result-shard-bytes", str(shard_bytes)] if write else [])
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, cwd=Path(__file__).resolve().parent.parent,
                                       preexec_fn=lambda: os.nice(10))
            _, status, usage = os.wait4(process.pid, 0)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        if os.waitstatus_to_exitcode(status) != 0:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            return {"name": name, "error": f"exit {os.waitstatus_to_exitcode(status)}: {last}"}
        record = json.loads(stdout.strip().splitlines()[-1])
        record.update(peak=usage.ru_maxrss * 1024, write_s=written)
        return record
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


def table(records: list) -> str:
    from tabulate import tabulate

    written = any(r.get("written_shard_bytes") for r in records)
    rows = []
    for r in records:
        what = MODELS[r["name"]][3]
        if "error" in r or "skipped" in r:
            rows.append([what, MODELS[r["name"]][2], r.get("error") or r.get("skipped")] + [""] * 7)
            continue
        # NOTE [Results written as they are made]: a written result is held a shard at a time
        held = r["written_shard_bytes"] if written else r["result_bytes"]
        budget = held + r["largest_shard"]
        rows.append([what, r["dtype"], parameters_text(r),
                     f"{_gib(r['checkpoint_bytes'])} in {r['shards']} / {_gib(r['largest_shard'])}",
                     _gib(r["result_bytes"]) + (f" in {r['result_shards']}" if written else ""),
                     _gib(r["interpreter"]), _gib(r["peak"]),
                     f"{(r['peak'] - r['interpreter']) / budget:.2f}", f"{r['total_s']:.0f}",
                     verification_text(r)])
    held = "result shard size" if written else "result"
    headers = ["model", "dtype", "parameters", "checkpoint GiB in shards / largest shard GiB",
               "result GiB" + (" in shards" if written else ""), "interpreter GiB", "peak RSS GiB",
               f"(peak - interpreter) / ({held} + largest shard)", "pass s", "verification (max abs error)"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gpt2-124m", "llama-1b"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--shard-gib", type=float, default=1.0, help="the shards' size (transformers writes 5 GB)")
    parser.add_argument("--keep", type=Path, help="write the shards under this directory and keep them")
    add_verify_option(parser)
    parser.add_argument("--write-to", action="store_true",
                        help="write the result as shards of --shard-gib (minimize(write_to=)) instead of holding it")
    parser.add_argument("--write", action="store_true", help="write the table into docs/scale.md")
    parser.add_argument("--from-json", type=Path, help="make the table from the records an earlier run printed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--result-shard-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(child(args.child, args.directory, args.tokens, args.verify, args.result_shard_bytes)), flush=True)
        return
    records = []
    if args.from_json:
        records = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.startswith("{")]
    for name in [] if args.from_json else args.models:
        record = run(name, args.tokens, int(args.shard_gib * GIB), args.keep, args.verify, args.write_to)
        records.append(record)
        print(json.dumps(record), flush=True)
    text = table(records)
    print(text)
    if args.write:
        from benchmarks.markdown import replace_section
        from benchmarks.pass_speed import section

        command = "python -m benchmarks.scale_shards " + " ".join(argv if argv is not None else sys.argv[1:])
        level, written = level_of(records, args.verify), any(r.get("written_shard_bytes") for r in records)
        if args.from_json:  # the run that printed the records
            quick = "" if level == "full" else f" --verify {level}"
            command = (f"python -m benchmarks.scale_shards --models {' '.join(r['name'] for r in records)}{quick}"
                       f"{' --write-to' if written else ''}")
        title = SECTION + ("" if level == "full" else f", verify={level!r}") + (
            ", result written to shards" if written else "")
        replace_section(DOC, title, section(command.strip(), text, title), heading="# fxmin at scale")


if __name__ == "__main__":
    main()
