"""The README's quickstart runs and prints exactly the report the README shows under it."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_quickstart_prints_the_report_shown():
    text = README.read_text()
    code, shown = re.search(r"## Quickstart\n\n```python\n(.*?)```\n```\n(.*?)```", text, re.S).groups()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    assert printed.getvalue() == shown
