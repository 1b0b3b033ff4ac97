"""Transfer learning on scikit-learn's bundled digits, offline, in a few minutes on a laptop CPU.

The 1,797 digit images are split in two halves that share no image, written as class
folders of PNGs (what ``--data folder:PATH`` reads):

1. Source task, on one half: ``simplecnn`` trained from scratch to read the digit (0-9).
2. Target task, on the other half: a new question about new images, "is the digit even
   or odd?", with only a few labelled images per class, learnt three ways: the source
   backbone frozen (only a new head trains), the source backbone fine-tuned, and the
   same network from scratch.
3. A table of the three test accuracies on the same held-out target images.
4. The report of the three target runs (``tltk report``): one HTML page with their ablation
   table, curves overlaid, and each run's figures, mistakes and filters; its path is printed last.

The demo's table is the same on every x86 machine: it trains in fp32 by default (with
``--precision auto`` a CPU with native bf16 trains in bf16, and the figures move by a few
test images: seed 0 gave 0.867 / 0.917 / 0.756 against 0.872 / 0.917 / 0.744), and it
keeps torch to its AVX2 kernels even where the CPU has AVX-512 (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, set before torch loads unless already set), since wider vectors
sum in another order: the fine-tuned run gave 0.894 with AVX-512 kernels in fp32.

A network that has learnt to tell the ten digits apart has features in which parity is
one linear boundary away; from five images of each class alone, the five shapes that
make up "even" are not there to be learnt.

Run with ``make demo`` or ``python examples/transfer_demo.py --out runs/demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

if platform.machine() in ("x86_64", "AMD64"):  # before torch loads: it reads these once
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from tltk.progress import RichReporter
from tltk.reporting import report
from tltk.train.finetune import DataOptions, FinetuneConfig, RunResult, finetune
from tltk.train.trainer import TrainConfig

BACKBONE = "simplecnn"
TARGET_CLASSES = ("even", "odd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="Folder for the data and the four run directories.")
    parser.add_argument("--per-class", type=int, default=5, help="Labelled target images per class.")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                        help="fp32 (default) gives the same table on every CPU; auto is bf16 where the CPU has it.")
    args = parser.parse_args()
    console = Console(stderr=True)
    out = Path(args.out)
    source_data, target_data = write_digit_folders(out / "data", args.seed)

    console.rule(f"source task: {BACKBONE} from scratch, which digit (0-9), on {source_data}")
    source = run(out / "source", console, data=source_data, weights="none", strategy="finetune",
                 epochs=args.epochs, seed=args.seed, precision=args.precision)

    results: dict[str, RunResult] = {}
    variants = {
        "transfer, frozen backbone": ("freeze", str(source.out), 1e-2),
        "transfer, fine-tuned": ("finetune", str(source.out), 1e-3),
        "from scratch": ("finetune", "none", 1e-3),
    }
    for label, (strategy, weights, lr) in variants.items():
        console.rule(f"target task, {label}: even or odd, {args.per_class} labelled images per class")
        name = label.replace(",", "").replace(" ", "-")
        results[label] = run(out / name, console, data=target_data, weights=weights, strategy=strategy,
                             epochs=args.epochs, seed=args.seed, per_class=args.per_class, lr=lr,
                             precision=args.precision)

    print_table(results, source, args.per_class)
    console.rule("report: frozen vs fine-tuned vs from scratch")
    written = report([result.out for result in results.values()], out / "report.html")
    print(f"report: {written.html}")


def write_digit_folders(root: Path, seed: int) -> tuple[Path, Path]:
    """Two disjoint halves of the digits as PNG class folders: ``source/0``..``source/9`` and
    ``target/even``, ``target/odd``. Pixels as ``builtin:digits`` gives them (0..16 -> 0..255).

    The folders are rewritten on every run, so a different ``seed`` never mixes halves.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    half = len(order) // 2
    source, target = root / "source", root / "target"
    shutil.rmtree(root, ignore_errors=True)
    for index in order[:half]:
        _write_png(source / str(digits.target[index]), index, images[index])
    for index in order[half:]:
        _write_png(target / TARGET_CLASSES[digits.target[index] % 2], index, images[index])
    return source, target


def _write_png(folder: Path, index: int, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"digit{index:04d}.png")


def run(out: Path, console: Console, *, data: Path, weights: str, strategy: str, epochs: int,
        seed: int, per_class: int | None = None, lr: float = 1e-3, precision: str = "fp32") -> RunResult:
    config = FinetuneConfig(
        backbone=BACKBONE,
        data=DataOptions(f"folder:{data}", train_per_class=per_class, seed=seed),
        strategy=strategy,
        weights=weights,
        train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, seed=seed, workers=0, precision=precision),
    )
    return finetune(config, out, overwrite=True, reporter=RichReporter(console))


def print_table(results: dict[str, RunResult], source: RunResult, per_class: int) -> None:
    precision = source.summary["precision"]
    table = Table(title=f"even or odd, from {per_class} labelled images per class: test accuracy ({precision})")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test images", justify="right")
    table.add_column("run directory")
    for label, result in results.items():
        test = result.summary["test"]
        table.add_row(label, f"{test['accuracy']:.3f}", str(test["n"]), str(result.out))
    Console().print(table)
    print(f"source task (which digit, 0-9) test accuracy: {source.summary['test']['accuracy']:.3f}")
    print(json.dumps({label: r.summary["test"]["accuracy"] for label, r in results.items()}))


if __name__ == "__main__":
    main()
