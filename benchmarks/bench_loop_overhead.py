"""Training-loop overhead: ``tltk.train.trainer.fit`` against a minimal hand-written PyTorch loop.

Same model (built from the same seed), same data (scikit-learn's digits, preprocessed
once into a TensorDataset so that both sides read identical tensors), batch size,
number of steps, optimizer (AdamW, lr 1e-3, weight decay 1e-4) and no schedule. The
hand-written loop is what a notebook does: shuffle, forward, cross-entropy, zero_grad,
backward, step. tltk's loop does that and more per step: a learning-rate schedule step,
the loss and accuracy read back, a metrics.jsonl row written, the reporter and
callbacks called. The overhead ratio compares both in the same memory layout and
precision (fp32, contiguous); a third case shows tltk with its defaults
(channels-last for conv nets), which is where tltk may be faster than the plain loop.

Run: ``python benchmarks/bench_loop_overhead.py`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _common import add_common_arguments, interleave, machine_line, median_ratio, ratio_range, set_threads

from tltk.data import ImageDataset, build_transforms, load_data
from tltk.model import ModelSpec, TransferModel, build_model
from tltk.strategies import build_strategy
from tltk.rundir import MetricsLog
from tltk.train.trainer import TrainConfig, fit


def preprocessed(data_spec: str, size: int) -> TensorDataset:
    data = load_data(data_spec)
    dataset = ImageDataset(data.train, build_transforms((size, size), [0.5], [0.5], "none", train=False), data.arrays)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return TensorDataset(images, torch.tensor([s.target for s in data.train]))


def fresh_model(backbone: str, num_classes: int) -> TransferModel:
    torch.manual_seed(0)
    return build_model(ModelSpec(backbone, "linear", num_classes, weights="none"))


def hand_written(model: nn.Module, data: TensorDataset, batch_size: int, epochs: int) -> None:
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for images, targets in loader:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="lenet5", help="a cheap network, where per-step overhead shows most")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    add_common_arguments(parser, repeats=9)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())

    data = preprocessed(args.data, args.input_size)
    classes = int(data.tensors[1].max()) + 1
    steps = args.epochs * -(-len(data) // args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:

        def tltk_fit(channels_last: str) -> None:
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, schedule="none", workers=0,
                                 precision="fp32", channels_last=channels_last, device="cpu")
            log = MetricsLog.open(Path(tmp))
            try:
                fit(fresh_model(args.backbone, classes), build_strategy("finetune"), data, None, config, log=log)
            finally:
                log.close()

        cases = {
            "hand-written loop": lambda: hand_written(fresh_model(args.backbone, classes), data, args.batch_size, args.epochs),
            "tltk fit, same layout": lambda: tltk_fit("off"),
            "tltk fit, defaults": lambda: tltk_fit("auto"),
        }
        seconds = interleave(cases, args.repeats)

    print(f"{args.backbone} at {args.input_size}px, {len(data)} images, batch {args.batch_size}, {steps} steps, AdamW, fp32")
    for name, values in seconds.items():
        middle = statistics.median(values)
        print(f"  {name:<24} median {middle:7.3f} s ({1000 * middle / steps:6.2f} ms/step)")
    hand = seconds["hand-written loop"]
    same, defaults = seconds["tltk fit, same layout"], seconds["tltk fit, defaults"]
    print(f"time ratio tltk / hand-written, same layout: {median_ratio(same, hand):.3f} "
          f"({ratio_range(same, hand)}; goal: at most 1.05)")
    print(f"time ratio tltk defaults / hand-written: {median_ratio(defaults, hand):.3f} ({ratio_range(defaults, hand)})")


if __name__ == "__main__":
    main()
