"""NOTE [Freed memory]: when the pass gives freed pages back (fxmin/memory.py), with the process's resident
memory and peak played by the test."""
import pytest

from fxmin import memory

MIB = 1 << 20


@pytest.fixture
def process(monkeypatch):
    """A process whose resident memory and peak the test sets; ``trims`` counts the pages given back."""
    state = {"resident": 500 * MIB, "peak": 500 * MIB, "trims": 0}

    def trim(_pad):
        state["trims"] += 1

    monkeypatch.setattr(memory, "_MALLOC_TRIM", trim)
    monkeypatch.setattr(memory, "resident_bytes", lambda: (state["resident"], state["peak"]))
    monkeypatch.setattr(memory, "_read_since_trim", 0)
    monkeypatch.setattr(memory, "_floor", None)  # restored after the test, as the two above
    memory.new_baseline()
    return state


def read(state, megabytes: int, grow_by: int = 0) -> None:
    """Read ``megabytes`` in 8 MiB tensors, the process growing by ``grow_by`` MiB before each read."""
    for _ in range(megabytes // 8):
        state["resident"] += grow_by * MIB
        state["peak"] = max(state["peak"], state["resident"])
        memory.before_read(8 * MIB)


def test_a_pass_that_reuses_freed_pages_keeps_them(process):
    read(process, 1024)  # at its peak the whole time, and not growing: what it frees, it takes again
    assert process["trims"] == 0


def test_a_growing_pass_at_its_peak_gives_pages_back_each_time_it_grew_by_the_interval(process):
    read(process, 256, grow_by=4)  # a check per 32 MiB read: 8 checks, 16 MiB of growth between two
    assert process["trims"] == 4  # each time it grew by 32 MiB since the last trim


def test_growth_below_the_peak_gives_nothing_back(process):
    process["peak"] = 4096 * MIB  # the process held more before the pass
    read(process, 256, grow_by=4)
    assert process["trims"] == 0


def test_growth_before_the_pass_is_not_the_pass_growing(process):
    process["resident"] += 300 * MIB  # freed by what ran before the pass, still resident
    process["peak"] = process["resident"]
    memory.new_baseline()
    read(process, 512)
    assert process["trims"] == 0


def test_before_a_read_that_allocates_too_much_for_the_free_pages_they_go_back_at_the_peak(process):
    memory.before_read(64 * MIB)  # the model's own tensor: nothing allocated, nothing grew
    assert process["trims"] == 0
    memory.before_read(64 * MIB, allocates=True)  # read from files: mapped on its own, beside the free pages
    assert process["trims"] == 1
    process["peak"] += 1024 * MIB  # below the peak, the same read keeps them
    memory.before_read(64 * MIB, allocates=True)
    assert process["trims"] == 1
