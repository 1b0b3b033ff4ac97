"""The decoded-image cache: the same batches as the loader, reused by later runs, resumed to
the bit; and intra-op threads chosen together with the loader's workers.

Images are small noise JPEGs and PNGs of varied sizes written on the fly (decoding and
resizing are real), or scikit-learn's digits; runs are a LeNet-5 for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from tltk import runtime
from tltk.cli import main
from tltk.data import ImageDataset, build_transforms, load_data
from tltk.data.augment import BatchAugment, SeededAugment
from tltk.distributed import EpochOrder
from tltk.errors import SettingError
from tltk.runtime import make_loader, plan_cpus
from tltk.train import image_cache
from tltk.train.callbacks import Callback
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


def write_noise_folder(root: Path, per_class: int = 7) -> Path:
    """Two classes of noise images, JPEG and PNG, sizes 20-35 px, so resizing is exercised."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20 + 2 * i, 35 - i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def folder_set(root: Path, augment: str, size: int = 24) -> ImageDataset:
    data = load_data(f"folder:{root}", val_split=0.0, test_split=0.0)
    return ImageDataset(data.train, build_transforms((size, size), MEAN, STD, augment, train=True))


class Recorder:
    """A Reporter that keeps the messages the loop sends."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def start(self, total_steps: int) -> None: ...
    def step(self, row) -> None: ...
    def epoch(self, row) -> None: ...
    def finish(self) -> None: ...

    def message(self, text: str) -> None:
        self.messages.append(text)


# --- the same batches ------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["none", "light", "standard"])
def test_cached_batches_are_the_loaders_batches_pixel_for_pixel(tmp_path: Path, augment: str) -> None:
    """Same pixels, same labels, same order, epoch after epoch, for every preset."""
    dataset = folder_set(write_noise_folder(tmp_path / "images"), augment)
    loader = make_loader(dataset, batch_size=5, shuffle=True, workers=0, device=torch.device("cpu"), seed=3)
    batch_form = image_cache.batch_form(dataset.transform)
    decoded = image_cache.open_images(dataset, batch_form, budget_bytes=2**30, root=tmp_path / "cache")
    assert isinstance(decoded, image_cache.DecodedImages)
    order = EpochOrder(len(dataset), seed=3, sample_seeds=batch_form.random, batch_size=5)  # as the trainer makes it
    cached = image_cache.DecodedBatches(decoded, batch_form, 5, order)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        order.set_epoch(epoch)
        pairs = list(zip(loader, cached, strict=True))
        assert len(pairs) == 3
        for (images, labels), (cached_images, cached_labels) in pairs:
            assert torch.equal(images, cached_images)
            assert torch.equal(labels, cached_labels)
    if augment != "none":
        first_epoch = [images for images, _ in cached]
        order.set_epoch(0)
        assert not torch.equal(first_epoch[0], next(iter(cached))[0]), "another epoch augments anew"


def test_multilabel_targets_come_as_the_loaders_float_rows(tmp_path: Path) -> None:
    from tltk.data.samples import Sample

    dataset = folder_set(write_noise_folder(tmp_path / "images", per_class=2), "light")
    dataset.samples = [Sample(s.source, (1, 0, -1) if i % 2 else (0, 1, 1), s.id) for i, s in enumerate(dataset.samples)]
    batch_form = image_cache.batch_form(dataset.transform)
    decoded = image_cache.open_images(dataset, batch_form, 2**30, root=tmp_path / "cache")
    order = EpochOrder(len(dataset), seed=0, sample_seeds=True, batch_size=3)  # as the trainer makes it
    loader = make_loader(dataset, batch_size=3, shuffle=True, workers=0, device=torch.device("cpu"), seed=0)
    for (_, labels), (_, cached) in zip(loader, image_cache.DecodedBatches(decoded, batch_form, 3, order), strict=True):
        assert cached.dtype == labels.dtype == torch.float32 and torch.equal(cached, labels)


def test_without_augmentation_the_cache_gives_fixed_preprocessings_exact_values(tmp_path: Path) -> None:
    """The default (--augment none) trains on exactly what it did before the cache existed."""
    dataset = folder_set(write_noise_folder(tmp_path / "images"), "none")
    batch_form = image_cache.batch_form(dataset.transform)
    stored = torch.stack([batch_form.decode(dataset.image_of(s)) for s in dataset.samples])
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.equal(batch_form(stored), expected)


def test_standard_crop_of_the_whole_image_unflipped_and_unrotated_is_the_image() -> None:
    """The geometry: all of the area, aspect 1, no flip, angle 0 samples every pixel centre;
    with the flip draw, the image mirrored. Colour factors at 1 change nothing."""
    augment = BatchAugment((6, 6), (0.0,) * 3, (1.0,) * 3, "standard")
    image = torch.randint(0, 256, (1, 3, 6, 6), dtype=torch.uint8).float()
    draws = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    grid = augment._crop_grid(draws, 6, 6)
    same = torch.nn.functional.grid_sample(image, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(same, image, atol=1e-3, rtol=0)
    draws[0, 4] = 0.1  # flip
    mirrored = torch.nn.functional.grid_sample(image, augment._crop_grid(draws, 6, 6), align_corners=False)
    torch.testing.assert_close(mirrored, image.flip(-1), atol=1e-3, rtol=0)


def test_light_is_a_reflect_padded_crop_and_a_flip() -> None:
    """Each output equals cropping the reflect-padded image at the drawn offset (mirrored
    when the flip draw says so)."""
    augment = BatchAugment((8, 8), (0.0,) * 3, (1.0,) * 3, "light")
    stored = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    draws = torch.tensor([[0.0, 0.0, 0.9], [0.99, 0.5, 0.9], [0.3, 0.7, 0.1], [0.5, 0.5, 0.9]], dtype=torch.float64)
    out = augment._light(stored, draws)
    padded = torch.nn.functional.pad(stored.float(), (1, 1, 1, 1), mode="reflect")
    for i, (top, left, flip) in enumerate([(0, 0, False), (2, 1, False), (0, 2, True), (1, 1, False)]):
        crop = padded[i, :, top:top + 8, left:left + 8]
        assert torch.equal(out[i].float(), crop.flip(-1) if flip else crop), i


def test_one_image_with_its_seed_is_the_same_in_any_batch() -> None:
    """SeededAugment (the loader's transform) is BatchAugment on a batch of one."""
    augment = BatchAugment((16, 16), MEAN, STD, "standard")
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    stored = torch.stack([augment.decode(image) for image in images])
    batch = augment(stored, list(range(6)))
    for i in range(6):
        assert torch.equal(SeededAugment(augment)(images[i], i), batch[i])


# --- kept for later runs ---------------------------------------------------------------


def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = BatchAugment.decode

    def counting(self, image):
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(BatchAugment, "decode", counting)
    return calls


def test_a_second_run_reads_the_decoded_images_back_and_an_edited_image_decodes_again(tmp_path, monkeypatch):
    root = write_noise_folder(tmp_path / "images")
    calls = count_decodes(monkeypatch)
    dataset = folder_set(root, "light")
    batch_form = image_cache.batch_form(dataset.transform)
    first = image_cache.open_images(dataset, batch_form, 2**30, root=tmp_path / "cache")
    assert len(calls) == 14 and not first.reused
    second = image_cache.open_images(folder_set(root, "light"), batch_form, 2**30, root=tmp_path / "cache")
    assert len(calls) == 14 and second.reused and np.array_equal(first.pixels, second.pixels)
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(root / "a" / "0.png")
    third = image_cache.open_images(folder_set(root, "light"), batch_form, 2**30, root=tmp_path / "cache")
    assert len(calls) == 28 and not third.reused and third.pixels[0].max() == 0
    assert not list((tmp_path / "cache").glob(".decoding-*")), "no temporary file is left behind"


def test_over_the_memory_budget_the_images_are_memory_mapped_and_give_the_same_batches(tmp_path: Path) -> None:
    dataset = folder_set(write_noise_folder(tmp_path / "images"), "standard")
    batch_form = image_cache.batch_form(dataset.transform)
    in_memory = image_cache.open_images(dataset, batch_form, 2**30, root=tmp_path / "cache")
    mapped = image_cache.open_images(dataset, batch_form, 0, root=tmp_path / "cache")
    assert (in_memory.where, mapped.where) == ("memory", "disk")
    assert isinstance(mapped.pixels, np.memmap)
    batches = [list(image_cache.DecodedBatches(d, batch_form, 4, EpochOrder(14, seed=1, sample_seeds=True)))
               for d in (in_memory, mapped)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*batches))


def test_a_dataset_too_large_for_memory_and_disk_says_why_in_one_line_and_trains_from_the_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("TLTK_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(image_cache, "_disk_room", lambda folder: 1000)
    reporter = Recorder()
    result = finetune(small_config(augment="light", cache_mem="0"), tmp_path / "run", reporter=reporter)
    refusals = [m for m in reporter.messages if m.startswith("not caching the decoded training images")]
    assert len(refusals) == 1 and "\n" not in refusals[0]
    assert "--cache-mem" in refusals[0] and "decoded every epoch" in refusals[0]
    assert result.summary["image_cache"] is None


# --- training ---------------------------------------------------------------------------


def small_config(**train: object) -> FinetuneConfig:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=12)
    settings = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cpu", "precision": "fp32", "threads": 1} | train
    return FinetuneConfig(backbone="lenet5", data=data, weights="none", train=TrainConfig(**settings))


class StopAt(Callback):
    """Stands in for a crash after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model, row, images) -> None:
        if row["step"] == self.step:
            raise KeyboardInterrupt


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_cached_and_uncached_augmented_runs_train_the_same_weights_and_a_cached_run_resumes_bit_identical(tmp_path):
    cached = finetune(small_config(augment="standard"), tmp_path / "cached")
    uncached = finetune(small_config(augment="standard", image_cache=False), tmp_path / "uncached")
    assert (cached.summary["image_cache"], uncached.summary["image_cache"]) == ("memory", None)
    assert same_weights(cached.out, uncached.out)
    assert cached.summary["final"]["train_loss"] == uncached.summary["final"]["train_loss"]
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(small_config(augment="standard"), crashed, checkpoint_every=2, callbacks=[StopAt(3)])
    resumed = finetune(small_config(augment="standard"), crashed, resume=True)
    assert resumed.summary["image_cache"] == "memory"
    assert same_weights(crashed, cached.out)
    assert resumed.summary["final"]["train_loss"] == cached.summary["final"]["train_loss"]


def test_a_resumed_run_takes_the_threads_it_started_with(monkeypatch, tmp_path: Path) -> None:
    """Threads chosen from the free cores are saved with the checkpoint: the cores free when
    the run resumes do not change the number of threads its sums are split over."""
    from tltk.train import checkpoint, trainer

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's own ceiling, whatever this machine has
    try:
        monkeypatch.setattr(trainer, "free_cores", lambda: 2)
        crashed = tmp_path / "crashed"
        with pytest.raises(KeyboardInterrupt):
            finetune(small_config(threads=None), crashed, checkpoint_every=2, callbacks=[StopAt(3)])
        assert checkpoint.read_training_state(crashed).extra["threads"] == 2
        monkeypatch.setattr(trainer, "free_cores", lambda: 1)
        assert finetune(small_config(threads=None), crashed, resume=True).summary["threads"] == 2
        assert finetune(small_config(threads=None), tmp_path / "fresh").summary["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_cli_caches_decoded_images_by_default_and_no_image_cache_turns_it_off(tmp_path: Path) -> None:
    base = ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1",
            "--train-per-class", "6", "--epochs", "1", "--device", "cpu", "--threads", "1", "--quiet", "--json"]
    for flags, expected in (([], "memory"), (["--no-image-cache"], None)):
        out = tmp_path / str(expected)
        done = CliRunner().invoke(main, [*base, *flags, "--out", str(out)])
        assert done.exit_code == 0, done.output
        assert json.loads((out / "summary.json").read_text())["image_cache"] == expected


# --- threads and workers ----------------------------------------------------------------


def test_threads_take_the_free_cores_the_workers_leave(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert plan_cpus(100_000, decoded=True, free=4) == runtime.CpuPlan(threads=4, workers=0, free_cores=4)
    assert plan_cpus(100_000, decoded=False, free=4) == runtime.CpuPlan(threads=2, workers=2, free_cores=4)
    assert plan_cpus(100, decoded=False, free=4).workers == 0, "too few images to pay for worker start-up"
    assert plan_cpus(100_000, decoded=False, free=1) == runtime.CpuPlan(threads=1, workers=1, free_cores=1)
    assert plan_cpus(100_000, decoded=True, threads=3, workers=2, free=1) == runtime.CpuPlan(3, 2, 1)
    # Decoded images: workers the user asks for read only the validation images, never beside a step.
    assert plan_cpus(100_000, decoded=True, workers=2, free=2) == runtime.CpuPlan(threads=2, workers=2, free_cores=2)
    assert plan_cpus(100_000, decoded=False, workers=2, free=2).threads == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert plan_cpus(100, decoded=True, free=16).threads == 2, "never more than torch would use on its own"


def test_a_core_busy_with_another_process_is_not_counted_free(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda window=0.0: 0.95)
    assert runtime.free_cores() == 1
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda window=0.0: 0.1)
    assert runtime.free_cores() == 2
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda window=0.0: 5.0)
    assert runtime.free_cores() == 1


def test_busy_elsewhere_sees_a_busy_process(tmp_path: Path) -> None:
    """A spinning child process shows as about a core's worth of other work."""
    import subprocess
    import sys

    if runtime._busy_ticks() is None:
        pytest.skip("no /proc/stat here")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert runtime.busy_elsewhere(0.3) > 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_fit_runs_with_the_planned_threads_and_gives_the_callers_number_back(monkeypatch, tmp_path: Path) -> None:
    seen: list[int] = []

    class Watch(Callback):
        def on_epoch_end(self, model, row) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    result = finetune(small_config(threads=2, epochs=1), tmp_path / "run", callbacks=[Watch()])
    assert seen == [2] and result.summary["threads"] == 2
    assert torch.get_num_threads() == before


def test_the_loaders_worker_processes_are_stopped_when_training_ends(tmp_path: Path) -> None:
    """The validation loader keeps its workers between epochs; they are stopped as fit
    returns, not left for a later garbage collection (which once stalled a run's end by 5 s
    per worker). With the collector off, nothing but fit itself can have stopped them."""
    import gc
    import multiprocessing

    gc.collect()
    gc.disable()
    try:
        result = finetune(small_config(workers=2, epochs=2), tmp_path / "run")
        assert result.summary["epochs_run"] == 2
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()


def test_threads_below_one_is_one_clear_sentence() -> None:
    with pytest.raises(SettingError, match="threads must be at least 1"):
        TrainConfig(threads=0).validate_settings()
