"""Data loading: images per second of tltk's loader against torchvision ImageFolder + DataLoader.

One folder of JPEGs (class subfolders, 320x240 photos-like images, made on the first run
under the system's temporary directory), read whole, in shuffled order, batch 64, into
normalised float tensors at the input size. torchvision's side is the classic recipe:
``ImageFolder`` with ``Resize((s, s))``, ``ToTensor()`` and ``Normalize`` on PIL images,
and a ``DataLoader`` with the same number of workers and its own defaults. tltk's side
is ``load_data("folder:...")`` (listing and the decode check happen once, before timing),
``ImageDataset`` with the deterministic transform, and ``make_loader``. Each loader is
built once and read once per repeat, as an epoch would read it; tltk's workers stay
alive between epochs (its default), torchvision's restart (its default).

The same comparison in one process (workers 0) isolates the per-image work: decoding,
EXIF orientation, conversion to RGB, resizing and normalising.

Run: ``python benchmarks/bench_loading.py`` (about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

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

from tltk.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from tltk.data import ImageDataset, build_transforms, load_data
from tltk.runtime import make_loader


def torchvision_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    transform = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch_size, shuffle=True, num_workers=workers)


def tltk_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    data = load_data(f"folder:{root}", val_split=0.0, test_split=0.0)
    transform = build_transforms((size, size), IMAGENET_MEAN, IMAGENET_STD, "none", train=True)
    return make_loader(ImageDataset(data.train, transform), batch_size=batch_size, shuffle=True, workers=workers,
                       device=torch.device("cpu"))


def read_all(loader: DataLoader) -> int:
    return sum(len(images) for images, _ in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="JPEGs in the folder (4 classes)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both [%(default)s]")
    parser.add_argument("--folder", default=None, help="where the JPEGs are made [a folder in the system's temp dir]")
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())

    root = Path(args.folder or Path(tempfile.gettempdir()) / "tltk-bench-jpegs")
    write_jpeg_folder(root, classes=4, per_class=args.images // 4)
    count = 4 * (args.images // 4)
    loaders = {
        f"torchvision ImageFolder, {args.workers} workers": torchvision_loader(root, args.input_size, args.batch_size, args.workers),
        f"tltk loader, {args.workers} workers": tltk_loader(root, args.input_size, args.batch_size, args.workers),
        "torchvision ImageFolder, in-process": torchvision_loader(root, args.input_size, args.batch_size, 0),
        "tltk loader, in-process": tltk_loader(root, args.input_size, args.batch_size, 0),
    }
    for name, loader in loaders.items():
        assert read_all(loader) == count, name
    seconds = interleave({name: (lambda loader=loader: read_all(loader)) for name, loader in loaders.items()}, args.repeats,
                         warmup=False)

    print(f"{count} JPEGs of 320x240 to {args.input_size}x{args.input_size}, batch {args.batch_size}, shuffled")
    print_speeds(seconds, count)
    names = list(seconds)
    for baseline, ours in ((names[0], names[1]), (names[2], names[3])):
        print(f"images/s ratio {ours} / {baseline}: {median_ratio(seconds[baseline], seconds[ours]):.3f} "
              f"({ratio_range(seconds[baseline], seconds[ours])}; goal: at least 1.0)")


if __name__ == "__main__":
    main()
