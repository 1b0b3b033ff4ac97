"""Two commands on the same run directory or feature store: one writer at a time, the second
refused in one sentence naming the holder (or waiting with --wait), a killed holder never
blocking for good, and readers answering from one whole version of a store, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tltk.cli import main
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks
from tltk.locking import BusyError, hold, holder, info_path, lock_path

REPO = Path(__file__).resolve().parents[1]
HEADER = {"source": {"fingerprint": "f" * 64, "description": "test vectors"}, "layer": "fc7", "pool": "avg",
          "class_names": ["a", "b"], "task": "multiclass", "data": []}

# A process that holds a target's lock until its stdin closes (or it is killed).
HOLDER = """
import sys
from tltk.locking import hold
with hold(sys.argv[1], what=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another process holding the lock of ``target``, as a second command would."""

    def __init__(self, target: Path, what: str = "feature store") -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), what], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "held"

    @property
    def pid(self) -> int:
        return self.process.pid

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(target: Path, what: str = "feature store") -> Holder:
        started.append(Holder(target, what))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def vectors(n: int, seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "path": f"{tag}{i}.png", "labels": ["a" if i % 2 else "b"], "split": "train"}
            for i in range(n)]


def make(path: Path, data: np.ndarray, tag: str, **options) -> FeatureStore:
    return create_store(path, iter_chunks(data, rows(len(data), tag), 16), HEADER, metric="l2", **options)


def test_a_second_writer_of_a_store_is_refused_naming_the_process_that_holds_it(tmp_path: Path, holders) -> None:
    """create_store while another process writes the same store: one BusyError naming its pid and command."""
    store = tmp_path / "store"
    other = holders(store)
    with pytest.raises(BusyError) as refused:
        make(store, vectors(20, 0), "a")
    message = str(refused.value)
    assert f"process {other.pid} (`python -c ... {store} feature store`)" in message  # its command line, as recorded
    assert "--wait" in message and str(store) in message and "\n" not in message
    assert not store.exists()  # nothing was written


def test_index_add_while_another_command_writes_the_store_is_one_sentence_and_exit_2(tmp_path: Path, holders) -> None:
    """`tltk index STORE --add` refused by the CLI with the holder named, the store untouched."""
    store = tmp_path / "store"
    make(store, vectors(20, 0), "a")
    before = (store / "manifest.json").read_bytes()
    other = holders(store)
    result = CliRunner().invoke(main, ["index", str(store), "--add", "--data", "builtin:digits"])
    assert result.exit_code == 2, result.output
    assert f"process {other.pid}" in result.output and "is being written by" in result.output
    assert "Traceback" not in result.output
    assert (store / "manifest.json").read_bytes() == before


def test_a_second_finetune_or_resume_of_one_run_is_refused_before_anything_is_written(tmp_path: Path, holders) -> None:
    """Two `tltk finetune --out R` at once, and `--resume R` while R trains: the second stops at once."""
    from tltk.data.options import DataOptions
    from tltk.train.finetune import FinetuneConfig, finetune

    run = tmp_path / "run"
    other = holders(run, "run directory")
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--data", "builtin:digits", "--out", str(run),
                                       "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert f"the run directory {run} is being written by process {other.pid}" in " ".join(result.output.split())
    assert not run.exists()
    config = FinetuneConfig(backbone="lenet5", data=DataOptions("builtin:digits"))
    with pytest.raises(BusyError, match=f"process {other.pid}"):
        finetune(config, run, resume=True)


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path, holders) -> None:
    """SIGKILL the holder: the kernel drops its flock, and the next writer goes ahead without --wait."""
    store = tmp_path / "store"
    other = holders(store)
    assert holder(store)["pid"] == other.pid
    other.kill()
    started = time.monotonic()
    built = make(store, vectors(20, 0), "a")
    assert built.count == 20 and time.monotonic() - started < 10
    assert lock_path(store).exists() and not info_path(store).exists()  # the label went with the hold


def test_a_label_half_written_by_a_killed_holder_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    """A holder killed while writing its label leaves the label's temporary file; the next
    holder removes it, so killed commands leave nothing beside the target but the lock file."""
    target = tmp_path / "store"
    target.mkdir()
    label = info_path(target)
    leftover = label.parent / f".{label.name}.k3x9q.tmp"
    leftover.write_text('{"pid": 1', encoding="utf-8")  # as the atomic write leaves it when killed
    unrelated = tmp_path / ".other.lock.json.abc.tmp"
    unrelated.write_text("{}", encoding="utf-8")
    with hold(target):
        assert not leftover.exists()
    assert unrelated.exists()  # another target's label is not this holder's to remove
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.lock.json.abc.tmp", lock_path(target).name, "store"])


def test_wait_waits_for_the_holder_then_writes(tmp_path: Path, holders) -> None:
    """With wait=True the second writer blocks while the first holds the lock, and writes once it lets go."""
    store = tmp_path / "store"
    other = holders(store)
    done: list[FeatureStore] = []
    waiter = threading.Thread(target=lambda: done.append(make(store, vectors(20, 0), "a", wait=True)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not store.exists()
    other.release()
    waiter.join(timeout=60)
    assert done and done[0].count == 20


def test_a_nested_hold_in_one_process_is_reentrant(tmp_path: Path) -> None:
    """The same process holding a store (index --add, then its append) does not lock itself out."""
    target = tmp_path / "x"
    with hold(target) as outer:
        with hold(target) as inner:
            assert outer and not inner
        assert holder(target)["pid"] == os.getpid()  # still held by the outer block
    assert holder(target) is None


def test_another_thread_of_the_same_process_is_another_writer(tmp_path: Path) -> None:
    """Re-entry is per thread: a second thread writing the same store is refused like a second process."""
    target = tmp_path / "x"
    refused: list[BaseException] = []

    def second_writer() -> None:
        try:
            with hold(target):
                pass
        except BusyError as exc:
            refused.append(exc)

    with hold(target):
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join(timeout=30)
    assert refused and f"process {os.getpid()}" in str(refused[0])


# A writer that replaces the store again and again: new stores of two contents, and appends.
# (Only the store modules are imported, so that it starts quickly.)
REPLACER = """
import sys
import numpy as np
from pathlib import Path
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks
HEADER, store = %r, Path(sys.argv[1])
def vectors(n, seed, dim=8):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
def rows(n, tag):
    return [{"id": f"{tag}{i}", "path": f"{tag}{i}.png", "labels": ["a" if i %% 2 else "b"], "split": "train"} for i in range(n)]
print("ready", flush=True)
for round in range(int(sys.argv[2])):
    create_store(store, iter_chunks(vectors(200, round %% 2), rows(200, "ab"[round %% 2]), 16), HEADER, metric="l2", overwrite=True)
    FeatureStore.open(store).append(iter_chunks(vectors(10, 7), rows(10, "c"), 5), {"spec": "more"}, [])
""" % (HEADER,)


def answer(store: FeatureStore, queries: np.ndarray) -> tuple:
    distances, found = store.search(queries, 5)
    ids = store.metadata()
    return store.count, found.tolist(), np.round(distances, 5).tolist(), [[ids[r]["id"] for r in row] for row in found]


def test_readers_see_the_old_or_the_new_store_never_a_mix(tmp_path: Path) -> None:
    """Stores opened and searched while another process overwrites and appends to them answer
    exactly as one of the four whole versions does."""
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    queries = vectors(4, 99)
    versions = []
    for round in range(2):
        make(scratch, vectors(200, round), "ab"[round], overwrite=True)
        versions.append(answer(FeatureStore.open(scratch), queries))
        FeatureStore.open(scratch).append(iter_chunks(vectors(10, 7), rows(10, "c"), 5), {"spec": "more"}, [])
        versions.append(answer(FeatureStore.open(scratch), queries))
    make(store, vectors(200, 0), "a")
    writer = subprocess.Popen([sys.executable, "-c", REPLACER, str(store), "40"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    seen = []
    try:
        while writer.poll() is None:
            opened = FeatureStore.open(store)
            time.sleep(0.002)  # let the writer move on between opening and answering
            seen.append(answer(opened, queries))
            opened.close()
    finally:
        writer.kill() if writer.poll() is None else None
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    assert len(seen) > 20
    mixed = [one for one in seen if one not in versions]
    assert not mixed, f"{len(mixed)} of {len(seen)} answers matched no whole version: {mixed[0]}"
    assert len({one[0] for one in seen}) > 1  # the reader did see the store change under it


def test_a_file_system_without_locks_is_one_sentence_not_an_unguarded_write(tmp_path: Path, monkeypatch) -> None:
    """Where flock is not supported (ENOSYS), writing is refused in one sentence rather than done unlocked."""
    import errno

    import filelock

    def no_flock(self, *args, **kwargs):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(filelock.FileLock, "acquire", no_flock)
    from tltk.errors import TltkError

    with pytest.raises(TltkError, match="does not support file locks; write the feature store on a local disk"):
        make(tmp_path / "store", vectors(20, 0), "a")
    assert not (tmp_path / "store").exists()


def test_a_training_run_holds_its_directory_until_it_ends(tmp_path: Path) -> None:
    """While finetune trains, another writer of its --out is refused naming this process; after, it is free."""
    from tltk.train.callbacks import Callback
    from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
    from tltk.train.trainer import TrainConfig

    run = tmp_path / "run"
    answers: list[str] = []

    class TryToWriteTheRun(Callback):
        """At the first step, a second writer (another thread) tries the run's lock."""

        def on_step_end(self, model, row, images) -> None:
            if answers:
                return

            def second_writer() -> None:
                try:
                    with hold(run, what="run directory"):
                        answers.append("got it")
                except BusyError as exc:
                    answers.append(str(exc))

            thread = threading.Thread(target=second_writer)
            thread.start()
            thread.join(timeout=30)

    data = DataOptions("builtin:digits", classes=["0", "1"], train_per_class=8)
    config = FinetuneConfig(backbone="lenet5", data=data, weights="none",
                            train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"))
    finetune(config, run, callbacks=[TryToWriteTheRun()])
    assert answers and f"the run directory {run} is being written by process {os.getpid()}" in answers[0]
    with hold(run, what="run directory") as taken:
        assert taken  # free once the run has ended


def test_the_cli_wait_flag_waits_for_the_holder(tmp_path: Path, holders) -> None:
    """`tltk index STORE --rebuild --wait` with another writer: it waits until that one lets go, then rebuilds."""
    store = tmp_path / "store"
    make(store, vectors(40, 0), "a")
    other = holders(store)
    releaser = threading.Timer(1.5, other.release)
    releaser.start()
    started = time.monotonic()
    result = CliRunner().invoke(main, ["index", str(store), "--rebuild", "--wait", "--json"])
    releaser.join()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.4  # it waited for the holder
    assert FeatureStore.open(store).count == 40
