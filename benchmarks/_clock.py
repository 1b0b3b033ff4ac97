"""A training callback for the throughput benchmarks: the time at the end of every step."""

from __future__ import annotations

import time
from typing import Any

from tltk.train.callbacks import Callback


class StepClock(Callback):
    """The images/s of a ``tltk`` run between its first step's end and its last's: the first
    step's warm-up and everything before and after the steps are left out. Also per second
    of this process's CPU time, which a machine shared with other work disturbs far less
    than the wall clock (a fair measure where the process trains on one thread and has no
    worker processes)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_step_end(self, model: Any, row: Any, images: Any) -> None:
        self.tick()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def images_per_second(self, batch_size: int) -> float:
        return batch_size * (len(self.ends) - 1) / (self.ends[-1] - self.ends[0])

    def images_per_cpu_second(self, batch_size: int) -> float:
        return batch_size * (len(self.cpu_ends) - 1) / (self.cpu_ends[-1] - self.cpu_ends[0])
