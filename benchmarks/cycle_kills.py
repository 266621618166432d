"""Faults in the Squeeze-Release cycle: SIGKILL at random points, then resume.

A small, deterministic cycle (an MLP on a synthetic 3-class problem, a few cycles and a finishing
phase, checkpoints on) runs in a child process that is killed with SIGKILL — at a random moment, or at
an injected point: inside a training call (``train``), inside minimization (``rewrite``: the Nth
``GraphModule.recompile``), or halfway through writing a checkpoint (``save``: the Nth ``torch.save``
writes half its bytes, then the process dies). After each kill every checkpoint left must load, the
work lost must be at most the cycle in progress, and the run resumed to its end must give the same
history and weights as a run that was never killed. Kills are drawn within the uninterrupted run (its
number of training calls, recompiles and checkpoint writes, and its length), and runs are added until
``--kills`` kills have taken effect (a later kill of a run may fall after its resumed process ended).

    nice -n 10 timeout 3700 python -m benchmarks.cycle_kills --kills 50 --seed 0 --write docs/reliability.md

``tests/test_cycle_kills.py`` runs a few of the same kills in ``make test``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LOG = "progress.log"
RESULT = "result.json"


# -- the child: one deterministic cycle run, resumable, killable at an injected point ------------------------------

def _die():
    os.kill(os.getpid(), signal.SIGKILL)


POINTS = ("train", "rewrite", "save")


def _inject(kill_at: str | None, log) -> None:
    """Log each kill point as the run passes it (``event train|rewrite|save``: the uninterrupted run's
    counts bound the kills drawn) and arm the injected kill ``point:count`` (``train:N``, ``rewrite:N``,
    ``save:N``: at the Nth time this process passes that point)."""
    point, count = kill_at.split(":") if kill_at else ("", "0")
    if point and point not in POINTS:
        raise SystemExit(f"unknown kill point {point!r}: {', '.join(POINTS)}")
    countdown = [int(count)]

    def passing(here: str) -> bool:
        """Log that the run passes ``here``; True when the armed kill is due there."""
        log(f"event {here}")
        if here != point:
            return False
        countdown[0] -= 1
        return countdown[0] == 0

    import torch
    import torch.fx

    recompile = torch.fx.GraphModule.recompile

    def recompile_then_maybe_die(self, *args, **kwargs):
        if passing("rewrite"):
            log("kill rewrite")
            _die()
        return recompile(self, *args, **kwargs)

    torch.fx.GraphModule.recompile = recompile_then_maybe_die
    save = torch.save

    def save_half_then_maybe_die(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or not passing("save"):
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
        log(f"kill save {os.path.basename(f)}")
        _die()

    torch.save = save_half_then_maybe_die
    _inject.train_due = lambda: passing("train")


def run_child(folder: str, kill_at: str | None) -> None:
    import torch
    from torch import nn

    import fxmin

    torch.set_num_threads(1)
    log_path = os.path.join(folder, LOG)

    def log(line: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(line + "\n")

    _inject(kill_at, log)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g)
    y = (x[:, :8] @ torch.randn(8, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))

    def train(model, step):
        log(f"train {step.phase} {step.cycle}")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for index in range(int(step.epochs * 10)):
            if index == 5 and _inject.train_due():
                log("kill train")
                _die()
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()

    def evaluate(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    train(net, fxmin.TrainStep("dense", 0, 3))
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=4,
                                   amount=0.4, tolerance=0.5, finish_epochs=1, finish_candidates=2,
                                   finish_spacing=1.0, checkpoint_dir=folder, resume=True, progress=False)
    digest = hashlib.sha256()
    for name, tensor in result.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    summary = {"history": [[r.cycle, r.params, r.accuracy] for r in result.history],
               "finished": [[r.cycle, r.params, r.accuracy] for r in result.finished],
               "best_cycle": result.best_cycle, "weights": digest.hexdigest()}
    with open(os.path.join(folder, RESULT), "w") as handle:
        json.dump(summary, handle)


# -- the parent: kill, check, resume -------------------------------------------------------------------------------

def _spawn(folder: str, kill_at: str | None = None) -> subprocess.Popen:
    command = [sys.executable, HERE, "--child", folder] + (["--kill-at", kill_at] if kill_at else [])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen, timeout: float = 600) -> int:
    _, stderr = process.communicate(timeout=timeout)
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the child failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return process.returncode


def checkpoints_load(folder: str) -> tuple[int, list[str]]:
    """(the last cycle checkpointed, names of files that do not load). Temporary files are not checkpoints."""
    import torch

    last, corrupt = 0, []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".pt"):
            continue
        try:
            torch.load(os.path.join(folder, name), weights_only=False)
        except Exception:
            corrupt.append(name)
            continue
        if name.startswith("cycle_"):
            last = max(last, int(name[len("cycle_"):-len(".pt")]))
    return last, corrupt


def cycle_in_progress(folder: str) -> int:
    """The cycle whose training (squeeze or release) the log shows last; 0 before the first."""
    cycle = 0
    with open(os.path.join(folder, LOG)) as handle:
        for line in handle:
            parts = line.split()
            if parts[0] == "train" and parts[1] in ("squeeze", "release"):
                cycle = int(parts[2])
    return cycle


def reference(work: str) -> dict:
    """The result of the run never killed."""
    return reference_run(work)[0]


def reference_run(work: str) -> tuple[dict, dict]:
    """``(result, reach)`` of the run never killed: ``reach`` counts the times it passed each kill point
    and its length in seconds (the process's, from spawn to exit), the bounds of the kills drawn."""
    folder = os.path.join(work, "reference")
    os.makedirs(folder)
    started = time.perf_counter()
    _finish(_spawn(folder))
    reach = {"seconds": time.perf_counter() - started, **{point: 0 for point in POINTS}}
    with open(os.path.join(folder, LOG)) as handle:
        for line in handle:
            parts = line.split()
            if parts[0] == "event":
                reach[parts[1]] += 1
    with open(os.path.join(folder, RESULT)) as handle:
        return json.load(handle), reach


def killed_run(work: str, name: str, kills: list) -> dict:
    """Run to the end through ``kills`` (each ``point:count`` or ``('random', seconds)``); one row per kill."""
    folder = os.path.join(work, name)
    os.makedirs(folder)
    rows = []
    for kill in kills:
        if isinstance(kill, tuple):
            process = _spawn(folder)
            time.sleep(kill[1])
            process.send_signal(signal.SIGKILL)
            code = _finish(process)
            label = f"random after {kill[1]:.1f} s"
        else:
            code = _finish(_spawn(folder, kill))
            label = kill
        if code == 0:
            rows.append({"kill": label, "killed": False})
            break
        checkpointed, corrupt = checkpoints_load(folder)
        in_progress = cycle_in_progress(folder) if os.path.exists(os.path.join(folder, LOG)) else 0
        rows.append({"kill": label, "killed": True, "corrupt": corrupt,
                     "cycles_lost": max(0, in_progress - checkpointed)})
    if not os.path.exists(os.path.join(folder, RESULT)):
        _finish(_spawn(folder))
    with open(os.path.join(folder, RESULT)) as handle:
        return {"rows": rows, "result": json.load(handle)}


def draw_run(rng: random.Random, reach: dict, most: int) -> list:
    """The kills of one run: 1 to ``most`` (at most 3), injected points and random moments mixed, each
    drawn within what the uninterrupted run reaches (``reach``): the first one always takes effect; a
    later one falls in the resumed process, which has less left to do, and may come after its end."""
    run = []
    for _ in range(min(rng.randint(1, 3), most)):
        choice = rng.choice([*POINTS, "random"])
        if choice == "random":
            run.append(("random", round(rng.uniform(1.0, reach["seconds"]), 1)))
        else:
            run.append(f"{choice}:{rng.randint(1, reach[choice])}")
    return run


def kill_runs(work: str, kills: int, seed: int, reach: dict) -> list:
    """Killed runs, drawn and run one after the other until ``kills`` kills have taken effect."""
    rng = random.Random(seed)
    runs, effective = [], 0
    while effective < kills:
        run = killed_run(work, f"run{len(runs)}", draw_run(rng, reach, kills - effective))
        runs.append(run)
        effective += sum(row["killed"] for row in run["rows"])
        print(json.dumps({"run": len(runs) - 1, "kills so far": effective, **run}), file=sys.stderr, flush=True)
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", help=argparse.SUPPRESS)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this page's cycle-kills section")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.kill_at)
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        expected, reach = reference_run(work)
        runs = kill_runs(work, args.kills, args.seed, reach)
    rows = [row for run in runs for row in run["rows"] if row["killed"]]
    late = sum(not row["killed"] for run in runs for row in run["rows"])
    same = sum(run["result"] == expected for run in runs)
    summary = {
        "kills": len(rows), "kills after the end": late, "runs": len(runs),
        "corrupt checkpoints": sum(len(r["corrupt"]) for r in rows),
        "max cycles lost": max((r["cycles_lost"] for r in rows), default=0),
        "runs equal to the uninterrupted run": f"{same} / {len(runs)}", "seconds": round(time.time() - started),
        "reach": reach,
    }
    print(json.dumps(summary, indent=1))
    if args.write:
        _write(args.write, summary, rows, args)


def _write(path: str, summary: dict, rows: list, args) -> None:
    reach = summary["reach"]
    from tabulate import tabulate

    from benchmarks.markdown import replace_section

    kinds = {}
    for row in rows:
        kind = row["kill"].split(":")[0].split(" ")[0]
        entry = kinds.setdefault(kind, [0, 0, 0])
        entry[0] += 1
        entry[1] += len(row["corrupt"])
        entry[2] = max(entry[2], row["cycles_lost"])
    text = "\n".join([
        "## Faults in the Squeeze-Release cycle",
        "",
        f"`nice -n 10 timeout 3700 python -m benchmarks.cycle_kills --kills {args.kills} --seed {args.seed} "
        f"--write {path}` ({summary['seconds']} s): a small deterministic cycle (4 cycles and a 2-candidate "
        "finishing phase, checkpoints on) killed with SIGKILL inside training, inside minimization, halfway "
        "through a checkpoint write, or at a random moment; each time every checkpoint left is loaded, and "
        "the run is resumed until it ends. Each kill is drawn within the uninterrupted run (it passed "
        f"{reach['train']} training calls, {reach['rewrite']} recompiles and {reach['save']} checkpoint writes "
        f"in {reach['seconds']:.0f} s), and runs are added until {args.kills} kills have taken effect; "
        "'kills after the end' counts the later kills of a run that fell after its resumed process ended.",
        "",
        tabulate([[v for k, v in summary.items() if k not in ("seconds", "reach")]],
                 headers=[k for k in summary if k not in ("seconds", "reach")], tablefmt="github"),
        "",
        tabulate([[kind, n, corrupt, lost] for kind, (n, corrupt, lost) in sorted(kinds.items())],
                 headers=["kill point", "kills", "corrupt checkpoints", "max cycles lost"], tablefmt="github"),
    ])
    replace_section(path, "cycle_kills.py", text, heading="# Reliability")


if __name__ == "__main__":
    main()
