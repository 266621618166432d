"""SIGKILL inside training, inside minimization and halfway through a checkpoint write, then resume:
no checkpoint is corrupt, at most the cycle in progress is lost, and the resumed run ends with the
history and weights of a run that was never killed. ``benchmarks/cycle_kills.py`` runs 50 kills."""
from __future__ import annotations

import pytest

from benchmarks import cycle_kills


@pytest.mark.parametrize("kills", [["train:3", "rewrite:2", "save:2"]], ids=["train-rewrite-save"])
def test_killed_cycle_resumes_to_the_uninterrupted_result(tmp_path, kills):
    expected = cycle_kills.reference(str(tmp_path))
    run = cycle_kills.killed_run(str(tmp_path), "killed", kills)
    assert [row["kill"] for row in run["rows"]] == kills and all(row["killed"] for row in run["rows"])
    for row in run["rows"]:
        assert row["corrupt"] == [], row
        assert row["cycles_lost"] <= 1, row
    assert run["result"] == expected  # history, finishing and a hash of the final weights
