"""A full or failing disk in the middle of a checkpoint, a store write, an append, a merge or a
prediction export: the previous complete state stays usable, nothing partial is left, and
the error is one DiskError sentence naming the file and the space the write needed.

Each writer is run once to count its write points (file writes, fsyncs, renames, links,
safetensors saves), then once per point with that point failing (ENOSPC, and EIO for
some); and for real on a 2 MiB tmpfs filled up before the save.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import tltk.export as export_module
import tltk.features.store as store_module
import tltk.features.writing as writing_module
import tltk.fileio as fileio
from tltk.errors import DiskError
from tltk.export import export
from tltk.features.shards import create_part, merge_parts, shard_record
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks
from tltk.predict import Predictions
from tltk.train.checkpoint import TrainingState, checkpoint_dir, load_checkpoint, save_checkpoint

HEADER = {"source": {"fingerprint": "f" * 64, "description": "test vectors"}, "layer": "fc7", "pool": "avg",
          "class_names": ["a", "b"], "task": "multiclass", "data": []}
BYTES = re.compile(r"\d[\d,]* bytes")


# --- failing write points ---------------------------------------------------------------------


class Faults:
    """Counts the write points tltk's writers pass and makes the ``fail_at``-th raise ``code``.

    The points: every write to a file opened for writing by the store modules, pathlib's
    write_bytes (the atomic text writes), safetensors' save_file, os.fsync, os.replace, os.link.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None, code: int = errno.ENOSPC) -> None:
        self.count = 0
        self.fail_at = fail_at
        self.code = code
        self.failed_at: str | None = None
        self._install(monkeypatch)

    def hit(self, where: str) -> None:
        self.count += 1
        if self.count - 1 == self.fail_at:
            self.failed_at = where
            raise OSError(self.code, os.strerror(self.code))

    def _install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors.torch

        faults = self

        def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def failing(*args: Any, **kwargs: Any) -> Any:
                faults.hit(name)
                return original(*args, **kwargs)
            return failing

        for name in ("fsync", "replace", "link"):
            monkeypatch.setattr(os, name, wrap(f"os.{name}", getattr(os, name)))
        monkeypatch.setattr(Path, "write_bytes", wrap("Path.write_bytes", Path.write_bytes))
        monkeypatch.setattr(safetensors.torch, "save_file", wrap("save_file", safetensors.torch.save_file))
        for module in (writing_module, store_module, export_module):  # export: rows written as they come
            monkeypatch.setattr(module, "open", self._open, raising=False)

    def _open(self, *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(*args, **kwargs)
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return _FailingWrites(handle, self) if any(c in mode for c in "wa+") else handle


class _FailingWrites:
    """A file whose writes pass through ``Faults.hit`` first."""

    def __init__(self, handle: Any, faults: Faults) -> None:
        self._handle, self._faults = handle, faults

    def write(self, data: Any) -> int:
        self._faults.hit("write")
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> "_FailingWrites":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __iter__(self) -> Any:
        return iter(self._handle)


def at_every_write_point(monkeypatch: pytest.MonkeyPatch, prepare: Callable[[], Any], operation: Callable[[Any], Any],
                         check: Callable[[Any, DiskError | None], None], code: int = errno.ENOSPC) -> int:
    """Run ``operation`` on a freshly prepared state once per write point, that point failing;
    ``check(state, error)`` judges each outcome. Returns how many points there were."""
    state = prepare()
    with monkeypatch.context() as patch:
        counting = Faults(patch)
        operation(state)
    points = counting.count
    assert points >= 3
    for index in range(points):
        state = prepare()
        error: DiskError | None = None
        with monkeypatch.context() as patch:
            faults = Faults(patch, fail_at=index, code=code)
            try:
                operation(state)
            except DiskError as exc:
                error = exc
        check(state, error)
        if error is not None:
            message = str(error)
            assert "\n" not in message and "before is kept" in message, message
            if code == errno.ENOSPC:
                assert BYTES.search(message), f"{faults.failed_at}: no byte count in: {message}"
    return points


def leftovers(*folders: Path) -> list[str]:
    """Temporary files and hidden version directories a failed write must not leave."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [p.name for p in folder.iterdir()
                      if p.name.endswith(".tmp") or re.search(r"\.(building|next|old)-", p.name) or p.name.endswith(".part")]
    return found


# --- feature stores ---------------------------------------------------------------------------


def vectors(n: int, seed: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "path": f"{tag}{i}.png", "labels": ["a" if i % 2 else "b"], "split": "train"}
            for i in range(n)]


def make(path: Path, data: np.ndarray, tag: str, **options: Any) -> FeatureStore:
    return create_store(path, iter_chunks(data, rows(len(data), tag), 32), HEADER, metric="l2", **options)


def snapshot(path: Path) -> tuple:
    """What a reader gets from the store: rows, vectors, metadata ids, and search answers."""
    store = FeatureStore.open(path)
    distances, found = store.search(vectors(3, 99, dim=store.dim), 4)
    answer = (store.count, store.features().tobytes(), [r["id"] for r in store.metadata()], found.tolist(),
              distances.tolist(), store.manifest["metadata_bytes"])
    store.close()
    return answer


class StoreCase:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rounds = 0
        pristine = root / "pristine"
        make(pristine / "store", vectors(100, 0), "a")
        self.pristine = pristine
        self.before = snapshot(pristine / "store")

    def fresh(self) -> Path:
        self.rounds += 1
        folder = self.root / f"round{self.rounds}"
        shutil.copytree(self.pristine, folder)
        return folder / "store"


def test_a_full_disk_at_any_write_of_an_overwrite_keeps_the_old_store(tmp_path: Path, monkeypatch) -> None:
    """extract --overwrite's write path (create_store over a store) failing anywhere: the old store
    answers as before, or the new one is whole; nothing hidden is left beside it."""
    case = StoreCase(tmp_path)
    new = vectors(150, 1)

    def check(path: Path, error: DiskError | None) -> None:
        after = snapshot(path)
        if error is None:
            assert after[0] == 150
        else:
            assert after == case.before and str(path) in str(error)
        assert leftovers(path.parent, path) == []

    points = at_every_write_point(monkeypatch, case.fresh,
                                  lambda path: make(path, new, "b", overwrite=True), check)
    assert points >= 8


def test_a_full_disk_at_any_write_of_an_append_keeps_the_store_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """index --add's write path failing anywhere: same rows, same bytes on disk, no partial rows kept."""
    case = StoreCase(tmp_path)

    def append(path: Path) -> None:
        FeatureStore.open(path).append(iter_chunks(vectors(40, 2), rows(40, "c"), 16), {"spec": "more"}, [])

    def check(path: Path, error: DiskError | None) -> None:
        after = snapshot(path)
        if error is None:
            assert after[0] == 140
        else:
            assert after == case.before and str(path) in str(error)
            assert (path / "features.f32").stat().st_size == 100 * 16 * 4  # the appended bytes were cut off
        assert leftovers(path.parent, path) == []

    at_every_write_point(monkeypatch, case.fresh, append, check)


def test_an_io_error_at_any_write_of_an_append_keeps_the_store_too(tmp_path: Path, monkeypatch) -> None:
    """EIO (a failing device) is reported as such and leaves the store as it was."""
    case = StoreCase(tmp_path)

    def append(path: Path) -> None:
        FeatureStore.open(path).append(iter_chunks(vectors(40, 2), rows(40, "c"), 16), {"spec": "more"}, [])

    def check(path: Path, error: DiskError | None) -> None:
        if error is not None:
            assert "input/output error" in str(error) and snapshot(path) == case.before

    at_every_write_point(monkeypatch, case.fresh, append, check, code=errno.EIO)


def test_a_full_disk_at_any_write_of_a_merge_keeps_the_old_store(tmp_path: Path, monkeypatch) -> None:
    """index merge --overwrite failing anywhere: the store at --out is the old one; the parts are untouched."""
    data = vectors(64, 3)
    parts = []
    for index, (start, stop) in enumerate(((0, 32), (32, 64))):
        record = shard_record(index, 2, range(start, stop), 64, {"extraction": "x", "batch_size": 32, "index": {}})
        parts.append(create_part(tmp_path / f"part{index}", iter_chunks(data[start:stop], rows(64, "p")[start:stop], 16),
                                 HEADER, record, metric="l2"))
    case = StoreCase(tmp_path)

    def check(path: Path, error: DiskError | None) -> None:
        if error is None:
            assert snapshot(path)[0] == 64
        else:
            assert snapshot(path) == case.before and str(path) in str(error)
        assert leftovers(path.parent, path) == []

    at_every_write_point(monkeypatch, case.fresh,
                         lambda path: merge_parts([p.path for p in parts], path, overwrite=True), check)


# --- checkpoints and exports ------------------------------------------------------------------


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(32, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_full_disk_at_any_write_of_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint save failing anywhere: the previous checkpoint loads (or the new one, if it
    committed), and no uncommitted tensor file is left taking space."""
    pristine = tmp_path / "pristine"
    first, first_optimizer = model_and_optimizer(0)
    save_checkpoint(pristine, first, first_optimizer, None, None, TrainingState(global_step=1))
    later, later_optimizer = model_and_optimizer(1)
    rounds = iter(range(10_000))

    def prepare() -> Path:
        run = tmp_path / f"run{next(rounds)}"
        shutil.copytree(pristine, run)
        return run

    def check(run: Path, error: DiskError | None) -> None:
        model, optimizer = model_and_optimizer(2)
        resumed = load_checkpoint(run, model, optimizer)
        expected = (first, 1) if error is not None else (later, 2)
        assert resumed.state.global_step == expected[1]
        assert torch.equal(model.weight, expected[0].weight)
        assert len(list(checkpoint_dir(run).glob("state-*.safetensors"))) == 1
        assert leftovers(checkpoint_dir(run)) == []
        if error is not None:
            assert str(checkpoint_dir(run)) in str(error) and f"--resume {run}" in str(error)

    at_every_write_point(monkeypatch, prepare,
                         lambda run: save_checkpoint(run, later, later_optimizer, None, None, TrainingState(global_step=2)),
                         check)


def predictions(count: int) -> Predictions:
    probabilities = np.random.default_rng(0).dirichlet([1.0, 1.0], size=count)
    return Predictions([f"img{i}" for i in range(count)], [f"img{i}.png" for i in range(count)], probabilities,
                       ["a", "b"], "multiclass")


def test_a_full_disk_during_a_prediction_export_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    """export over an earlier predictions.csv failing: the earlier file is there byte for byte,
    and the message says how many bytes the new one needed."""
    out = tmp_path / "predictions.csv"
    export(predictions(10), out, "csv")
    before = out.read_bytes()

    def check(_: int, error: DiskError | None) -> None:
        if error is not None:
            assert out.read_bytes() == before and str(out) in str(error)
        assert leftovers(tmp_path) == []

    at_every_write_point(monkeypatch, lambda: out.write_bytes(before), lambda _: export(predictions(500), out, "csv"), check)


def test_the_message_gives_the_exact_size_the_write_needed(tmp_path: Path, monkeypatch) -> None:
    """write_text knows its size up front; the sentence states it in bytes."""
    text = "x" * 12_345
    with monkeypatch.context() as patch:
        Faults(patch, fail_at=0)
        with pytest.raises(DiskError, match=r"needed at least 12\.3 kB \(12,345 bytes\)"):
            fileio.write_text(tmp_path / "f.txt", text)
    assert list(tmp_path.iterdir()) == []


def test_library_errors_that_wrap_a_full_disk_are_recognised() -> None:
    """safetensors and FAISS report ENOSPC inside their own exceptions; both count as a full disk."""
    assert fileio.disk_errno(RuntimeError("write error in /x/index.faiss: 1 != 2 (No space left on device)")) == errno.ENOSPC
    assert fileio.disk_errno(RuntimeError("Error while serializing: I/O error: os error 28")) == errno.ENOSPC
    assert fileio.disk_errno(RuntimeError("some other failure")) is None
    assert fileio.disk_errno(OSError(errno.EACCES, "denied")) is None


# --- for real, on a small file system ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs mounted for the test and unmounted after it. Mounting needs root: the test
    is skipped (with the reason) where it cannot mount, except under CI, where that fails it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            reason = f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all but about ``leave`` bytes of the disk with one file; returns it (delete it to free them)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def test_a_store_overwrite_and_append_on_a_full_tmpfs_keep_the_old_store(small_disk: Path) -> None:
    """On a real full file system: overwrite and append fail with a DiskError naming the store, the
    old store answers as before, nothing partial is left, and with space freed both succeed."""
    store = small_disk / "store"
    make(store, vectors(200, 0, dim=64), "a")
    before = snapshot(store)
    filler = fill(small_disk, leave=40_000)
    with pytest.raises(DiskError) as full:
        make(store, vectors(3000, 1, dim=64), "b", overwrite=True)
    assert str(store) in str(full.value) and "no space is left" in str(full.value) and BYTES.search(str(full.value))
    assert snapshot(store) == before and leftovers(small_disk, store) == []
    with pytest.raises(DiskError):
        FeatureStore.open(store).append(iter_chunks(vectors(3000, 2, dim=64), rows(3000, "c"), 500), {"spec": "more"}, [])
    assert snapshot(store) == before and leftovers(small_disk, store) == []
    filler.unlink()
    FeatureStore.open(store).append(iter_chunks(vectors(1000, 2, dim=64), rows(1000, "c"), 500), {"spec": "more"}, [])
    assert snapshot(store)[0] == 1200


def test_a_checkpoint_on_a_full_tmpfs_keeps_the_previous_one(small_disk: Path) -> None:
    """A real ENOSPC inside safetensors' save: the previous checkpoint loads, the partial tensor file
    is gone, and the message says how much the save needed and how to resume."""
    run = small_disk / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    save_checkpoint(run, model, optimizer, None, None, TrainingState(global_step=1))
    saved = model.weight.detach().clone()
    fill(small_disk, leave=100_000)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(DiskError) as full:
        save_checkpoint(run, model, optimizer, None, None, TrainingState(global_step=2))
    message = str(full.value)
    assert str(checkpoint_dir(run)) in message and "needed at least" in message and f"--resume {run}" in message
    restored = torch.nn.Linear(128, 512)
    resumed = load_checkpoint(run, restored, torch.optim.SGD(restored.parameters(), lr=0.1, momentum=0.9))
    assert resumed.state.global_step == 1 and torch.equal(restored.weight, saved)
    assert len(list(checkpoint_dir(run).glob("state-*"))) == 1 and leftovers(checkpoint_dir(run)) == []


def test_a_prediction_export_on_a_full_tmpfs_keeps_the_previous_file(small_disk: Path) -> None:
    """A real ENOSPC while writing predictions.csv: the earlier file stays, the message gives the size
    (rows are written as they are predicted, so the size is what had been written when the disk refused more)."""
    out = small_disk / "predictions.csv"
    export(predictions(10), out, "csv")
    before = out.read_bytes()
    fill(small_disk, leave=8_000)
    with pytest.raises(DiskError, match=r"the write had put .* bytes\) there and needed more"):
        export(predictions(5000), out, "csv")
    assert out.read_bytes() == before and leftovers(small_disk) == []


def test_a_full_disk_while_logging_metrics_cuts_the_log_back_to_its_last_flush(tmp_path: Path) -> None:
    """metrics.jsonl never ends in half a row: a refused flush is a DiskError naming the file, and
    the file keeps only the rows flushed before it."""
    from tltk.rundir import METRICS, MetricsLog, read_metrics

    log = MetricsLog.open(tmp_path)
    log.write({"step": 1, "loss": 0.5})
    log.flush()
    log.write({"step": 2, "loss": 0.4})
    handle = log.handle

    class RefusingFlush:
        """The log's file, with a disk that takes half the buffered row and then refuses."""

        def __getattr__(self, name: str) -> Any:
            return getattr(handle, name)

        def flush(self) -> None:
            with open(tmp_path / METRICS, "a") as raw:
                raw.write('{"step": 2, "lo')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log.handle = RefusingFlush()  # type: ignore[assignment]
    with pytest.raises(DiskError, match=f"cannot write {re.escape(str(tmp_path / METRICS))}: no space"):
        log.flush()
    log.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]


def test_a_disk_feature_cache_too_big_for_the_disk_is_a_disk_error_not_a_crash(small_disk: Path) -> None:
    """The frozen-backbone cache memory-maps a file; on a full disk writing through the mapping would
    kill training with SIGBUS, so its blocks are reserved up front and a shortfall is a DiskError."""
    from tltk.train.cache import FeatureCache

    with FeatureCache(total_images=20_000, budget_bytes=0, directory=small_disk) as cache:
        with pytest.raises(DiskError, match=r"needed at least 5\.1 MB"):
            cache.allocate(20_000, (64,), torch.float32)  # 5.1 MB on a 2 MiB disk
        fits = cache.allocate(1_000, (64,), torch.float32)
        fits[:] = 1.0  # every page of the reserved file can be written
        assert float(fits.sum()) == 64_000
    assert list(small_disk.iterdir()) == []


def test_extract_overwrite_on_a_full_tmpfs_is_one_sentence_and_keeps_the_old_store(small_disk: Path) -> None:
    """`tltk extract --overwrite` on a full disk: exit 2, one line naming the store, the old store intact."""
    from click.testing import CliRunner

    from tltk.cli import main

    store = small_disk / "store"
    make(store, vectors(50, 0, dim=84), "a")
    before = snapshot(store)
    fill(small_disk, leave=60_000)
    result = CliRunner().invoke(main, ["extract", "lenet5", "--layer", "fc7", "--data", "builtin:digits", "--out",
                                       str(store), "--overwrite", "--weights", "none", "--device", "cpu",
                                       "--workers", "0", "--json"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("error: cannot write") and str(store) in text and "no space is left" in text
    assert "Traceback" not in result.output and BYTES.search(text)
    assert snapshot(store) == before and leftovers(small_disk, store) == []
