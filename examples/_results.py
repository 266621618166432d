"""What the experiment scripts share: the cached dense model, writing their section of docs/results.md."""
from __future__ import annotations

import os
import time

import torch


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


def cached_dense(model, train, cache, wait=False, map_location=None):
    """Load ``model``'s trained weights from ``cache`` or train it (``train(model)``) and save them there,
    so that every process of an experiment starts from the same dense model; ``wait``: another process
    trains it, poll until the file appears. Returns the training time in seconds (as first measured)."""
    while wait and not os.path.exists(cache):
        time.sleep(5)
    if os.path.exists(cache):
        saved = torch.load(cache, map_location=map_location)
        model.load_state_dict(saved["state"])
        return saved["time_s"]
    began = time.perf_counter()
    train(model)
    seconds = time.perf_counter() - began
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    torch.save({"state": model.state_dict(), "time_s": seconds}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)  # a reader never sees a half-written file
    return seconds
