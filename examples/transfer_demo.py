"""Transfer learning on scikit-learn's bundled digits, offline, in a few minutes on a laptop CPU.

1. Source task: train ``simplecnn`` from scratch on digits 0-4.
2. Target task: digits 5-9 with only a few labelled images per class, three ways:
   the source backbone frozen (only a new head trains), the source backbone fine-tuned,
   and the same network trained from scratch.
3. A table of the three test accuracies on the same held-out target images.

Run with ``make demo`` or ``python examples/transfer_demo.py --out runs/demo``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tltk.progress import RichReporter
from tltk.train.finetune import DataOptions, FinetuneConfig, RunResult, finetune
from tltk.train.trainer import TrainConfig

SOURCE_CLASSES = ["0", "1", "2", "3", "4"]
TARGET_CLASSES = ["5", "6", "7", "8", "9"]
BACKBONE = "simplecnn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="Folder for the four run directories.")
    parser.add_argument("--per-class", type=int, default=10, help="Labelled target images per class.")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(stderr=True)
    out = Path(args.out)

    console.rule(f"source task: {BACKBONE} from scratch on digits {','.join(SOURCE_CLASSES)}")
    source = run(out / "source", console, classes=SOURCE_CLASSES, weights="none", strategy="finetune",
                 epochs=args.epochs, seed=args.seed)

    results: dict[str, RunResult] = {}
    variants = {
        "transfer, frozen backbone": ("freeze", str(source.out), 1e-2),
        "transfer, fine-tuned": ("finetune", str(source.out), 1e-3),
        "from scratch": ("finetune", "none", 1e-3),
    }
    for label, (strategy, weights, lr) in variants.items():
        console.rule(f"target task, {label}: digits {','.join(TARGET_CLASSES)}, {args.per_class} labelled per class")
        name = label.replace(",", "").replace(" ", "-")
        results[label] = run(out / name, console, classes=TARGET_CLASSES, weights=weights, strategy=strategy,
                             epochs=args.epochs, seed=args.seed, per_class=args.per_class, lr=lr)

    print_table(results, source, args.per_class)


def run(out: Path, console: Console, *, classes: list[str], weights: str, strategy: str, epochs: int,
        seed: int, per_class: int | None = None, lr: float = 1e-3) -> RunResult:
    config = FinetuneConfig(
        backbone=BACKBONE,
        data=DataOptions("builtin:digits", classes=classes, train_per_class=per_class, seed=seed),
        strategy=strategy,
        weights=weights,
        train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, seed=seed, workers=0),
    )
    return finetune(config, out, overwrite=True, reporter=RichReporter(console))


def print_table(results: dict[str, RunResult], source: RunResult, per_class: int) -> None:
    table = Table(title=f"digits 5-9 with {per_class} labelled images per class: test accuracy")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test images", justify="right")
    table.add_column("run directory")
    for label, result in results.items():
        test = result.summary["test"]
        table.add_row(label, f"{test['accuracy']:.3f}", str(test["n"]), str(result.out))
    Console().print(table)
    print(f"source task (digits 0-4) test accuracy: {source.summary['test']['accuracy']:.3f}")
    print(json.dumps({label: r.summary["test"]["accuracy"] for label, r in results.items()}))


if __name__ == "__main__":
    main()
