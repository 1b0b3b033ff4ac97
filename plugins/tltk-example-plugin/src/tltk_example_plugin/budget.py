"""``time-budget``: stop training once it has taken a given number of seconds.

For shared machines and course clusters with a wall-clock limit: the run stops at a step
boundary with its best epoch kept, instead of being killed half-way. The seconds already
spent are part of the callback's state, so a run resumed from a checkpoint keeps to the
budget it started with rather than getting a fresh one.
"""

from __future__ import annotations

import time
from typing import Any

from tltk.plugin import Callback, TltkError


class TimeBudget(Callback):
    def __init__(self, seconds: float) -> None:
        if not seconds >= 0:
            raise TltkError(f"time-budget: seconds must be 0 or more, not {seconds}.")
        self.seconds = float(seconds)
        self.spent = 0.0  # before this process started (a resumed run's earlier part)
        self.started = time.monotonic()

    def on_train_start(self, model: Any, total_steps: int) -> None:
        self.started = time.monotonic()

    def on_step_end(self, model: Any, row: dict[str, Any], images: Any) -> None:
        if self.elapsed() >= self.seconds and self.loop is not None:
            self.loop.stop(f"time budget of {self.seconds:g} s used up at step {row['step']}")

    def elapsed(self) -> float:
        return self.spent + time.monotonic() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"spent": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent = float(state.get("spent", 0.0))


def time_budget(seconds: float = 3600.0) -> TimeBudget:
    """Stop training after ``seconds`` of it (kept across a resume)."""
    return TimeBudget(seconds)
