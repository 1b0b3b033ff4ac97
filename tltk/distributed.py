"""Data-parallel training across processes: torchrun, multi-node torchrun, and SLURM launches.

One process per device. Each process sees the whole dataset listing but trains on its own
shard of every epoch's order; DistributedDataParallel averages the gradients, so N
processes with per-process batch B take the same steps as one process with batch N x B.
That equivalence is why the data order lives here: ``EpochOrder`` draws one permutation
per epoch from ``seed + epoch`` and gives rank r every N-th index starting at r, so global
batch k of an N-process run holds exactly the samples of batch k of a one-process run
with the N-times larger batch. The same rule makes the order of a resumed epoch
reproducible from (seed, epoch, position) alone.

Only rank 0 writes files and shows progress; the others compute.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from tltk.errors import TltkError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. A single-process run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def launch_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the launcher's variables, or None outside a launch.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; ``srun`` sets SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID (MASTER_ADDR and MASTER_PORT must then come from the batch script).
    """
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                          ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_key in env and size_key in env:
            try:
                rank, size, local = int(env[rank_key]), int(env[size_key]), int(env.get(local_key, "0"))
            except ValueError as exc:
                raise TltkError(f"{rank_key}={env[rank_key]!r} / {size_key}={env[size_key]!r} are not integers; "
                                f"start tltk through torchrun or srun.") from exc
            if size > 1:
                return rank, size, local
    return None


def launched_rank() -> int:
    """This process's rank in a torchrun/srun launch (0 outside one): who reports."""
    found = launch_env()
    return found[0] if found is not None else 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group when launched by torchrun/srun; a plain launch stays single-process.

    NCCL is the backend on CUDA, gloo on the CPU.
    """
    found = launch_env()
    if found is None:
        return SINGLE
    rank, world_size, local_rank = found
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise TltkError("a multi-process launch needs MASTER_ADDR and MASTER_PORT; set them in the batch script "
                        "(torchrun sets them itself).")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, backend)


def shutdown(context: DistContext) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device_type: str) -> Iterator[DistContext]:
    """The process group for the duration of a job when launched by torchrun/srun (left as
    found when the caller had already joined one); a plain launch yields the single context."""
    joined_before = dist.is_available() and dist.is_initialized()
    context = current_context() if joined_before else init_distributed(device_type)
    try:
        yield context
    finally:
        if not joined_before:
            shutdown(context)


def current_context() -> DistContext:
    """Where this process stands in an already joined process group (single when none is)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    found = launch_env()
    local_rank = found[2] if found is not None else 0
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def device_for(context: DistContext, device: torch.device) -> torch.device:
    """Each process drives its own GPU (cuda:LOCAL_RANK); CPU processes share the CPU."""
    if context.active and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


class EpochOrder(torch.utils.data.Sampler[int]):
    """This rank's share of one seeded permutation per epoch; the trainer's order too (rank 0 of 1).

    The permutation depends on the seed and the epoch alone, so every rank agrees on it
    without talking, the order is the same with or without worker processes and for cached
    features as for their images, and a resumed run can rebuild it. The listing is padded by
    repeating its start until it divides by the world size (as DistributedSampler does), so
    every rank takes the same number of steps; ``skip`` leaves out the first indices of this
    rank's share when an interrupted epoch is resumed.

    With ``sample_seeds`` it yields ``(index, seed)`` pairs instead: the seed of that
    sample's random transforms in this epoch, drawn from (seed, epoch, index) alone, so an
    augmented image is the same whichever worker process or rank loads it, and after a
    resume (datasets that take them: ``ImageDataset``).

    Given the training ``batch_size``, an epoch whose last batch would hold a single image
    leaves that image out (a different one each epoch, the order being shuffled): BatchNorm
    cannot normalise a batch of one, and training would stop on it half-way through.
    """

    _PURPOSE = 7  # mixed into the seed, apart from the split carves' purposes
    _AUGMENT_PURPOSE = 8

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 sample_seeds: bool = False, batch_size: int | None = None) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sample_seeds = sample_seeds
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: samples of this epoch this rank already trained on (a resumed run leaves them out)."""
        self.epoch = epoch
        self.skip = skip

    def global_order(self) -> list[int]:
        rng = np.random.default_rng([self._PURPOSE, self.epoch, int(self.seed) % 2**63])
        order = rng.permutation(self.num_samples).tolist()
        padded = math.ceil(self.num_samples / self.world_size) * self.world_size
        return (order * math.ceil(padded / max(len(order), 1)))[:padded] if order else []

    def transform_seeds(self) -> np.ndarray:
        """One seed per dataset index for this epoch's random transforms."""
        rng = np.random.default_rng([self._AUGMENT_PURPOSE, self.epoch, int(self.seed) % 2**63])
        return rng.integers(0, 2**63 - 1, size=self.num_samples, dtype=np.int64)

    def kept(self, share: int) -> int:
        """How many of a rank's ``share`` of an epoch it trains on: all but a lone last image."""
        lone = self.batch_size is not None and share > 1 and share % self.batch_size == 1
        return share - 1 if lone else share

    def __iter__(self) -> Iterator[Any]:
        share = self.global_order()[self.rank::self.world_size]
        share = share[:self.kept(len(share))][self.skip:]
        if not self.sample_seeds:
            return iter(share)
        seeds = self.transform_seeds()
        return iter([(index, int(seeds[index])) for index in share])

    def __len__(self) -> int:
        return max(self.kept(math.ceil(self.num_samples / self.world_size)) - self.skip, 0)


# What each backend's collectives accept. gloo has no bf16 or int16 ("Invalid scalar type");
# NCCL takes the 16-bit floats but not bool or int16. Unknown backends are treated as gloo.
_BACKEND_DTYPES: dict[str, frozenset[torch.dtype]] = {
    "gloo": frozenset({torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64}),
    "nccl": frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                       torch.int32, torch.int64}),
}


def wire_dtype(dtype: torch.dtype, backend: str | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` travels in over ``backend``: its own where the backend
    takes it, else a wider one that holds every value exactly (bf16 and fp16 in fp32, bool
    and int16 in int64), so converting back after the collective restores each value bit
    for bit. Features and logits are bf16 whenever a run's precision is."""
    supported = _BACKEND_DTYPES.get(backend or "gloo", _BACKEND_DTYPES["gloo"])
    if dtype in supported:
        return dtype
    if dtype.is_floating_point:
        return torch.float32 if torch.finfo(dtype).bits <= 32 else torch.float64
    return torch.int64


def all_reduce_sums(values: dict[str, float], context: DistContext, device: torch.device) -> dict[str, float]:
    """Sum each value over the ranks (totals and counts; divide afterwards for means)."""
    if not context.active:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(keys, tensor.tolist()))


def gather_rows(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows (rank 0's first), for metrics that need all scores at once (AP)."""
    if not context.active:
        return tensor
    sizes = [None] * context.world_size
    dist.all_gather_object(sizes, int(tensor.shape[0]))
    width = max(sizes)
    padded = torch.zeros((width, *tensor.shape[1:]), dtype=wire_dtype(tensor.dtype, context.backend),
                         device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(tensor.dtype)


def gather_outputs(logits: torch.Tensor, targets: torch.Tensor, context: DistContext,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An evaluation shard's logits and targets joined with every other rank's, on the CPU
    (the collective runs on ``device``: the GPU under NCCL)."""
    if not context.active:
        return logits, targets
    return (gather_rows(logits.to(device), context).cpu(),
            gather_rows(torch.as_tensor(targets).to(device), context).cpu())


def gather_interleaved(destination: torch.Tensor, local: torch.Tensor, context: DistContext,
                       device: torch.device, chunk_rows: int = 4096) -> None:
    """Fill ``destination`` with every rank's rows of an ``evaluation_shard`` split: rank r's
    j-th row is row r + j x N. Done in chunks, so a memory-mapped destination (a feature
    cache larger than memory) never has more than a chunk per rank in memory at once.
    ``device``: where the collective runs (the GPU under NCCL, the CPU under gloo)."""
    if not context.active:
        destination[: len(local)] = local
        return
    world = context.world_size
    counts = [len(range(r, len(destination), world)) for r in range(world)]
    on_wire = wire_dtype(local.dtype, context.backend)
    for start in range(0, max(counts), chunk_rows):
        stop = min(start + chunk_rows, max(counts))
        chunk = torch.zeros((stop - start, *local.shape[1:]), dtype=on_wire, device=device)
        mine = local[start:min(stop, len(local))]
        chunk[: len(mine)] = mine.to(device)
        parts = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(parts, chunk)
        for rank, part in enumerate(parts):
            rows = max(min(stop, counts[rank]) - start, 0)
            if rows:
                rows_of_rank = slice(rank + start * world, rank + (start + rows) * world, world)
                destination[rows_of_rank] = part[:rows].to(device=destination.device, dtype=local.dtype)


def any_rank(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True on every rank when it is true on any (a signal one rank received, say)."""
    if not context.active:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_ranks(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True on every rank when it is true on all of them (a decision they must share)."""
    return not any_rank(not flag, context, device)


def barrier(context: DistContext) -> None:
    if context.active:
        dist.barrier()


def evaluation_shard(num_samples: int, context: DistContext) -> list[int]:
    """This rank's rows for evaluation: every N-th, no padding, so no image counts twice."""
    return list(range(context.rank, num_samples, context.world_size))
