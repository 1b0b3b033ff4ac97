"""What the ratio benchmarks share: interleaved repeats, medians, the machine, test images.

Every script measures tltk and its baseline in the same process, taking turns: in each
repeat every case runs once, and the case that goes first rotates, so a slow spell of a
shared machine falls on all of them alike. A ratio is the median over the repeats of
that repeat's ratio (the two numbers of a repeat saw the same machine), next to the
median times themselves.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats of every case [%(default)s]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides [%(default)s]; on a small shared machine more "
                             "threads than free cores make every operation wait for a descheduled thread")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def machine_line() -> str:
    """CPU, cores, load, bf16 support and library versions: what the figures depend on."""
    from tltk.runtime import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu}, {os.cpu_count()} cores, load {load:.1f}, native bf16 {'yes' if cpu_has_native_bf16() else 'no'}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def interleave(cases: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Wall-clock seconds of every case in every repeat (after one untimed round)."""
    names = list(cases)
    if warmup:
        for name in names:
            cases[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            started = time.perf_counter()
            cases[name]()
            seconds[name].append(time.perf_counter() - started)
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names), flush=True)
    return seconds


_INHERITED = object()  # a method a class inherits: removing the wrapper restores it


@contextmanager
def time_spent_in(functions: dict[str, str]) -> Iterator[dict[str, float]]:
    """Wall seconds spent inside each function while the block runs, by the names given.

    ``functions`` maps a name to ``"module:attribute.path"`` (``"tltk.train.cache:FeatureCache.extract"``).
    Each is replaced where it lives by a wrapper that adds up its time, and put back on
    exit; callers that reach it through that module or class see the wrapper. A path that
    does not resolve is a KeyError: a breakdown must not quietly leave a part out.
    """
    totals = {name: 0.0 for name in functions}
    restore: list[tuple[Any, str, Any]] = []

    def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started

        return wrapper

    try:
        for name, target in functions.items():
            module_name, _, path = target.partition(":")
            *owner_path, attribute = path.split(".")
            owner: Any = importlib.import_module(module_name)
            for part in owner_path:
                owner = getattr(owner, part)
            if not hasattr(owner, attribute):
                raise KeyError(f"{target} does not exist; the breakdown's list of functions needs updating")
            restore.append((owner, attribute, vars(owner).get(attribute, _INHERITED)))
            setattr(owner, attribute, timed(name, getattr(owner, attribute)))
        yield totals
    finally:
        for owner, attribute, original in reversed(restore):
            if original is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def ratio_range(numerator: list[float], denominator: list[float]) -> str:
    """The spread of the per-repeat ratios, to read the median against."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"per-repeat range {min(ratios):.3f}-{max(ratios):.3f}"


def print_speeds(seconds: dict[str, list[float]], items: float, unit: str = "images") -> None:
    for name, values in seconds.items():
        middle = statistics.median(values)
        print(f"  {name:<34} median {middle:8.3f} s  ({items / middle:9.1f} {unit}/s)")


def write_jpeg_folder(root: Path, classes: int = 4, per_class: int = 100, size: tuple[int, int] = (320, 240)) -> Path:
    """A folder of class subfolders of JPEGs, photo-sized and smooth like photos, made once.

    Each image is a coloured gradient with a class-specific shape and mild noise, saved
    at quality 90: decoding costs what a camera JPEG of that size costs.
    """
    marker = root / f".complete-{classes}-{per_class}-{size[0]}x{size[1]}"
    if marker.exists():
        return root
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.uniform(40, 200, 3)
            tilt = rng.uniform(-0.3, 0.3, 3)
            pixels = np.stack([base[k] + tilt[k] * (xx if k % 2 else yy) for k in range(3)], -1)
            pixels += rng.normal(0, 6, pixels.shape)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            x, y = rng.uniform(0.2, 0.6) * width, rng.uniform(0.2, 0.6) * height
            box = [x, y, x + width / 4, y + height / 4]
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            [draw.ellipse, draw.rectangle, draw.polygon, draw.chord][c % 4](
                box if c % 4 != 2 else [(x, y), (x + width / 4, y), (x + width / 8, y + height / 4)], fill=colour,
                **({"start": 0, "end": 180} if c % 4 == 3 else {}),
            )
            image.save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def write_digits_folder(root: Path | str) -> Path:
    """scikit-learn's digits as an image folder both tltk and timm's train.py read:
    ``train/`` (tltk's train and validation carve of ``builtin:digits``) and
    ``validation/`` (its test carve), one subfolder per digit, 8x8 PNGs."""
    from PIL import Image

    from tltk.data import load_data

    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    data = load_data("builtin:digits")
    for split, samples in (("train", data.train + data.val), ("validation", data.test)):
        for sample in samples:
            folder = root / split / data.class_names[sample.target]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = data.arrays[sample.source][..., 0]
            Image.fromarray(pixels).convert("RGB").save(folder / f"{sample.id.replace('/', '_')}.png")
    marker.touch()
    return root
