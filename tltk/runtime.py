"""Where and how a model runs: device, precision, memory layout, loaders, and inference.

Training, evaluation, prediction, extraction and the pictures of a run all run a model
over data, and they must run it the same way: a figure measured in another precision or
on other preprocessing than training used is not the model's. So the choices live here
once, and ``stream_outputs`` is the one loop that feeds a dataset through a model outside
training.

What makes the common case fast without flags: ``--precision auto`` (bf16 where the CPU or
GPU computes it natively), channels-last memory for conv nets, DataLoader workers from the
CPU count.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tltk.data.transforms import dataset_is_deterministic
from tltk.distributed import SINGLE, DistContext, EpochOrder
from tltk.errors import SettingError

Batches = Iterable[tuple[torch.Tensor, Any]]  # a DataLoader, or cached features in the same shape
Forward = Callable[[torch.Tensor], torch.Tensor]


# --- device and precision ----------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(f"device {name} was asked for but no CUDA device is available; use device cpu.", ["device"])
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise SettingError(f"device '{name}' is not one of auto, cpu, cuda.", ["device"])
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32.

    ``auto`` is bf16 where the device computes it natively (CUDA GPUs from Ampere on, CPUs
    with AVX512-BF16 or AMX, Arm CPUs with the BF16 extension) and fp32 elsewhere:
    emulated bf16 is slower than fp32 (about ten times on an AVX2-only CPU), and fp16
    needs loss scaling, so neither is a default.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise SettingError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU.", ["precision"])
        return torch.float16
    return torch.bfloat16 if has_native_bf16(device) else None


def has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm), as the CPU reports them."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return True
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags in /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty elsewhere."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def use_channels_last(setting: str, model: nn.Module) -> bool:
    """Channels-last (NHWC) memory suits 2-D convolutions on CPUs and tensor-core GPUs;
    networks without them (the recurrent backbones) gain nothing from it."""
    if setting != "auto":
        return setting == "on"
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


@contextmanager
def memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """The model in channels-last memory for the duration, contiguous again afterwards,
    so that code which ``view``s its tensors later is not surprised."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def batch_to(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch on ``device``; a 4-D one in channels-last memory when the model is."""
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


# --- loaders -------------------------------------------------------------------------------


def check_batch_size(batch_size: int) -> None:
    """The sentence for a batch size below one, which torch's DataLoader answers with a traceback."""
    if batch_size < 1:
        raise SettingError(f"batch_size must be at least 1, not {batch_size}.", ["batch_size"])


# Below this many images, starting worker processes costs more than they save.
MIN_SAMPLES_FOR_WORKERS = 2048
MAX_DEFAULT_WORKERS = 8


def default_workers(num_samples: int) -> int:
    """Worker processes from the CPUs this process may use, once there is enough data to
    hide their start-up."""
    if num_samples < MIN_SAMPLES_FOR_WORKERS:
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus()))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- threads and workers, chosen together ---------------------------------------------------

# A core counts as taken by other processes once they keep it this busy: torch's threads
# meet at the end of every parallel operation, and one that waits for its core to be free
# holds up the others (a tiny network ran ten times slower with two threads on a 2-core
# machine whose other core was busy).
BUSY_CORE_SHARE = 0.4
LOAD_SAMPLE_SECONDS = 0.05


@dataclass(frozen=True)
class CpuPlan:
    """torch intra-op threads and loader worker processes for one training run: together
    no more than the cores that are free when it starts."""

    threads: int
    workers: int
    free_cores: int


def plan_cpus(num_samples: int, *, decoded: bool, threads: int | None = None, workers: int | None = None,
              free: int | None = None) -> CpuPlan:
    """Workers decode images beside the model: none when the images are already decoded
    (``decoded``), else half of the free cores once there is enough data to hide their
    start-up. The threads take the free cores the workers leave, never more than torch
    would use on its own (``torch.get_num_threads()``: OMP_NUM_THREADS, or the caller's
    ``torch.set_num_threads``). ``threads``/``workers`` are the user's, taken as given.

    With decoded images no worker runs beside a training step (workers the user asks for
    only read the validation images, between epochs), so they leave the threads every
    free core: a run given ``--workers 2`` on two cores would otherwise train on one."""
    free = free if free is not None else free_cores()
    if workers is None:
        workers = 0 if decoded or num_samples < MIN_SAMPLES_FOR_WORKERS else max(1, min(MAX_DEFAULT_WORKERS, free // 2))
    if threads is None:
        beside_steps = 0 if decoded else workers
        threads = max(1, min(torch.get_num_threads(), free - beside_steps))
    return CpuPlan(threads, workers, free)


def free_cores(window: float = LOAD_SAMPLE_SECONDS) -> int:
    """Cores this process may use (affinity and cgroup quota) less those that other processes
    kept busy over a short look at /proc/stat; at least one."""
    cores = usable_cores()
    if cores <= 1:
        return 1
    return max(1, cores - math.floor(busy_elsewhere(window) + (1 - BUSY_CORE_SHARE)))


def usable_cores() -> int:
    """CPUs in this process's affinity mask, capped by a cgroup CPU quota (containers)."""
    cores = usable_cpus()
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    try:
        limit, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def busy_elsewhere(window: float = LOAD_SAMPLE_SECONDS) -> float:
    """Cores' worth of CPU time that other processes used over ``window`` seconds (Linux;
    0 where /proc/stat cannot be read)."""
    before, own_before, started = _busy_ticks(), time.process_time(), time.perf_counter()
    if before is None:
        return 0.0
    time.sleep(window)
    after, own_after, elapsed = _busy_ticks(), time.process_time(), time.perf_counter() - started
    if after is None or elapsed <= 0:
        return 0.0
    ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (after - before) / ticks_per_second - (own_after - own_before)
    return max(0.0, others / elapsed)


def _busy_ticks(stat: Path = Path("/proc/stat")) -> int | None:
    """Non-idle ticks of the CPUs this process may run on (user, nice, system, irq, softirq, steal)."""
    try:
        lines = stat.read_text(encoding="ascii").splitlines()
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if allowed is not None and int(name[3:]) not in allowed:
            continue
        values = [int(v) for v in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
        total += user + nice + system + irq + softirq + steal
    return total


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads at ``count`` for the duration, the caller's number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    seed: int = 0,
    context: DistContext = SINGLE,
) -> DataLoader:
    """A DataLoader with the fast defaults: pinned memory on CUDA, workers kept alive
    between epochs, and (shuffled) an ``EpochOrder``: this rank's share of it under
    data-parallel training.

    The loader always has its own generator: drawing worker seeds from the global one
    would shift every later random number (dropout) by whether a loader was made.
    """
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochOrder(len(dataset), seed=seed, rank=context.rank, world_size=context.world_size,  # type: ignore[arg-type]
                           sample_seeds=_seeds_transforms(dataset), batch_size=batch_size) if shuffle else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
        worker_init_fn=_WorkerSeeder(seed, context.rank) if workers > 0 else None,
    )


def _seeds_transforms(dataset: torch.utils.data.Dataset) -> bool:
    """Whether each sample's random transforms get their own seed: for datasets that take
    one (``ImageDataset``) and whose transforms are random."""
    return bool(getattr(dataset, "takes_sample_seeds", False)) and dataset_is_deterministic(dataset) is not True


class _WorkerSeeder:
    """Each worker's random modules get a seed derived from the run's and the rank's
    (picklable for workers), so ranks do not augment their different images alike."""

    RANK_STRIDE = 1_000_003

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed = seed
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        worker_seed = (self.seed * 1000 + worker_id + self.RANK_STRIDE * self.rank) % 2**32
        random.seed(worker_seed)
        np.random.seed(worker_seed)


# --- inference -----------------------------------------------------------------------------


def iterate_logits(
    model: nn.Module,
    loader: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    forward: Forward | None = None,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """(outputs, targets) per batch, in loader order, on the CPU in fp32.

    A generator, so callers can reduce each batch and let it go (nothing accumulates here).
    ``forward`` replaces the model's own (a tapped layer's features, say).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                with autocast(device, amp_dtype):
                    logits = (forward or model)(batch_to(images, device, channels_last))
                yield logits.float().cpu(), targets
    finally:
        model.train(was_training)


def predict_logits(
    model: nn.Module,
    loader: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    forward: Forward | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and targets, gathered into one preallocated pair of tensors where the
    number of samples is known (no list of batches plus a copy of them all). ``forward``
    replaces the model's own, as in ``iterate_logits``."""
    count = _sample_count(loader)
    logits_all: torch.Tensor | None = None
    targets_all: torch.Tensor | None = None
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = 0
    for logits, targets in iterate_logits(model, loader, device, amp_dtype, channels_last, forward):
        targets = torch.as_tensor(targets)
        if count is None:
            parts.append((logits, targets))
            continue
        if logits_all is None:
            logits_all = torch.empty((count, *logits.shape[1:]), dtype=logits.dtype)
            targets_all = torch.empty((count, *targets.shape[1:]), dtype=targets.dtype)
        logits_all[done:done + len(logits)] = logits
        targets_all[done:done + len(logits)] = targets  # type: ignore[index]
        done += len(logits)
    if logits_all is not None and targets_all is not None:
        return logits_all[:done], targets_all[:done]
    if not parts:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sample_count(loader: Batches) -> int | None:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    split = getattr(loader, "split", None)
    return len(split) if split is not None else None


# --- one way to run a model over data ------------------------------------------------------


@dataclass(frozen=True)
class Inference:
    """How a model runs over data outside training. A run's own settings come from
    ``Run.inference()``, so evaluation and prediction use the precision and memory layout
    the run trained with; ``workers=None`` picks them from the CPU count."""

    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    batch_size: int = 64
    workers: int | None = None


@contextmanager
def _prepared(model: nn.Module, dataset: torch.utils.data.Dataset, settings: Inference,
              device: torch.device | None) -> Iterator[tuple[DataLoader, torch.device, torch.dtype | None, bool]]:
    """(loader, device, autocast dtype, channels-last) for the settings, with the model on the
    device and in its memory layout for the duration."""
    check_batch_size(settings.batch_size)
    device = device if device is not None else resolve_device(settings.device)
    workers = settings.workers if settings.workers is not None else default_workers(len(dataset))  # type: ignore[arg-type]
    loader = make_loader(dataset, batch_size=settings.batch_size, shuffle=False, workers=workers, device=device)
    channels_last = use_channels_last(settings.channels_last, model)
    model.to(device)
    with memory_format(model, channels_last):
        yield loader, device, resolve_precision(settings.precision, device), channels_last


def stream_outputs(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    settings: Inference,
    *,
    device: torch.device | None = None,
    forward: Forward | None = None,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """(outputs, targets) per batch of ``dataset`` in its order, on the CPU in fp32, with
    the settings' device, autocast precision, channels-last memory and loader defaults.

    ``device`` overrides the settings' (a data-parallel rank's own GPU); ``forward``
    replaces the model's forward (features at a tapped layer). A generator: memory holds
    one batch, however large the dataset.
    """
    with _prepared(model, dataset, settings, device) as (loader, device, amp_dtype, channels_last):
        yield from iterate_logits(model, loader, device, amp_dtype, channels_last, forward)


def collect_outputs(
    model: nn.Module, dataset: torch.utils.data.Dataset, settings: Inference, *, device: torch.device | None = None,
    forward: Forward | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every output and target of ``stream_outputs`` at once, in preallocated tensors, for
    figures that rank all scores (AP)."""
    with _prepared(model, dataset, settings, device) as (loader, device, amp_dtype, channels_last):
        return predict_logits(model, loader, device, amp_dtype, channels_last, forward)
