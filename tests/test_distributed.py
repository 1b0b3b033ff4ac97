"""Data order and launch detection for data-parallel training.

The property everything rests on: with N ranks of batch B, global step k trains on exactly
the samples of step k of one process with batch N x B.
"""

from __future__ import annotations

import pytest
import torch

import torch.distributed as dist
import torch.multiprocessing

from tltk import distributed
from tltk.distributed import EpochOrder, evaluation_shard, launch_env, DistContext, wire_dtype
from tltk.errors import TltkError


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_global_batches_hold_the_samples_of_the_single_process_batches(world_size):
    per_rank_batch, samples = 4, world_size * 4 * 5
    single = EpochOrder(samples, seed=7)
    ranks = [EpochOrder(samples, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for order in ranks:
            order.set_epoch(epoch)
        single_batches = _batches(list(single), per_rank_batch * world_size)
        rank_batches = [_batches(list(order), per_rank_batch) for order in ranks]
        for step, expected in enumerate(single_batches):
            together = sorted(i for r in range(world_size) for i in rank_batches[r][step])
            assert together == sorted(expected)


def test_each_epoch_is_a_fresh_permutation_that_every_rank_agrees_on():
    order = EpochOrder(50, seed=1)
    order.set_epoch(0)
    first = list(order)
    order.set_epoch(1)
    second = list(order)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    again = EpochOrder(50, seed=1)
    again.set_epoch(1)
    assert list(again) == second


def test_uneven_listing_is_padded_so_every_rank_takes_the_same_number_of_steps():
    shares = []
    for rank in range(4):
        order = EpochOrder(10, seed=0, rank=rank, world_size=4)
        shares.append(list(order))
        assert len(order) == 3
    assert all(len(share) == 3 for share in shares)
    assert set(i for share in shares for i in share) == set(range(10))


def test_a_lone_last_training_image_is_left_out_of_its_epoch_and_a_different_one_each_epoch():
    """17 images in batches of 8 would end on a batch of one, which BatchNorm cannot train on."""
    order = EpochOrder(17, seed=2, batch_size=8)
    left_out = []
    for epoch in range(4):
        order.set_epoch(epoch)
        indices = list(order)
        assert len(indices) == len(order) == 16 and len(set(indices)) == 16
        left_out.append(next(iter(set(range(17)) - set(indices))))
    assert len(set(left_out)) > 1
    order.set_epoch(0, skip=8)  # a resumed epoch drops the same image
    assert len(order) == 8 and list(order) == list(EpochOrder(17, seed=2, batch_size=8))[8:]
    assert len(EpochOrder(18, seed=2, batch_size=8)) == 18 and len(EpochOrder(17, seed=2)) == 17


def test_resuming_mid_epoch_continues_with_the_indices_not_yet_seen():
    order = EpochOrder(30, seed=5)
    order.set_epoch(2)
    full = list(order)
    order.set_epoch(2, skip=12)
    assert list(order) == full[12:] and len(order) == 18


def test_evaluation_shards_cover_every_row_exactly_once():
    shards = [evaluation_shard(11, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def test_launch_env_reads_torchrun_then_slurm_and_ignores_single_process_launches():
    assert launch_env({}) is None
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    assert launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (3, 8, 1)
    with pytest.raises(TltkError, match="not integers"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("total,world,chunk", [(10, 2, 4), (11, 3, 2), (7, 4, 100), (5, 2, 1)])
def test_gathered_shards_land_in_dataset_order_whatever_the_chunking(monkeypatch, dtype, total, world, chunk):
    """Rank r extracted rows r, r+N, ...; the gathered tensor is the whole split in order."""
    import tltk.distributed as distributed

    whole = (torch.arange(total * 3).reshape(total, 3) * 7 % 101).to(dtype)
    shards = [whole[r::world] for r in range(world)]
    calls = []

    def fake_all_gather(parts, chunk_tensor):  # what each rank would send for this chunk
        start = len(calls) * chunk
        calls.append(start)
        for rank, part in enumerate(parts):
            rows = shards[rank][start:start + len(chunk_tensor)].to(chunk_tensor.dtype)
            part.zero_()
            part[: len(rows)] = rows

    monkeypatch.setattr(distributed.dist, "all_gather", fake_all_gather)
    for rank in range(world):
        destination = torch.full((total, 3), -1).to(dtype)
        context = distributed.DistContext(rank=rank, world_size=world)
        distributed.gather_interleaved(destination, shards[rank], context, torch.device("cpu"), chunk_rows=chunk)
        assert torch.equal(destination, whole)
        calls.clear()


def test_sample_seeds_follow_the_sample_not_the_rank_or_the_resume_position():
    single = EpochOrder(12, seed=3, sample_seeds=True)
    single.set_epoch(2)
    by_index = dict(single)
    for rank in range(3):
        order = EpochOrder(12, seed=3, rank=rank, world_size=3, sample_seeds=True)
        order.set_epoch(2, skip=1)
        assert all(by_index[index] == seed for index, seed in order)
    single.set_epoch(3)
    assert dict(single) != by_index, "a new epoch draws new augmentations"


@pytest.mark.parametrize("device_type,backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_a_launch_joins_with_nccl_on_cuda_and_gloo_on_the_cpu_each_process_on_its_local_gpu(
        monkeypatch, device_type, backend):
    """The CUDA wiring without a GPU: the backend asked for, the device each rank drives."""
    import tltk.distributed as distributed

    joined, devices = [], []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda name, rank, world_size: joined.append((name, rank, world_size)))
    monkeypatch.setattr(distributed.torch.cuda, "set_device", devices.append)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    context = distributed.init_distributed(device_type)
    assert joined == [(backend, 3, 4)] and context == DistContext(3, 4, 1, backend)
    assert devices == ([1] if device_type == "cuda" else [])
    expected = torch.device("cuda", 1) if device_type == "cuda" else torch.device("cpu")
    assert distributed.device_for(context, torch.device(device_type)) == expected


def test_a_multi_process_launch_without_a_rendezvous_address_is_one_clear_error(monkeypatch):
    import tltk.distributed as distributed

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(TltkError, match="MASTER_ADDR and MASTER_PORT"):
        distributed.init_distributed("cpu")


def test_data_parallel_wraps_on_the_rank_gpu_and_refuses_a_model_with_nothing_to_train(monkeypatch):
    from torch import nn

    from tltk.train import trainer

    made = []
    monkeypatch.setattr(trainer, "DistributedDataParallel", lambda module, **options: made.append(options) or module)
    context = DistContext(rank=0, world_size=2, local_rank=1, backend="nccl")
    module = nn.Linear(2, 2)
    assert trainer.data_parallel(module, context, torch.device("cuda", 1), broadcast_buffers=False) is module
    assert made[0]["device_ids"] == [1] and made[0][trainer._BUFFER_SYNC_OPTION] is False
    trainer.data_parallel(module, context, torch.device("cpu"), broadcast_buffers=True)
    assert made[1]["device_ids"] is None  # gloo on the CPU takes no device ids
    assert trainer.data_parallel(module, DistContext(), torch.device("cpu"), True) is module and len(made) == 2
    module.requires_grad_(False)
    with pytest.raises(TltkError, match="nothing in the model trains"):
        trainer.data_parallel(module, context, torch.device("cpu"), True)


# --- collectives for every dtype tltk trains or extracts in ----------------------------------------

COLLECTIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int16,
                     torch.uint8, torch.bool)


def _values(dtype: torch.dtype, rows: int = 9) -> torch.Tensor:
    """Rows whose values use the dtype's full precision (bf16 values that fp16 could not hold, and so on)."""
    generator = torch.Generator().manual_seed(5)
    if dtype.is_floating_point:
        return (torch.randn(rows, 3, generator=generator, dtype=torch.float64) * 1e3).to(dtype)
    if dtype == torch.bool:
        return torch.rand(rows, 3, generator=generator) > 0.5
    high = 255 if dtype == torch.uint8 else 30_000
    return torch.randint(0, high, (rows, 3), generator=generator).to(dtype)


def _gather_on_one_gloo_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a real two-process gloo group: gather every dtype both ways, save what arrived."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        context = distributed.current_context()
        arrived = {}
        for dtype in COLLECTIVE_DTYPES:
            whole = _values(dtype)
            interleaved = torch.empty_like(whole)
            distributed.gather_interleaved(interleaved, whole[rank::2], context, torch.device("cpu"), chunk_rows=2)
            arrived[str(dtype)] = (interleaved, distributed.gather_rows(whole[rank::2], context))
        torch.save(arrived, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_collective_carries_every_dtype_over_a_real_gloo_group_bit_for_bit(tmp_path):
    # gloo refuses bf16 and int16 with "Invalid scalar type"; a run in bf16 gathers bf16 features
    # and logits, so a faked all_gather cannot show this: two real processes do.
    torch.multiprocessing.spawn(_gather_on_one_gloo_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
                                nprocs=2, join=True)
    for rank in range(2):
        arrived = torch.load(tmp_path / f"{rank}.pt")
        for dtype in COLLECTIVE_DTYPES:
            whole = _values(dtype)
            interleaved, concatenated = arrived[str(dtype)]
            assert interleaved.dtype == concatenated.dtype == dtype
            assert torch.equal(interleaved, whole), dtype
            assert torch.equal(concatenated, torch.cat([whole[0::2], whole[1::2]])), dtype


@pytest.mark.parametrize("dtype", COLLECTIVE_DTYPES)
@pytest.mark.parametrize("backend", ["gloo", "nccl", None])
def test_a_tensor_travels_in_its_own_dtype_where_the_backend_takes_it_else_in_one_that_holds_it_exactly(
        dtype, backend):
    travels = wire_dtype(dtype, backend)
    values = _values(dtype)
    assert torch.equal(values.to(travels).to(dtype), values)
    if backend == "nccl" and dtype in (torch.bfloat16, torch.float16):
        assert travels == dtype  # NCCL reduces and gathers the 16-bit floats itself: no doubled traffic
    if backend in ("gloo", None) and dtype in (torch.bfloat16, torch.float16, torch.int16, torch.bool):
        assert travels != dtype
