"""memory.py: returning freed heap to the OS during long streaming jobs."""

from __future__ import annotations

from edgellm import memory


class FakeLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_trims_only_after_the_resident_set_grew_by_a_step(monkeypatch):
    libc = FakeLibc()
    rss = iter([100, 130, 199, 210, 150, 240, 260])   # MB at construction, then at each call (and after a trim)
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "resident_mb", lambda: next(rss))
    trim = memory.TrimWhenGrown(step_mb=96)           # base 100
    trim()                                            # 130: +30, no trim
    assert libc.trims == 0
    trim()                                            # 199: +99 -> trim, new base read: 210
    assert libc.trims == 1
    trim()                                            # 150: below base
    trim()                                            # 240: +30 over 210
    assert libc.trims == 1
    trim()                                            # 260: +50
    assert libc.trims == 1


def test_resident_mb_reads_this_process():
    assert 10 < memory.resident_mb() < 1e6
