"""Long jobs in words: what the job is doing and for how long, then how long it has left.

An engine job reports `progress(frac, msg)`. `Tracker` turns that into one line for the page: during
the first block (unit) the step in words and the elapsed time (a fraction there says nothing: it sits
at 0 % while the first block runs); once a block is done, an estimate of the time left from the
measured time per block. `Job` runs the engine call in a thread so a panel's generator handler can
yield that line while it runs and the results once, whole, at the end.
"""

from __future__ import annotations

import threading
import time


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Tracker:
    """The engine's progress callback; `line()` says where the job stands. `units`: how many blocks
    (or other equal pieces) the job has; its first one is done when the reported fraction reaches 1/units."""

    def __init__(self, units: int = 1, what: str = "starting", clock=time.monotonic):
        self.units = max(1, int(units))
        self.clock = clock
        self.t0 = clock()
        self.frac = 0.0
        self.msg = what
        self.first_done: float | None = None  # elapsed seconds when the first unit ended

    def __call__(self, frac, msg: str = "") -> None:
        if frac is not None:
            self.frac = max(self.frac, min(1.0, float(frac)))
        if msg:
            self.msg = msg
        if self.first_done is None and self.frac >= 1.0 / self.units - 1e-9:
            self.first_done = self.clock() - self.t0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left, from the measured time per unit; None during the first unit."""
        if self.first_done is None or self.frac <= 0 or self.frac >= 1:
            return None
        el = self.elapsed()
        per_unit = el / (self.frac * self.units)
        return per_unit * self.units * (1 - self.frac)

    def line(self) -> str:
        el = self.elapsed()
        left = self.eta()
        if left is None:
            return f"{self.msg} · {duration(el)} elapsed"
        per = el / (self.frac * self.units)
        return (f"{self.msg} · {duration(el)} elapsed, about {duration(left)} left "
                f"({duration(per)} per block, {self.frac:.0%} done)")


class Job:
    """`fn()` in a daemon thread. `lines()` yields the tracker's line every `poll` seconds while it
    runs; `result()` returns fn's value or re-raises what it raised (Cancelled included)."""

    def __init__(self, fn, tracker: Tracker, poll: float = 0.5):
        self.tracker, self.poll = tracker, poll
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the caller's thread by result()
            self._error = e

    def lines(self):
        while self._thread.is_alive():
            yield self.tracker.line()
            self._thread.join(self.poll)

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
