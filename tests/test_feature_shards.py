"""Sharded extraction (`tltk extract --shard I/N`) and `tltk index merge`: the merged store is the
single extraction's, bit for bit, and every part that does not belong is refused in one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tltk.cli import main
from tltk.errors import TltkError
from tltk.features import (
    FeatureStore,
    IndexOptions,
    Loading,
    extract,
    load_source,
    merge_parts,
    neighbours_of_rows,
    writing,
)
from tltk.features.extract import shard_rows
from tltk.features.manifest import FEATURES
from tltk.features.shards import StorePart, open_part

DATA = ["builtin:digits"]
DATA_OPTIONS: dict[str, Any] = {"split": "test", "classes": ["0", "1", "2"]}  # 107 images: 7 batches of 16
CPU = Loading(batch_size=16, device="cpu", workers=0)
CLI_DATA = ["--data", "builtin:digits", "--split", "test", "--classes", "0,1,2"]
CLI_MODEL = ["--weights", "none", "--device", "cpu", "--workers", "0", "--batch-size", "16"]
TIMES = ("created", "updated")
INDEX_TIMES = ("build_seconds",)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tltk(*args: Any):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_sentence_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def without_times(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest but for when it was written and how long the index took."""
    kept = {k: v for k, v in manifest.items() if k not in TIMES}
    index = {k: v for k, v in kept["index"].items() if k not in INDEX_TIMES}
    if index.get("recall"):
        index["recall"] = {k: v for k, v in index["recall"].items() if k != "seconds"}
    return {**kept, "index": index}


def nothing_left_at(out: Path) -> bool:
    """Neither the store nor a hidden half-built sibling of it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def lenet():
    # lenet5's fc7 changes in its last bits when the same images are batched differently (see
    # shard_rows): 3 shards cut at arbitrary rows of these 107 images do not merge into equal vectors.
    return load_source("lenet5", weights="none", seed=0)


@pytest.fixture(scope="module")
def single(lenet, tmp_path_factory) -> FeatureStore:
    out = tmp_path_factory.mktemp("single") / "store"
    return extract(lenet, "fc7", out, *DATA, loading=CPU, **DATA_OPTIONS)


@pytest.fixture(scope="module")
def parts(lenet, tmp_path_factory) -> dict[int, list[Path]]:
    """The parts of the same extraction cut into 2 and into 3 shards (written last shard first)."""
    root = tmp_path_factory.mktemp("parts")
    made: dict[int, list[Path]] = {}
    for n in (2, 3):
        for i in reversed(range(n)):
            extract(lenet, "fc7", root / f"of{n}" / f"part{i}", *DATA, loading=CPU, shard=(i, n), **DATA_OPTIONS)
        made[n] = [root / f"of{n}" / f"part{i}" for i in range(n)]
    return made


# --- the merged store is the single extraction's ---------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_merging_the_shards_gives_the_single_extractions_rows_vectors_manifest_and_neighbours(
        n: int, lenet, single: FeatureStore, tmp_path: Path) -> None:
    written = [extract(lenet, "fc7", tmp_path / f"part{i}", *DATA, loading=CPU, shard=(i, n), **DATA_OPTIONS)
               for i in range(n)]
    assert all(isinstance(part, StorePart) for part in written)
    assert sum(part.count for part in written) == single.count and all(part.count < single.count for part in written[:-1] if n > 1)
    last_first = [part.path for part in reversed(written)]
    merged = merge_parts(last_first, tmp_path / "merged")

    assert np.array_equal(np.asarray(merged.features()), np.asarray(single.features()))
    assert merged.metadata() == single.metadata()
    assert (merged.path / "metadata.jsonl").read_bytes() == (single.path / "metadata.jsonl").read_bytes()
    assert without_times(merged.manifest) == without_times(single.manifest)
    assert (merged.path / "index.faiss").read_bytes() == (single.path / "index.faiss").read_bytes()
    reopened = FeatureStore.open(merged.path)
    rows = [0, 17, 53, single.count - 1]
    assert [r.to_dict() for r in neighbours_of_rows(reopened, rows, k=5)] == [r.to_dict() for r in neighbours_of_rows(single, rows, k=5)]


def test_an_approximate_index_is_built_and_tuned_over_the_merged_rows_as_a_single_extraction_does(
        lenet, tmp_path: Path) -> None:
    ivf = IndexOptions(kind="ivf", nlist=2, target_recall=1.0)
    alone = extract(lenet, "fc7", tmp_path / "alone", *DATA, loading=CPU, index=ivf, **DATA_OPTIONS)
    for i in range(2):
        extract(lenet, "fc7", tmp_path / f"part{i}", *DATA, loading=CPU, index=ivf, shard=(i, 2), **DATA_OPTIONS)
    merged = merge_parts([tmp_path / "part1", tmp_path / "part0"], tmp_path / "merged")
    assert merged.index_type == "ivf" and merged.manifest["index"]["factory"] == "IVF2,Flat"
    assert without_times(merged.manifest)["index"] == without_times(alone.manifest)["index"]
    assert (merged.path / "index.faiss").read_bytes() == (alone.path / "index.faiss").read_bytes()
    queries = np.asarray(alone.features()[:20])
    for got, expected in zip(merged.search(queries, 5), alone.search(queries, 5)):
        assert np.array_equal(got, expected)


def test_cli_shards_merged_in_any_order_answer_neighbors_exactly_as_one_extraction(tmp_path: Path) -> None:
    assert tltk("extract", "lenet5", "--layer", "fc7", *CLI_DATA, "--out", tmp_path / "single", *CLI_MODEL).exit_code == 0
    for i in range(3):
        result = tltk("extract", "lenet5", "--layer", "fc7", *CLI_DATA, "--out", tmp_path / f"p{i}", "--shard", f"{i}/3", *CLI_MODEL)
        assert result.exit_code == 0, result.output
        assert f"wrote shard {i}/3: rows" in result.stdout and "tltk index merge" in result.stdout
    merged = tltk("index", "merge", tmp_path / "p2", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    assert "merged 3 parts" in merged.stdout and "107 rows of 84-d fc7 features" in merged.stdout
    assert (tmp_path / "merged" / FEATURES).read_bytes() == (tmp_path / "single" / FEATURES).read_bytes()

    def neighbours(store: Path) -> list[dict[str, Any]]:
        result = tltk("neighbors", store, "--query-index", "0,40,106", "--k", "6", "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["queries"]

    assert neighbours(tmp_path / "merged") == neighbours(tmp_path / "single")
    described = json.loads(tltk("index", tmp_path / "merged", "--json").stdout)
    assert (described["count"], described["index"], described["layer"]) == (107, "flat", "fc7")


def test_extract_shard_json_describes_the_part(tmp_path: Path) -> None:
    result = tltk("extract", "lenet5", "--layer", "fc7", *CLI_DATA, "--out", tmp_path / "p1", "--shard", "1/2", *CLI_MODEL, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    # 7 batches of 16: shard 1 of 2 takes batches 3..6, rows 48..106
    assert (info["shard"], info["rows"], info["total"], info["count"], info["dim"]) == ([1, 2], [48, 107], 107, 59, 84)


# --- how shards are cut ---------------------------------------------------------------


@pytest.mark.parametrize("total,batch,n", [(107, 16, 1), (107, 16, 3), (107, 16, 7), (1797, 64, 4), (5, 1, 5), (100, 7, 6)])
def test_shards_are_runs_of_the_single_extractions_whole_batches_covering_every_row_once(total: int, batch: int, n: int) -> None:
    ranges = [shard_rows(total, batch, (i, n)) for i in range(n)]
    assert [row for r in ranges for row in r] == list(range(total))
    assert all(len(r) > 0 and r.start % batch == 0 for r in ranges)
    assert max(len(r) for r in ranges) - min(len(r) for r in ranges) <= batch


def test_more_shards_than_batches_is_refused_with_the_most_that_fit() -> None:
    with pytest.raises(TltkError, match="make 7 batches of --batch-size 16, too few for 8 shards; use at most 7 shards"):
        shard_rows(107, 16, (0, 8))


# --- a part is not a store ------------------------------------------------------------


def test_a_part_is_not_opened_as_a_store_and_says_which_shard_it_is(parts: dict[int, list[Path]]) -> None:
    with pytest.raises(TltkError, match=r"is shard 1 of 3 \(rows 32-63 of 107\) of a sharded extraction, not a searchable store"):
        FeatureStore.open(parts[3][1])
    assert open_part(parts[3][1]).rows == (32, 64)
    assert_one_sentence_error(tltk("neighbors", parts[3][1], "--query-index", "0"), "shard 1 of 3", "tltk index merge")
    assert_one_sentence_error(tltk("index", parts[3][1]), "not a searchable store")
    assert not (parts[3][1] / "index.faiss").exists()


# --- refusals -------------------------------------------------------------------------


def _merge_refused(tmp_path: Path, part_paths: list[Path], *fragments: str, extra: tuple[str, ...] = ()) -> None:
    out = tmp_path / "merged"
    assert_one_sentence_error(tltk("index", "merge", *part_paths, "--out", out, *extra), *fragments)
    assert nothing_left_at(out)


def test_merge_refuses_a_missing_shard(parts: dict[int, list[Path]], tmp_path: Path) -> None:
    _merge_refused(tmp_path, [parts[3][2], parts[3][0]], "shard 1/3 is missing", "all 3 parts")


def test_merge_refuses_a_shard_given_twice(parts: dict[int, list[Path]], tmp_path: Path) -> None:
    copy = tmp_path / "copy-of-part1"
    shutil.copytree(parts[3][1], copy)
    _merge_refused(tmp_path, [*parts[3], copy], "shard 1/3 is given twice", str(copy))


def test_merge_refuses_parts_of_extractions_cut_differently(parts: dict[int, list[Path]], tmp_path: Path) -> None:
    _merge_refused(tmp_path, [parts[3][0], parts[3][1], parts[2][1]], "parts of different extractions", "shard count differs: 3 and 2")


def test_merge_refuses_parts_of_another_model(parts: dict[int, list[Path]], tmp_path: Path) -> None:
    other = tmp_path / "other-seed"
    result = tltk("extract", "lenet5", "--layer", "fc7", *CLI_DATA, "--out", other, "--shard", "1/2", *CLI_MODEL, "--seed", "1")
    assert result.exit_code == 0, result.output
    _merge_refused(tmp_path, [parts[2][0], other], "parts of different extractions", "model, layer, pooling, metric or data differ")


def test_merge_refuses_parts_extracted_with_another_batch_size(parts: dict[int, list[Path]], lenet, tmp_path: Path) -> None:
    extract(lenet, "fc7", tmp_path / "b32", *DATA, loading=Loading(batch_size=32, device="cpu", workers=0), shard=(1, 2),
            **DATA_OPTIONS)
    _merge_refused(tmp_path, [parts[2][0], tmp_path / "b32"], "--batch-size differs: 16 and 32")


def test_merge_refuses_a_complete_store_among_the_parts(parts: dict[int, list[Path]], single: FeatureStore, tmp_path: Path) -> None:
    _merge_refused(tmp_path, [parts[2][0], single.path], "is a complete feature store, not a part")


@pytest.mark.parametrize("kind", ["missing", "empty directory", "file"])
def test_merge_refuses_what_is_not_a_part(kind: str, parts: dict[int, list[Path]], tmp_path: Path) -> None:
    target = tmp_path / "not-a-part"
    if kind == "empty directory":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    fragment = "does not exist" if kind == "missing" else "is not a part of a sharded extraction"
    _merge_refused(tmp_path, [parts[2][0], target], fragment)


def test_merge_refuses_the_leftovers_of_an_interrupted_shard(lenet, parts: dict[int, list[Path]], tmp_path: Path, monkeypatch) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > 16:
            raise KeyboardInterrupt  # a killed process: ...

    with monkeypatch.context() as patched:
        patched.setattr(writing.shutil, "rmtree", lambda *args, **kwargs: None)  # ... gets no chance to clean up
        with pytest.raises(KeyboardInterrupt):
            extract(lenet, "fc7", tmp_path / "part1", *DATA, loading=CPU, shard=(1, 2), progress=interrupt, **DATA_OPTIONS)
    assert not (tmp_path / "part1").exists()
    (leftover,) = tmp_path.glob(".part1.building-*")
    _merge_refused(tmp_path, [parts[2][0], tmp_path / "part1"], "part1 does not exist: its extraction was interrupted")
    _merge_refused(tmp_path, [parts[2][0], leftover], "holds an extraction that never finished")


def test_merge_refuses_a_part_whose_vectors_were_cut_short(parts: dict[int, list[Path]], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(parts[2][1], damaged)
    with open(damaged / FEATURES, "r+b") as handle:
        handle.truncate(100)
    _merge_refused(tmp_path, [parts[2][0], damaged], "is incomplete", "run that shard again")


def test_merge_refuses_an_existing_out_unless_overwrite_and_never_merges_into_a_part(
        parts: dict[int, list[Path]], single: FeatureStore, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert tltk("index", "merge", *parts[2], "--out", out).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    assert_one_sentence_error(tltk("index", "merge", *parts[3], "--out", out), "already holds a feature store", "--overwrite")
    assert (out / "manifest.json").read_bytes() == before
    assert tltk("index", "merge", *parts[3], "--out", out, "--overwrite").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == single.count
    assert not [p for p in tmp_path.glob(".merged.*") if p.name != ".merged.lock"]  # the writers' lock file stays
    assert_one_sentence_error(tltk("index", "merge", *parts[3], "--out", parts[3][0], "--overwrite"), "is one of the parts being merged")
    assert open_part(parts[3][0]).count == 32


@pytest.mark.parametrize("shard,fragment", [
    ("2/2", "is not a shard: write I/N with 0 <= I < N"),
    ("0/0", "is not a shard"),
    ("-1/2", "is not a shard"),
    ("1", "is not I/N"),
    ("a/b", "is not I/N"),
    ("0/8", "too few for 8 shards; use at most 7 shards"),
])
def test_extract_refuses_a_shard_that_is_not_one_of_n_and_writes_nothing(shard: str, fragment: str, tmp_path: Path) -> None:
    out = tmp_path / "part"
    result = tltk("extract", "lenet5", "--layer", "fc7", *CLI_DATA, "--out", out, "--shard", shard, *CLI_MODEL)
    assert_one_sentence_error(result, fragment)
    assert nothing_left_at(out)


def test_python_merge_needs_at_least_one_part(tmp_path: Path) -> None:
    with pytest.raises(TltkError, match="name the parts to merge"):
        merge_parts([], tmp_path / "merged")
