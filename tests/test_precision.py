"""Precision, memory layout, loader and inference defaults: what makes the common case fast
without flags, and the promise that none of it changes the figures.

``--precision auto`` is judged on faked CPU/GPU capabilities, so the tests mean the same
on every machine; bf16 runs themselves are real (autocast on the CPU works everywhere,
natively or emulated). Evaluation and prediction stream: their tallies are compared with
the whole-array reference on random scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import tltk.runtime as runtime
from tltk.errors import TltkError
from tltk.evaluation import ClassificationTally
from tltk.metrics import classification_report
from tltk.model import ModelSpec, build_model
from tltk.run import iter_predictions, predict
from tltk.runtime import resolve_precision
from tltk.strategies import build_strategy
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig, fit

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- --precision ----------------------------------------------------------------------


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_the_cpu_is_bf16_exactly_where_the_cpu_has_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) is expected


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cuda_is_bf16_on_gpus_with_native_bf16_else_fp32(monkeypatch, native, expected):
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", CUDA) is expected
    assert asked == [False]  # emulated bf16 does not count


def test_explicit_precisions_are_taken_as_given_and_fp16_needs_cuda():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp16", CUDA) is torch.float16
    with pytest.raises(TltkError, match="^precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("capabilities, flags, native", [
    ({"avx512_bf16": True, "amx_bf16": False}, set(), True),
    ({"avx512_bf16": False, "amx_bf16": True}, set(), True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, {"avx2", "fma"}, False),
    ({}, {"fp", "asimd", "bf16"}, True),  # an Arm CPU: torch reports no x86 capabilities
    ({}, {"fp", "asimd"}, False),
])
def test_native_bf16_on_the_cpu_is_read_from_its_capability_flags(monkeypatch, capabilities, flags, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert runtime.cpu_has_native_bf16() is native


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm(tmp_path: Path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n")
    assert {"avx512_bf16", "amx_bf16"} <= runtime.cpu_flags(x86)
    assert "bf16" in runtime.cpu_flags(arm)
    assert runtime.cpu_flags(tmp_path / "missing") == set()


def tiny_run(tmp_path: Path, precision: str) -> dict[str, Any]:
    config = FinetuneConfig(
        backbone="lenet5", weights="none", head="linear",
        data=DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=10),
        train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", precision=precision),
    )
    return finetune(config, tmp_path / precision).summary


def test_a_run_records_what_its_precision_resolved_to(tmp_path, monkeypatch):
    bf16 = tiny_run(tmp_path, "bf16")
    assert bf16["precision"] == "bf16" and 0.0 <= bf16["test"]["accuracy"] <= 1.0
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        config = TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", precision="auto")
        assert fit(model, build_strategy("finetune"), data, None, config).precision == expected


# --- channels-last --------------------------------------------------------------------


def test_channels_last_is_automatic_for_conv_backbones_only():
    conv = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    recurrent = build_model(ModelSpec("gru", "linear", 3, weights="none"))
    assert runtime.use_channels_last("auto", conv) and not runtime.use_channels_last("auto", recurrent)
    assert runtime.use_channels_last("on", recurrent) and not runtime.use_channels_last("off", conv)


def fit_images(channels_last: str) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", "mlp", 3, {"hidden": 16}, "none"))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 3, (32,), generator=g))
    config = TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu", precision="fp32", channels_last=channels_last)
    return model, fit(model, build_strategy("finetune"), data, data, config)


def test_channels_last_training_gives_the_same_figures_and_leaves_weights_contiguous():
    model_cl, with_cl = fit_images("on")
    model_plain, plain = fit_images("off")
    for a, b in zip(with_cl.history, plain.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert all(p.is_contiguous() for p in model_cl.parameters())
    conv = model_cl.backbone.net.features[0].weight
    assert conv.dim() == 4 and conv.is_contiguous(memory_format=torch.contiguous_format)


def test_compile_option_compiles_the_module_that_trains(monkeypatch):
    compiled: list[torch.nn.Module] = []

    def spy(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    fit(model, build_strategy("finetune"), data, None, TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", compile=True))
    fit(model, build_strategy("freeze"), data, None, TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", compile=True))
    assert compiled[0] is model  # the whole network on images
    assert compiled[1].model is model  # the head on cached features
    fit(model, build_strategy("finetune"), data, None, TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"))
    assert len(compiled) == 2


# --- loader defaults ------------------------------------------------------------------


def test_workers_default_to_the_cpu_count_once_the_data_is_large_enough(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 6)
    assert runtime.default_workers(100_000) == 6
    assert runtime.default_workers(runtime.MIN_SAMPLES_FOR_WORKERS - 1) == 0
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 64)
    assert runtime.default_workers(100_000) == runtime.MAX_DEFAULT_WORKERS


def test_loaders_pin_memory_on_cuda_only_and_keep_workers_alive():
    data = TensorDataset(torch.zeros(4, 1))
    on_cpu = runtime.make_loader(data, batch_size=2, shuffle=False, workers=2, device=CPU)
    on_cuda = runtime.make_loader(data, batch_size=2, shuffle=False, workers=0, device=CUDA)
    assert not on_cpu.pin_memory and on_cuda.pin_memory
    assert on_cpu.persistent_workers and not on_cuda.persistent_workers


# --- streaming evaluation and prediction ----------------------------------------------


def random_batches(num_classes: int, sizes: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for size in sizes:
        scores = rng.integers(0, 4, size=(size, num_classes)).astype(np.float32)  # coarse: many ties
        batches.append((rng.integers(0, num_classes, size=size), scores))
    return batches


@pytest.mark.parametrize("num_classes", [3, 8])
def test_streamed_report_equals_the_report_of_the_whole_arrays(num_classes):
    batches = random_batches(num_classes, [7, 16, 1, 16, 5])
    tally = ClassificationTally(num_classes)
    for targets, scores in batches:
        tally.add(targets, scores)
    names = [f"c{i}" for i in range(num_classes)]
    whole = classification_report(np.concatenate([t for t, _ in batches]), np.concatenate([s for _, s in batches]), names)
    streamed = tally.report(names)
    assert list(streamed) == list(whole)
    for key, value in whole.items():
        assert streamed[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert ("top5_accuracy" in streamed) is (num_classes > 5)


def test_evaluation_holds_a_confusion_matrix_not_the_scores():
    tally = ClassificationTally(10)
    for targets, scores in random_batches(10, [64] * 20):
        tally.add(targets, scores)
    held = {name: value for name, value in vars(tally).items() if isinstance(value, np.ndarray)}
    assert tally.n == 64 * 20
    assert sum(v.nbytes for v in held.values()) == 10 * 10 * 8


def test_iter_predictions_streams_the_rows_predict_returns(tmp_path):
    config = FinetuneConfig(
        backbone="lenet5", weights="none", head="linear",
        data=DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=10),
        train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"),
    )
    run = finetune(config, tmp_path / "run").out
    whole = predict(run, device="cpu", batch_size=16)
    parts = list(iter_predictions(run, device="cpu", batch_size=16))
    assert [len(p) for p in parts[:-1]] == [16] * (len(parts) - 1)
    assert sum(len(p) for p in parts) == len(whole) > 16
    assert [i for p in parts for i in p.ids] == whole.ids
    np.testing.assert_allclose(np.concatenate([p.probabilities for p in parts]), whole.probabilities, rtol=1e-6)
