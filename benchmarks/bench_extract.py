"""Extraction throughput of ``tltk extract`` against a plain ``torch.no_grad()`` loop, in one run.

Both push the same images (scikit-learn's digits, test split, at the backbone's input
size) through the same model (AlexNet, seeded random weights, by default) with the
same DataLoader settings. The plain loop keeps the backbone's output (fc7 for AlexNet)
in a list; tltk's ``extract`` taps ``fc7``, streams every batch into a feature store on
disk and builds the store's index, all of which counts in its time. After one warm-up
batch, the two run back to back, each going first in every other repeat. The ratio is
tltk's images per second over the plain loop's: the median over the pairs of wall-clock
times (a pair shares whatever else the machine is doing), the ratio of median CPU times,
and the ratio of each side's fastest run (the run least disturbed by other processes).

Run: ``python benchmarks/bench_extract.py`` (about a minute on 2 quiet cores for AlexNet).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tltk.data import ImageDataset
from tltk.features import Loading, extract, load_source
from tltk.features.extract import select_data, source_transform
from tltk.runtime import make_loader


def plain_loop(model: torch.nn.Module, dataset: ImageDataset, batch_size: int) -> np.ndarray:
    """What a notebook does: eval mode, no_grad, forward each batch, keep the outputs."""
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=0, device=torch.device("cpu"))
    model.eval()
    outputs = []
    with torch.no_grad():
        for images, _ in loader:
            outputs.append(model(images).numpy())
    return np.concatenate(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="alexnet")
    parser.add_argument("--layer", default="fc7", help="the layer whose output the backbone's forward returns")
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", default="0,1,2,3,4", help="a subset keeps each run short, so that more repeats fit")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    source = load_source(args.backbone, weights="none", seed=0)
    classes = [c for c in args.classes.split(",") if c] or None
    selection = select_data(source, args.data, args.split, classes=classes)
    dataset = ImageDataset([s for _, s in selection.samples], source_transform(source), selection.splits.arrays)
    count = len(dataset)
    size = source.preprocessing["input_size"]
    print(f"{args.backbone} {args.layer}, {count} images of {args.data} ({args.split}) at {size[0]}x{size[1]}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")

    with torch.no_grad():  # warm-up: the first batch pays for memory and kernel set-up, for neither side
        source.model.eval()(torch.zeros(args.batch_size, 3, *size))
    seconds: dict[str, list[float]] = {"plain no_grad loop": [], "tltk extract": []}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in seconds}
    outputs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def run_plain() -> None:
            outputs["plain"] = plain_loop(source.model, dataset, args.batch_size)

        def run_tltk() -> None:
            store = extract(source, args.layer, Path(tmp) / "store", args.data, split=args.split, overwrite=True,
                            loading=Loading(batch_size=args.batch_size, device="cpu", workers=0), classes=classes)
            outputs["tltk"] = np.array(store.features())

        runs = {"plain no_grad loop": run_plain, "tltk extract": run_tltk}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # neither side always goes first
            for name in order:
                started, cpu_started = time.perf_counter(), time.process_time()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(time.process_time() - cpu_started)
            assert len(outputs["tltk"]) == count
            assert np.allclose(outputs["tltk"], outputs["plain"], rtol=1e-4, atol=1e-5)

    print(f"\n{'':<22}{'median s':>10}{'images/s':>10}{'CPU s':>8}   wall-clock runs (s)")
    for name, runs_s in seconds.items():
        print(f"{name:<22}{statistics.median(runs_s):>10.2f}{count / statistics.median(runs_s):>10.1f}"
              f"{statistics.median(cpu_seconds[name]):>8.2f}   " + ", ".join(f"{r:.2f}" for r in runs_s))
    pair_ratios = [p / t for p, t in zip(seconds["plain no_grad loop"], seconds["tltk extract"])]
    cpu_ratio = statistics.median(cpu_seconds["plain no_grad loop"]) / statistics.median(cpu_seconds["tltk extract"])
    best_ratio = min(seconds["plain no_grad loop"]) / min(seconds["tltk extract"])
    print(f"throughput ratio tltk / plain: {statistics.median(pair_ratios):.3f} (median of {len(pair_ratios)} "
          f"back-to-back pairs, wall clock); {cpu_ratio:.3f} (median CPU time); {best_ratio:.3f} (fastest run of each)")
    print("the stored features equal the plain loop's outputs (checked every repeat)")


if __name__ == "__main__":
    main()
