"""CPU inference throughput of an exported ONNX model in onnxruntime against the PyTorch model.

What ``tltk export --format onnx`` gains (or costs) at serving time: the same model
(ResNet-18 by default, seeded random weights, 10 classes, softmax included, as tltk
exports it) over the same preprocessed images in the same batches, fp32, with the same
number of threads on both sides.

- pytorch: the exported module itself in eager mode under ``torch.inference_mode()``.
- onnxruntime: the file ``tltk.deploy`` writes (``torch.onnx.export`` with dynamo), in an
  ``InferenceSession`` on the CPU provider with ``intra_op_num_threads`` set to the same
  thread count.

Images are decoded and preprocessed once, before timing: the figure is the engines', not
JPEG decoding's (which both would share). Each repeat runs both cases once, the first
rotating; the ratio is the median of the per-repeat ratios of images per second.

Run: ``python benchmarks/bench_onnx.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import add_common_arguments, interleave, machine_line, median_ratio, print_speeds, ratio_range, set_threads

from tltk.deploy.card import ModelCard
from tltk.deploy.files import ProbabilityModel, write_onnx
from tltk.model import ModelSpec, build_model

CLASSES = [f"class{i}" for i in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    add_common_arguments(parser, repeats=7)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())
    import onnxruntime

    torch.manual_seed(0)
    model = build_model(ModelSpec(args.backbone, "linear", len(CLASSES), weights="none")).eval()
    card = ModelCard(CLASSES, model.preprocessing.resized(args.input_size), "multiclass", args.backbone)
    module = ProbabilityModel(model, card.task).eval()
    images = torch.rand(args.images, 3, args.input_size, args.input_size)
    batches = list(images.split(args.batch_size))

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(module, card, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def pytorch() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([module(batch).numpy() for batch in batches])

    def onnx_runtime() -> np.ndarray:
        return np.concatenate([session.run(None, {"images": batch.numpy()})[0] for batch in batches])

    difference = float(np.abs(pytorch() - onnx_runtime()).max())
    seconds = interleave({"pytorch (eager, inference_mode)": pytorch, "onnxruntime (CPU provider)": onnx_runtime},
                         args.repeats)
    print(f"{args.backbone} at {args.input_size}px, {args.images} images, batch {args.batch_size}, fp32, "
          f"{args.threads} thread(s); max probability difference {difference:.2g}")
    print_speeds(seconds, args.images)
    torch_times, ort_times = seconds["pytorch (eager, inference_mode)"], seconds["onnxruntime (CPU provider)"]
    print(f"images/s ratio onnxruntime / pytorch: {median_ratio(torch_times, ort_times):.3f} "
          f"({ratio_range(torch_times, ort_times)})")


if __name__ == "__main__":
    main()
