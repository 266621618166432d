"""The documentation that is generated from the code stays in step with it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_is_described_in_the_exactness_table():
    # this checkout's fxmin, not the one the environment installed (another worktree, say)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_rules_table.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
