"""The documentation that is generated from the code stays in step with it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_rule_is_described_in_the_exactness_table():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_rules_table.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
