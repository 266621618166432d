"""What the experiment scripts share: writing their section of docs/results.md."""
from __future__ import annotations

import os


def replace_section(path, owner, text):
    """Put ``text`` between the ``<!-- owner begins/ends -->`` markers of ``path`` (appended when absent);
    whatever else the file holds (sections written by hand, other scripts' sections) is kept."""
    begin, end = f"<!-- {owner} begins -->", f"<!-- {owner} ends -->"
    old = open(path).read() if os.path.exists(path) else "# Results\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old.split(begin, 1)[0] + block + old.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as handle:
        handle.write(new)
