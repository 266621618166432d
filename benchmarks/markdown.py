"""The one writer of generated sections in the docs pages (docs/benchmarks.md, docs/results.md).

A generated section sits between ``<!-- KEY begins -->`` and ``<!-- KEY ends -->``; writing it again
replaces it in place, and everything else in the page (prose written by hand, other scripts' sections)
is kept. The benchmarks and the experiments import it as ``benchmarks.markdown``.
"""
from __future__ import annotations

from pathlib import Path


def markers(key: str) -> tuple[str, str]:
    """The begin and end lines of the section ``key``."""
    return f"<!-- {key} begins -->", f"<!-- {key} ends -->"


def spliced(page: str, key: str, text: str) -> str:
    """``page`` with the section ``key`` holding ``text``: replaced where the markers are, else appended."""
    begin, end = markers(key)
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in page and end in page:
        return page.split(begin, 1)[0] + block + page.split(end, 1)[1]
    return page.rstrip() + "\n\n" + block + "\n"


def replace_section(path, key: str, text: str, heading: str = "# Results") -> None:
    """Write ``text`` as the section ``key`` of the markdown file ``path`` (created with ``heading``)."""
    path = Path(path)
    page = path.read_text() if path.exists() else heading + "\n"
    path.write_text(spliced(page, key, text))


__all__ = ["markers", "replace_section", "spliced"]
