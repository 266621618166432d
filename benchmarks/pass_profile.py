"""Where the pass spends its time: each phase against one forward, and the functions that cost the most.

On the full-size models (``common.FULL``) with planted dead channels (half the output rows of every
Linear/Conv but the classifier), it times the phases of ``fxmin.minimize`` one by one: prepare (a copy
of the module structure sharing the weights, trace, shape propagation, finiteness check), analysis, plan,
rewrite and the streamed verification, in CPU seconds, medians of ``--repeats`` rounds with a forward of the masked model
timed in each round beside them. Then one more pass runs under cProfile; one table lists the
functions with the most time of their own (cProfile's ``tottime``; its overhead inflates Python-heavy
code, so read those shares as a ranking). The timed rounds also time each rule's forward, backward and
plan (what they call included; :class:`TimedRules`): the rules that took the most of the pass.

    python -m benchmarks.pass_profile [--models NAME ...] [--repeats 3] [--top 8] [--write]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import FULL, apply_masks, build, parse_common, planted_masks, publish

from fxmin import REGISTRY
from fxmin.analysis import analyze_graph
from fxmin.minimize import prepare
from fxmin.plan import make_plan
from fxmin.rewrite import rewrite
from fxmin.verify import verify

PHASES = ("prepare", "analysis", "plan", "rewrite", "verify")


def _rounds(model, masks, inputs, masked, rules: TimedRules | None = None) -> dict:
    clock, seconds = time.process_time, {}

    def timed(phase, function):
        start = clock()
        result = function()
        seconds[phase] = clock() - start
        return result

    with torch.no_grad():
        timed("forward", lambda: masked(*inputs))
    graph_module = timed("prepare", lambda: prepare(model, masks, inputs)[0])
    analysis = timed("analysis", lambda: analyze_graph(graph_module, registry=REGISTRY if rules is None else rules))
    plan = timed("plan", lambda: make_plan(analysis))
    analysis.forget_weight_reads()
    module = timed("rewrite", lambda: rewrite(plan))
    timed("verify", lambda: verify(graph_module, module, inputs, plan=plan))
    return seconds


def profile(name: str, seed: int, repeats: int, top: int) -> tuple[list, list, list]:
    factory, make_inputs, classifier = FULL[name]
    model = build(factory, seed)
    masks = planted_masks(model, 0.5, classifier, seed)
    masked, inputs = apply_masks(model, masks), make_inputs(1)
    rules = TimedRules()
    rounds = [_rounds(model, masks, inputs, masked, rules) for _ in range(repeats)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    passed = sum(median[p] for p in PHASES[:-1])
    row = [name, f"{median['forward']:.3f}", *(f"{median[p]:.2f}" for p in PHASES), f"{passed:.2f}",
           f"{passed / median['forward']:.1f}", f"{median['verify'] / median['forward']:.1f}"]
    profiler = cProfile.Profile()
    profiler.runcall(lambda: _rounds(model, masks, inputs, masked))
    stats = pstats.Stats(profiler).stats
    total = sum(entry[2] for entry in stats.values())
    worst = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    functions = [[name, _where(key), f"{entry[2] / total:.0%}", entry[1]] for key, entry in worst]
    passes = sum(sum(r[p] for p in PHASES[:-1]) for r in rounds)
    ranked = sorted(rules.seconds.items(), key=lambda item: -item[1])[:top]
    by_rule = [[name, what, f"{seconds / repeats:.2f}", f"{seconds / passes:.0%}"] for what, seconds in ranked]
    return row, functions, by_rule


class TimedRules:
    """``fxmin.REGISTRY`` seen through ``lookup``, each rule's forward, backward and plan timed (CPU seconds,
    what they call included): pass it as ``analyze_graph(..., registry=...)``; ``make_plan`` calls the plans
    of the rules the analysis chose."""

    def __init__(self):
        self.seconds: dict = {}
        self._wrapped: dict = {}

    def lookup(self, node, root):
        rule = REGISTRY.lookup(node, root)
        if rule is None:
            return None
        if id(rule) not in self._wrapped:
            parts = {part: self._timed(f"{rule.name} {part}", getattr(rule, part))
                     for part in ("forward", "backward", "plan") if getattr(rule, part) is not None}
            self._wrapped[id(rule)] = dataclasses.replace(rule, **parts)
        return self._wrapped[id(rule)]

    def _timed(self, key: str, function):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.process_time() - start
        return timed


def _where(key) -> str:
    filename, line, function = key
    if filename == "~":
        return function  # a builtin
    path = Path(filename)
    parts = path.parts
    short = "/".join(parts[parts.index("fxmin"):]) if "fxmin" in parts else "/".join(parts[-2:])
    return f"{short}:{line} {function}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    args = parse_common(parser, argv)
    rows, functions, rules = [], [], []
    for name in args.models:
        row, worst, shares = profile(name, args.seed, args.repeats, args.top)
        rows.append(row)
        functions += worst
        rules += shares
        print("  " + " | ".join(row), flush=True)
    table = tabulate(rows, headers=["model", "forward s", *(f"{p} s" for p in PHASES), "pass s", "pass / forward",
                                    "verify / forward"], tablefmt="github", disable_numparse=True)
    hot = tabulate(functions, headers=["model", "function (own time)", "share of profiled time", "calls"],
                   tablefmt="github", disable_numparse=True)
    by_rule = tabulate(rules, headers=["model", "rule part (with what it calls)", "s per pass", "share of the pass"],
                       tablefmt="github", disable_numparse=True)
    print(table + "\n\n" + hot + "\n\n" + by_rule)
    if args.write:
        notes = (f"CPU seconds, medians of {args.repeats} rounds, torch.set_num_threads({args.threads}); 'pass' is "
                 "prepare (a copy of the module structure sharing the weights, trace, shape propagation, finiteness check) "
                 "+ analysis + plan + rewrite, as fxmin.minimize runs them; 'verify' is its streamed verification. The second table is one more round "
                 "under cProfile: the functions with the most time of their own; the third, from the timed rounds, "
                 "the rules by the CPU time of their forward, backward or plan (with what they call) per pass and as "
                 "a share of the pass.\n\n" + hot + "\n\n" + by_rule)
        publish("Where the pass spends its time", table, argv, "pass_profile.py", notes)


if __name__ == "__main__":
    main()
