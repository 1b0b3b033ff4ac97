"""A rich progress bar for training: one bar over all steps, a line per epoch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichReporter:
    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, total_steps: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, status="")

    def step(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=row["step"], status=f"epoch {row['epoch']} loss {row['loss']:.4f}")

    def epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {row['epoch']}"]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_map", "val_map_voc07"):
            if key in row:
                parts.append(f"{key.replace('_', ' ')} {row[key]:.4f}")
        parts.append(f"{row['seconds']:.1f}s")
        self.console.print("  ".join(parts))

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
