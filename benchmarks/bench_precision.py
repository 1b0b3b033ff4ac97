"""bf16 against fp32: training and feature-extraction throughput, and (``--accuracy``) test accuracy.

Throughput: the same ResNet-18 (seeded random weights) on the same batches of random
64x64 images, through tltk's own code paths: ``fit`` for a few optimizer steps
(fine-tuning the whole network) and the frozen-backbone feature extraction that
``--freeze`` caches (``FeatureCache.extract``), once under ``torch.autocast`` with
bfloat16 and once in fp32, interleaved. The ratio is bf16 images/s over fp32 images/s:
above 1 where the CPU or GPU computes bf16 natively, below 1 where it is emulated, which
is why ``--precision auto`` picks bf16 only on the former.

Accuracy (``--accuracy``): one short real run, LeNet-5 from scratch on scikit-learn's
digits, trained and evaluated twice with everything equal but ``--precision``; the two
test accuracies are printed side by side.

Run: ``python benchmarks/bench_precision.py`` (about 2 minutes on 2 cores without native
bf16; less with it) and ``python benchmarks/bench_precision.py --accuracy``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from _common import add_common_arguments, interleave, machine_line, median_ratio, print_speeds, ratio_range, set_threads

from tltk.model import ModelSpec, build_model
from tltk.strategies import build_strategy
from tltk.train.cache import FeatureCache
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig, fit
from tltk.runtime import autocast, batch_to, make_loader, precision_name, resolve_precision


def throughput(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    train_images = args.batch_size * args.steps
    images = torch.randn(max(train_images, args.extract_images), 3, args.input_size, args.input_size, generator=generator)
    targets = torch.randint(0, 10, (len(images),), generator=generator)
    train_data = TensorDataset(images[:train_images], targets[:train_images])
    extract_data = TensorDataset(images[:args.extract_images], targets[:args.extract_images])

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(ModelSpec(args.backbone, "linear", 10, weights="none"))

    frozen = model()
    build_strategy("freeze").prepare(frozen)
    frozen.to(memory_format=torch.channels_last)

    def train(precision: str) -> None:
        config = TrainConfig(epochs=1, batch_size=args.batch_size, workers=0, device="cpu", precision=precision, schedule="none")
        fit(model(), build_strategy("finetune"), train_data, None, config)

    def extract(precision: str) -> None:
        dtype = resolve_precision(precision, device)
        loader = make_loader(extract_data, batch_size=args.batch_size, shuffle=False, workers=0, device=device)
        with FeatureCache(len(extract_data), 2**40) as store:
            store.extract(frozen, loader, len(extract_data), lambda x: batch_to(x, device, True), lambda: autocast(device, dtype))

    cases = {"train fp32": lambda: train("fp32"), "train bf16": lambda: train("bf16"),
             "extract fp32": lambda: extract("fp32"), "extract bf16": lambda: extract("bf16")}
    seconds = interleave(cases, args.repeats)
    print(f"{args.backbone} at {args.input_size}px, batch {args.batch_size}: training {args.steps} steps "
          f"({train_images} images), extraction of {args.extract_images} images")
    print_speeds({k: v for k, v in seconds.items() if k.startswith("train")}, train_images)
    print_speeds({k: v for k, v in seconds.items() if k.startswith("extract")}, args.extract_images)
    for what in ("train", "extract"):
        fp32, bf16 = seconds[f"{what} fp32"], seconds[f"{what} bf16"]
        print(f"{what}: bf16 / fp32 images/s {median_ratio(fp32, bf16):.2f}x ({ratio_range(fp32, bf16)})")
    print(f"--precision auto on this machine: {precision_name(resolve_precision('auto', device))}")


def accuracy(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            config = FinetuneConfig(
                backbone="lenet5", weights="none", head="linear", data=DataOptions("builtin:digits"),
                train=TrainConfig(epochs=args.epochs, batch_size=64, precision=precision, seed=0),
            )
            results[precision] = finetune(config, Path(tmp) / precision).summary
    print(f"lenet5 from scratch on builtin:digits, {args.epochs} epochs, batch 64, AdamW lr 1e-3, cosine, seed 0")
    print(f"  {'precision':<10} {'test accuracy':>14} {'final val loss':>15} {'seconds':>9}")
    for precision, summary in results.items():
        print(f"  {precision:<10} {summary['test']['accuracy']:>14.4f} {summary['final']['val_loss']:>15.4f} "
              f"{summary['seconds']:>9.1f}")
    print(f"  test images: {results['fp32']['test']['n']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="the real-data accuracy comparison instead of throughput")
    parser.add_argument("--epochs", type=int, default=10, help="--accuracy: epochs of the short run [%(default)s]")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training case")
    parser.add_argument("--extract-images", type=int, default=128)
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())
    accuracy(args) if args.accuracy else throughput(args)


if __name__ == "__main__":
    main()
