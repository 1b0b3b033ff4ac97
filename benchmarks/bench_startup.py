"""The fixed cost of a command against importing torch and torchvision, in one run.

A one-epoch ``tltk finetune --backbone simplecnn --data builtin:digits`` pays for more
than its training: starting Python, imports, reading the data, building the model,
scoring the test split, writing the run directory and drawing its curves. Its fixed cost
is the command's wall time minus the training time the run records itself
(``summary.json``'s ``seconds``: ``fit`` from its start to the last epoch's end). The
baseline is ``python -c "import torch, torchvision"``, which no command that trains can
start faster than. Both are fresh processes; they take turns (interleaved repeats, the
first one rotating), and the difference is the median over the repeats of each repeat's
difference. Goal: at most 1 s more than the baseline.

The same run with ``--no-curves`` is timed in the same rounds: the three curve PNGs drawn at
the end of every run (matplotlib's import and three figures) are the largest single fixed
cost, and the difference between the two rows is what drawing them costs.

Run: ``python benchmarks/bench_startup.py`` (about a minute on two quiet cores at the
default 7 repeats). ``--data`` and ``--backbone`` time other runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = [sys.executable, "-c", "import torch, torchvision"]


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def one_run(args: argparse.Namespace, out: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds, training seconds) of one ``tltk finetune``."""
    command = [sys.executable, "-m", "tltk.cli", "finetune", "--backbone", args.backbone, "--data", args.data,
               "--epochs", "1", "--device", "cpu", "--quiet", "--overwrite", "--out", str(out), *extra]
    wall = wall_seconds(command)
    training = float(json.loads((out / "summary.json").read_text())["seconds"])
    return wall, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--backbone", default="simplecnn")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; tltk from {REPO}")
    baseline, walls, trainings, bare = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(args, Path(tmp) / "run")  # untimed: file caches warm for both sides
        wall_seconds(BASELINE)
        for repeat in range(args.repeats):
            turns = [lambda: baseline.append(wall_seconds(BASELINE)),
                     lambda: walls.append(one_run(args, Path(tmp) / "run")),
                     lambda: bare.append(one_run(args, Path(tmp) / "bare", "--no-curves"))]
            for turn in turns[repeat % 3:] + turns[:repeat % 3]:  # the first one rotates
                turn()
            print(f"  repeat {repeat + 1}/{args.repeats}: import torch, torchvision {baseline[-1]:.2f}s; "
                  f"finetune {walls[-1][0]:.2f}s, fixed {walls[-1][0] - walls[-1][1]:.2f}s; "
                  f"--no-curves {bare[-1][0]:.2f}s, fixed {bare[-1][0] - bare[-1][1]:.2f}s", flush=True)
    print(f"\nimport torch, torchvision  median {statistics.median(baseline):6.2f} s")
    for name, runs in (("tltk finetune (1 epoch)", walls), ("  the same, --no-curves", bare)):
        fixed = [wall - training for wall, training in runs]
        extra = [f - b for f, b in zip(fixed, baseline)]
        print(f"{name:<26} median {statistics.median(w for w, _ in runs):6.2f} s, training "
              f"{statistics.median(t for _, t in runs):.2f} s, fixed {statistics.median(fixed):.2f} s, fixed - baseline "
              f"{statistics.median(extra):+.2f} s (goal: at most +1.00 s; range {min(extra):+.2f} to {max(extra):+.2f})")


if __name__ == "__main__":
    main()
