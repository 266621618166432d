"""Faults in the Squeeze-Release cycle: SIGKILL at random points, then resume.

A small, deterministic cycle (an MLP on a synthetic 3-class problem, a few cycles and a finishing
phase, checkpoints on) runs in a child process that is killed with SIGKILL — at a random moment, or at
an injected point: inside a training call (``train``), inside minimization (``rewrite``: the Nth
``GraphModule.recompile``), or halfway through writing a checkpoint (``save``: the Nth ``torch.save``
writes half its bytes, then the process dies). After each kill every checkpoint left must load, the
work lost must be at most the cycle in progress, and the run resumed to its end must give the same
history and weights as a run that was never killed.

    python -m benchmarks.cycle_kills --kills 50 --write docs/reliability.md

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


def _inject(kill_at: str | None, log) -> None:
    """Arm the injected kill ``point:count`` (``train:N``, ``rewrite:N``, ``save:N``)."""
    if not kill_at:
        return
    point, count = kill_at.split(":")
    countdown = [int(count)]

    def due() -> bool:
        countdown[0] -= 1
        return countdown[0] == 0

    import torch
    import torch.fx

    if point == "rewrite":
        recompile = torch.fx.GraphModule.recompile

        def recompile_then_maybe_die(self, *args, **kwargs):
            if due():
                log("kill rewrite")
                _die()
            return recompile(self, *args, **kwargs)

        torch.fx.GraphModule.recompile = recompile_then_maybe_die
    elif point == "save":
        save = torch.save

        def save_half_then_maybe_die(obj, f, *args, **kwargs):
            if not due() or not isinstance(f, (str, os.PathLike)):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
            log(f"kill save {os.path.basename(f)}")
            _die()

        torch.save = save_half_then_maybe_die
    elif point != "train":
        raise SystemExit(f"unknown kill point {point!r}: train, rewrite or save")
    _inject.train_due = due if point == "train" else (lambda: False)


def run_child(folder: str, kill_at: str | None) -> None:
    import torch
    from torch import nn

    import fxmin

    torch.set_num_threads(1)
    log_path = os.path.join(folder, LOG)

    def log(line: str) -> None:
        with open(log_path, "a") as handle:
            handle.write(line + "\n")

    _inject.train_due = lambda: False
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
    folder = os.path.join(work, "reference")
    os.makedirs(folder)
    _finish(_spawn(folder))
    with open(os.path.join(folder, RESULT)) as handle:
        return json.load(handle)


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


def plan(kills: int, seed: int) -> list[list]:
    """Runs of 1-3 kills each, injected points and random moments mixed, ``kills`` kills in all."""
    rng = random.Random(seed)
    runs, planned = [], 0
    while planned < kills:
        run = []
        for _ in range(min(rng.randint(1, 3), kills - planned)):
            choice = rng.choice(["train", "rewrite", "save", "random"])
            if choice == "random":
                run.append(("random", round(rng.uniform(2.0, 12.0), 1)))
            else:
                run.append(f"{choice}:{rng.randint(1, {'train': 8, 'rewrite': 6, 'save': 5}[choice])}")
        runs.append(run)
        planned += len(run)
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
        expected = reference(work)
        runs = [killed_run(work, f"run{i}", kills) for i, kills in enumerate(plan(args.kills, args.seed))]
    rows = [row for run in runs for row in run["rows"] if row["killed"]]
    same = sum(run["result"] == expected for run in runs)
    summary = {
        "kills": len(rows), "runs": len(runs), "corrupt checkpoints": sum(len(r["corrupt"]) for r in rows),
        "max cycles lost": max((r["cycles_lost"] for r in rows), default=0),
        "runs equal to the uninterrupted run": f"{same} / {len(runs)}", "seconds": round(time.time() - started),
    }
    print(json.dumps(summary, indent=1))
    if args.write:
        _write(args.write, summary, rows, args)


def _write(path: str, summary: dict, rows: list, args) -> None:
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
        f"`python -m benchmarks.cycle_kills --kills {args.kills} --seed {args.seed} --write {path}` "
        f"({summary['seconds']} s): a small deterministic cycle (4 cycles and a 2-candidate finishing phase, "
        "checkpoints on) killed with SIGKILL inside training, inside minimization, halfway through a "
        "checkpoint write, or at a random moment; each time every checkpoint left is loaded, and the run "
        "is resumed until it ends.",
        "",
        tabulate([[v for k, v in summary.items() if k != "seconds"]],
                 headers=[k for k in summary if k != "seconds"], tablefmt="github"),
        "",
        tabulate([[kind, n, corrupt, lost] for kind, (n, corrupt, lost) in sorted(kinds.items())],
                 headers=["kill point", "kills", "corrupt checkpoints", "max cycles lost"], tablefmt="github"),
    ])
    replace_section(path, "cycle_kills.py", text, heading="# Reliability")


if __name__ == "__main__":
    main()
