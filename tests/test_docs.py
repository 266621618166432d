"""The documentation that is generated from the code stays in step with it, and the repository stands alone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_is_described_in_the_exactness_table():
    # this checkout's fxmin, not the one the environment installed (another worktree, say)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_rules_table.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_repository_stands_alone_without_references_to_a_shared_folder_next_to_it():
    """docs/ is the specification: no tracked file points at design notes outside the repository."""
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("needs a git checkout")
    marker = "../" + "shared/"  # spelled in two pieces so that this test does not find itself
    outside = [path for path in listed.stdout.split()
               if (ROOT / path).is_file()
               and marker in (ROOT / path).read_text(errors="ignore")]
    assert outside == [], f"these files point outside the repository: {outside}"
