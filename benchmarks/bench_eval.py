"""Evaluation and prediction throughput against a plain ``torch.no_grad()`` loop.

The same model (ResNet-18, seeded random weights, 10 classes) runs over the same JPEG
folder (made on the first run, shared with bench_loading.py) at the same input size and
batch size, with the same DataLoader workers (tltk's default for this many images, 0).

- plain loop: what a notebook does: ``model.eval()``, ``torch.no_grad()``, a DataLoader
  over the images, argmax of each batch's logits kept in a list.
- tltk evaluate: ``evaluate_model`` on the listed samples, producing the full report
  (accuracy, per-class accuracy, confusion matrix, top-5), with its defaults:
  ``inference_mode``, channels-last for conv nets, figures tallied per batch.
- tltk predict: ``tltk.predict`` on the folder as unlabelled images, end to end: listing
  the folder, checking that every image decodes (a prediction file needs a row for
  each), then the probabilities of every image in one array. The plain loop lists the
  folder too (a sorted glob), but checks nothing.

Run: ``python benchmarks/bench_eval.py`` (about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import (
    add_common_arguments,
    interleave,
    machine_line,
    median_ratio,
    print_speeds,
    ratio_range,
    set_threads,
    write_jpeg_folder,
)
from torch.utils.data import DataLoader

from tltk.data import ImageDataset, Sample
from tltk.evaluation import evaluate_model
from tltk.model import ModelSpec, build_model
from tltk.run import Run, predict
from tltk.train.trainer import TrainConfig

CLASSES = [f"class{i}" for i in range(10)]


def flat_folder(root: Path, images: int) -> Path:
    """The JPEGs in one folder without class subfolders (a competition's test/ folder), as links."""
    flat = root.parent / f"{root.name}-flat-{images}"
    if not flat.exists():
        flat.mkdir()
        for path in sorted(root.glob("class*/*.jpg"))[:images]:
            (flat / f"{path.parent.name}_{path.name}").symlink_to(path)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folder", default=None, help="where the JPEGs are made [a folder in the system's temp dir]")
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())

    root = write_jpeg_folder(Path(args.folder or Path(tempfile.gettempdir()) / "tltk-bench-jpegs"), 4, args.images // 4)
    flat = flat_folder(root, args.images)
    torch.manual_seed(0)
    model = build_model(ModelSpec(args.backbone, "linear", len(CLASSES), weights="none")).eval()
    pre = model.preprocessing.resized(args.input_size)
    transform = pre.eval_transform()
    train = TrainConfig(batch_size=args.batch_size, device="cpu")
    run = Run(Path(tempfile.gettempdir()), model, {"train": train.to_dict(), "class_names": CLASSES,
                                                   "preprocessing": pre.to_dict()})
    files = sorted(flat.glob("*.jpg"))
    samples = [Sample(str(p), i % len(CLASSES), p.name) for i, p in enumerate(files)]

    def plain_loop() -> None:
        listed = [Sample(str(p), 0, p.name) for p in sorted(flat.glob("*.jpg"))]
        loader = DataLoader(ImageDataset(listed, transform), batch_size=args.batch_size)
        model.eval()
        predicted = []
        with torch.no_grad():
            for images, _ in loader:
                predicted.append(model(images).argmax(1))
        assert sum(len(p) for p in predicted) == len(files)

    def tltk_evaluate() -> None:
        report = evaluate_model(model, ImageDataset(samples, transform), CLASSES, train.inference(), "multiclass")
        assert report["n"] == len(files)

    def tltk_predict() -> None:
        assert len(predict(run, str(flat), device="cpu", batch_size=args.batch_size)) == len(files)

    cases = {"plain no_grad loop": plain_loop, "tltk evaluate": tltk_evaluate, "tltk predict (end to end)": tltk_predict}
    seconds = interleave(cases, args.repeats)

    print(f"{args.backbone} at {args.input_size}px, {len(files)} JPEGs of 320x240, batch {args.batch_size}, workers 0")
    print_speeds(seconds, len(files))
    plain = seconds["plain no_grad loop"]
    for name in ("tltk evaluate", "tltk predict (end to end)"):
        print(f"images/s ratio {name} / plain loop: {median_ratio(plain, seconds[name]):.3f} "
              f"({ratio_range(plain, seconds[name])}; goal: at least 0.95)")


if __name__ == "__main__":
    main()
