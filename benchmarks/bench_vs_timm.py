"""The same training run end to end: `tltk finetune` against timm's `train.py`, default flags on both sides.

timm's ``train.py`` is a script in the pytorch-image-models repository, not part of the
timm package, and tltk does not ship it: ``--train-py PATH`` names a copy of it (see
docs/performance.md for the revision measured). Both commands run as fresh processes;
the time of each is its whole wall time, from process start to exit (imports, reading
the data, training, validation, checkpoints, everything either writes).

The data set is written by this script as a folder of JPEGs that both sides read from
disk, ``train/`` and ``validation/`` with one subfolder per class: scikit-learn's digits
(the ten classes) drawn at ``--image-size`` pixels, each time at a random size and place
in a random colour over a random two-colour gradient of the opposite brightness, with
noise, saved at JPEG quality 90. The training images are drawn from tltk's train and validation carve of
``builtin:digits`` and the validation images from its test carve, so no digit appears on
both sides (a digit is drawn several times, differently, when more images than digits
are asked for).

What is set alike on both sides: the model (ResNet-18 from scratch, 10 classes), the
input size, the batch size, the epochs, the loader workers, and the torch threads
(``OMP_NUM_THREADS``, see ``--threads``). Both train on every image of ``train/`` and
score the images of ``validation/`` after every epoch (timm's default; tltk's with
``--test-split 0``, which says that the folder's ``validation/`` is the held-out set and
nothing else is to be carved off). Everything else is each tool's default: timm's SGD
with its batch-scaled learning rate, five warm-up epochs, random-resized crops, colour
jitter, label smoothing and fp32; tltk's AdamW, cosine schedule, no augmentation and
``--precision auto`` (bf16 where the CPU computes it natively). Each tltk run starts
with an empty decoded-image cache (its own ``$TLTK_CACHE``), so it pays for decoding as a
first run on new files does.

The accuracy compared is each side's top-1 on ``validation/`` after the last epoch:
timm's ``eval_top1`` in its ``summary.csv``, tltk's ``final.val_accuracy`` in
``summary.json``. The runs take turns (the first side alternating) and the ratio
printed is the median of the per-repeat ratios tltk / timm of the wall time; goal: at
most 0.5 at equal or better accuracy. The CPU seconds of each command's whole process
tree (its loader workers included) are printed beside it: other jobs on a shared
machine move them far less than the wall clock.

Run: ``python benchmarks/bench_vs_timm.py --train-py /path/to/timm/train.py`` (2,000
training and 500 validation images at 32 px, 10 epochs, 3 repeats: about 10-15 minutes on 2
shared cores; ``--repeats 1 --epochs 1`` for a quick look). Ten epochs because ResNet-18
from scratch is still near chance after three on these images, where an accuracy
comparison says nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from _common import interleave, machine_line, median_ratio, ratio_range

if TYPE_CHECKING:
    from PIL import Image

TIMM = "timm train.py"
TLTK = "tltk finetune"
GOAL = 0.5  # tltk's wall time at most this share of timm's


@dataclass(frozen=True)
class Setup:
    """What both commands are given alike."""

    data: Path
    image_size: int
    batch_size: int
    epochs: int
    workers: int
    timm_extra: tuple[str, ...] = ()  # flags beyond the defaults, to see what one setting changes
    tltk_extra: tuple[str, ...] = ()


def write_coloured_digits(root: Path, train_images: int, validation_images: int, size: int, seed: int = 0) -> Path:
    """``root/train/<digit>/*.jpg`` and ``root/validation/<digit>/*.jpg``, made once per
    (counts, size, seed): the digits drawn in colour at ``size`` pixels (see the module's
    docstring). Returns ``root``."""
    marker = root / f".complete-v2-{train_images}-{validation_images}-{size}-{seed}"
    if marker.exists():
        return root
    from tltk.data import load_data

    shutil.rmtree(root, ignore_errors=True)
    data = load_data("builtin:digits")
    sources = {"train": data.train + data.val, "validation": data.test}
    counts = {"train": train_images, "validation": validation_images}
    for offset, (split, samples) in enumerate(sources.items()):
        rng = np.random.default_rng([seed, offset])
        for i in range(counts[split]):
            sample = samples[i % len(samples)]
            folder = root / split / data.class_names[sample.target]
            folder.mkdir(parents=True, exist_ok=True)
            digit = np.asarray(data.arrays[sample.source])[..., 0]
            draw_digit(digit, size, rng).save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def draw_digit(digit: np.ndarray, size: int, rng: np.random.Generator) -> "Image.Image":
    """One 8 x 8 grey digit as a ``size`` x ``size`` colour picture: scaled to 50-90% of the
    side at a random place, a random ink over a random gradient, mild noise. Ink and
    background are drawn from opposite ends of every channel (light on dark or dark on
    light), so that the shape always stands out."""
    from PIL import Image

    side = int(rng.integers(size // 2, int(size * 0.9) + 1))
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)
    top, left = rng.integers(0, size - side + 1, 2)
    alpha[top:top + side, left:left + side] = ink
    dark, light = rng.uniform(0, 110, (3, 3)), rng.uniform(145, 255, (3, 3))  # every channel apart by 35 or more
    start, end, colour = (light[0], light[1], dark[2]) if rng.random() < 0.5 else (dark[0], dark[1], light[2])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    background = start + (end - start) * ramp[..., None]
    pixels = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def timm_command(train_py: Path, setup: Setup, out: Path) -> list[str]:
    """timm's defaults but for what must match (and ``--device cpu``: its default is CUDA)."""
    return [sys.executable, str(train_py), "--data-dir", str(setup.data), "--model", "resnet18", "--num-classes", "10",
            "--img-size", str(setup.image_size), "-b", str(setup.batch_size), "--epochs", str(setup.epochs),
            "--workers", str(setup.workers), "--device", "cpu", "--output", str(out), "--experiment", "timm",
            *setup.timm_extra]


def tltk_command(setup: Setup, out: Path) -> list[str]:
    """tltk's defaults but for what must match (``--weights none``: from scratch;
    ``--test-split 0``: ``validation/`` is the held-out set, nothing more is carved off)."""
    return [sys.executable, "-m", "tltk.cli", "finetune", "--backbone", "resnet18", "--weights", "none",
            "--data", f"folder:{setup.data}", "--test-split", "0", "--input-size", str(setup.image_size),
            "--batch-size", str(setup.batch_size), "--epochs", str(setup.epochs), "--workers", str(setup.workers),
            "--out", str(out), "--quiet", *setup.tltk_extra]


def timm_accuracy(out: Path) -> float:
    """The last epoch's top-1 on ``validation/``, as a fraction (timm writes percent)."""
    with open(out / "timm" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1]["eval_top1"]) / 100


def tltk_accuracy(out: Path) -> float:
    return float(json.loads((out / "summary.json").read_text())["final"]["val_accuracy"])


def run_command(command: list[str], env: dict[str, str], log: Path) -> float:
    """Runs to the end and returns the CPU seconds (user and system) that the command and
    every process it started used; stops the benchmark with the command's last lines if it
    fails: a failed run has no time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as handle:
        finished = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if finished.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(command)} exited with {finished.returncode}:\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def child_environment(threads: int) -> dict[str, str]:
    """This environment, with the worktree's tltk importable and the threads both sides use."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py (from pytorch-image-models)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of both runs [%(default)s]")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of both runs [%(default)s]")
    parser.add_argument("--train-images", type=int, default=2000, help="[%(default)s]")
    parser.add_argument("--validation-images", type=int, default=500, help="[%(default)s]")
    parser.add_argument("--image-size", type=int, default=32, help="the JPEGs' side and both input sizes [%(default)s]")
    parser.add_argument("--batch-size", type=int, default=64, help="[%(default)s]")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of both sides [%(default)s]")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of both commands [%(default)s]; 0: unset, each tool's own choice")
    parser.add_argument("--timm-extra", default="", metavar="FLAGS",
                        help="more flags for train.py, e.g. '--amp --amp-dtype bfloat16' (no longer its defaults)")
    parser.add_argument("--tltk-extra", default="", metavar="FLAGS",
                        help="more flags for tltk finetune, e.g. '--precision fp32' (no longer its defaults)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the JPEGs are written [a folder in the system's temporary directory]")
    args = parser.parse_args()
    if not args.train_py.is_file():
        raise SystemExit(f"--train-py {args.train_py} is not a file; give the path of timm's train.py.")
    print(machine_line())
    data = args.folder or Path(tempfile.gettempdir()) / f"tltk-bench-coloured-digits-{args.image_size}px"
    write_coloured_digits(data, args.train_images, args.validation_images, args.image_size)
    setup = Setup(data, args.image_size, args.batch_size, args.epochs, args.workers,
                  tuple(shlex.split(args.timm_extra)), tuple(shlex.split(args.tltk_extra)))
    with tempfile.TemporaryDirectory(prefix="tltk-bench-vs-timm-") as tmp:
        measure(setup, args, Path(tmp))


@dataclass
class Runs:
    """What every run of one side left behind, in the order they ran."""

    accuracy: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-minute load average at the start
    training_seconds: list[float] = field(default_factory=list)  # tltk: summary.json's "seconds" (fit alone)


def measure(setup: Setup, args: argparse.Namespace, tmp: Path) -> None:
    env = child_environment(args.threads)
    runs = {TIMM: Runs(), TLTK: Runs()}

    def timm() -> None:
        out = tmp / "timm-run"
        shutil.rmtree(out, ignore_errors=True)
        runs[TIMM].loads.append(os.getloadavg()[0])
        runs[TIMM].cpu_seconds.append(run_command(timm_command(args.train_py, setup, out), env, tmp / "timm.log"))
        runs[TIMM].accuracy.append(timm_accuracy(out))

    def tltk() -> None:
        out, cache = tmp / "tltk-run", tmp / "tltk-cache"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)  # every run decodes its images, as a first run does
        runs[TLTK].loads.append(os.getloadavg()[0])
        runs[TLTK].cpu_seconds.append(
            run_command(tltk_command(setup, out), env | {"TLTK_CACHE": str(cache)}, tmp / "tltk.log"))
        runs[TLTK].accuracy.append(tltk_accuracy(out))
        runs[TLTK].training_seconds.append(float(json.loads((out / "summary.json").read_text())["seconds"]))

    print(f"{TIMM}: {' '.join(timm_command(args.train_py, setup, Path('OUT')))}")
    print(f"{TLTK}: {' '.join(tltk_command(setup, Path('OUT')))}")
    print(f"  threads: {env.get('OMP_NUM_THREADS', 'each tool its own')}; data: {setup.data} "
          f"({args.train_images} train / {args.validation_images} validation JPEGs of {setup.image_size} px)", flush=True)
    seconds = interleave({TLTK: tltk, TIMM: timm}, args.repeats, warmup=False)
    report(seconds, runs)


def report(seconds: dict[str, list[float]], runs: dict[str, Runs]) -> None:
    for name in (TIMM, TLTK):
        run = runs[name]
        print(f"  {name:<16} median {statistics.median(seconds[name]):8.1f} s wall, "
              f"{statistics.median(run.cpu_seconds):8.1f} CPU-s, validation top-1 {statistics.median(run.accuracy):.4f} "
              f"(runs: {', '.join(f'{a:.4f}' for a in run.accuracy)}; load at their start: "
              f"{', '.join(f'{load:.1f}' for load in run.loads)})")
    print(f"  tltk's training alone (summary.json seconds): median {statistics.median(runs[TLTK].training_seconds):.1f} s")
    cpu = median_ratio(runs[TLTK].cpu_seconds, runs[TIMM].cpu_seconds)
    print(f"  CPU time tltk / timm (whole process trees; less moved by other jobs than the wall clock): {cpu:.3f} "
          f"({ratio_range(runs[TLTK].cpu_seconds, runs[TIMM].cpu_seconds)})")
    ratio = median_ratio(seconds[TLTK], seconds[TIMM])
    tltk_accuracy, timm_accuracy = statistics.median(runs[TLTK].accuracy), statistics.median(runs[TIMM].accuracy)
    equal_or_better = tltk_accuracy >= timm_accuracy
    print(f"wall time tltk / timm: {ratio:.3f} ({ratio_range(seconds[TLTK], seconds[TIMM])}; goal: at most {GOAL}); "
          f"accuracy {'equal or better' if equal_or_better else 'WORSE'} ({tltk_accuracy:.4f} vs {timm_accuracy:.4f}); "
          f"goal {'met' if ratio <= GOAL and equal_or_better else 'not met'}")


if __name__ == "__main__":
    main()
