"""Wall-clock time per phase of a training step, and the time left.

    timer = PhaseTimer(sync=torch.cuda.synchronize)      # sync=None on a CPU
    timer.start_step()
    with timer.phase("generate"): ...
    with timer.phase("update"): ...
    elapsed = timer.end_step()                           # timer.seconds == {"generate": 1.2, "update": 0.8}

On a GPU kernels run asynchronously, so a phase's end is only known after a device synchronisation; `sync` is
called at every phase boundary (a few per step, negligible against the step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class PhaseTimer:
    def __init__(self, *, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self._sync, self._clock = sync or (lambda: None), clock
        self.seconds: dict[str, float] = {}  # this step's seconds per phase
        self._began: float | None = None
        self._steps: list[float] = []  # durations of the steps timed so far

    def start_step(self) -> None:
        self._sync()
        self.seconds = {}
        self._began = self._clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under `name` (added to, when a phase is entered twice in a step)."""
        self._sync()
        began = self._clock()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + self._clock() - began

    def step_seconds(self) -> float:
        """Seconds since `start_step`."""
        return self._clock() - self._began

    def end_step(self) -> float:
        """Close the step; its seconds."""
        self._sync()
        elapsed = self.step_seconds()
        self._steps.append(elapsed)
        return elapsed

    def mean_step_seconds(self) -> float:
        """Mean duration of the steps timed so far (0 before the first)."""
        return sum(self._steps) / len(self._steps) if self._steps else 0.0


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
