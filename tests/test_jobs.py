"""panels.jobs: the progress line in words, the estimate of the time left, the job thread."""

from __future__ import annotations

import threading

import pytest

from workbench.engine.errors import Cancelled
from workbench.panels.jobs import Job, Tracker, duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_first_block_shows_words_and_elapsed_then_an_estimate_from_time_per_block():
    clock = Clock()
    tr = Tracker(units=4, what="starting", clock=clock)
    clock.t += 7
    tr(0.0, "quantize: block 3 (gptq 4-bit)")
    assert tr.line() == "quantize: block 3 (gptq 4-bit) · 7 s elapsed" and tr.eta() is None
    clock.t += 13
    tr(0.2, "quantize: block 3, linear 5 of 7")  # still inside the first of 4 blocks
    assert tr.eta() is None and "left" not in tr.line()
    tr(0.25, "quantize: block 4")  # the first block ended after 20 s
    clock.t += 20  # 40 s for 2 blocks so far: 20 s per block, 2 blocks left
    tr(0.5, "quantize: block 5")
    assert tr.eta() == pytest.approx(40.0)
    assert tr.line() == "quantize: block 5 · 40 s elapsed, about 40 s left (20 s per block, 50% done)"
    tr(1.0, "done")
    assert tr.eta() is None and tr.line() == "done · 40 s elapsed"


def test_fraction_never_goes_back_and_none_keeps_it():
    tr = Tracker(units=2, clock=Clock())
    tr(0.6, "a")
    tr(0.1, "b")
    tr(None, "c")
    assert tr.frac == 0.6 and tr.msg == "c"


def test_duration_words():
    assert [duration(s) for s in (0.4, 59, 65, 3725)] == ["0 s", "59 s", "1 min 05 s", "1 h 02 min"]


def test_job_yields_lines_while_running_and_hands_back_result_or_error():
    go = threading.Event()
    tr = Tracker(units=1, what="waiting")

    def work():
        go.wait(5)
        return 42

    job = Job(work, tr, poll=0.01)
    lines = job.lines()
    assert next(lines).startswith("waiting · ")
    go.set()
    assert all(isinstance(x, str) for x in lines)
    assert job.result() == 42

    def cancelled():
        raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        Job(cancelled, tr, poll=0.01).result()
