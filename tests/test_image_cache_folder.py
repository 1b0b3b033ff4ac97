"""The decoded-image cache folder: what it holds, clearing it, and the files of killed decodings.

The cache keeps decoded training images between runs and never empties itself, so a user
must be able to see it and clear it (`tltk cache info`, `tltk cache clear`); and a run
killed while decoding must not leave its half-written file there for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.data import ImageDataset, build_transforms, load_data
from tltk.errors import SettingError
from tltk.train import image_cache

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(image_cache.fcntl is None, reason="file locks are POSIX here")


def image_set(root: Path, size: int, per_class: int = 4) -> ImageDataset:
    rng = np.random.default_rng(size)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    data = load_data(f"folder:{root}", val_split=0.0, test_split=0.0)
    return ImageDataset(data.train, build_transforms((size, size), (0.5,) * 3, (0.25,) * 3, "none", train=True))


def cache_into(dataset: ImageDataset, root: Path) -> image_cache.DecodedImages:
    decoded = image_cache.open_images(dataset, image_cache.batch_form(dataset.transform), 2**30, root=root)
    assert isinstance(decoded, image_cache.DecodedImages)
    return decoded


def cache_dated(dataset: ImageDataset, root: Path, days_ago: float) -> None:
    """Cache ``dataset`` as if a run had last used it ``days_ago`` days ago."""
    decoded = cache_into(dataset, root)
    assert decoded.path is not None
    when = time.time() - days_ago * 86400
    os.utime(decoded.path, (when, when))


def test_entries_list_each_set_with_its_shape_and_size_most_recently_used_first(tmp_path: Path) -> None:
    """Two data sets at two sizes are two entries; reading the older one back makes it the most recent."""
    root = tmp_path / "cache"
    first, second = image_set(tmp_path / "one", 16), image_set(tmp_path / "two", 12)
    cache_dated(first, root, days_ago=3)
    cache_dated(second, root, days_ago=2)  # dates set apart: a coarse file-system clock cannot tie them
    entries = image_cache.cache_entries(root)
    assert [(e.images, e.height, e.width) for e in entries] == [(8, 12, 12), (8, 16, 16)]
    assert all(e.bytes == e.path.stat().st_size > e.images * 3 * e.height * e.width for e in entries)
    again = cache_into(first, root)
    assert again.reused
    assert [e.height for e in image_cache.cache_entries(root)] == [16, 12]  # reuse renewed its date


def test_clear_older_than_keeps_what_runs_still_use_and_clear_removes_everything(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    used, stale = image_set(tmp_path / "used", 16), image_set(tmp_path / "stale", 12)
    cache_dated(stale, root, days_ago=10)
    cache_dated(used, root, days_ago=1)
    stale_bytes = image_cache.cache_entries(root)[1].bytes

    cleared = image_cache.clear_cache(root, older_than_days=7)
    assert (cleared.removed, cleared.removed_bytes, cleared.kept) == (1, stale_bytes, 1)
    assert [e.height for e in image_cache.cache_entries(root)] == [16]
    assert image_cache.clear_cache(root).to_dict()["removed"] == 1
    assert image_cache.cache_entries(root) == [] and not cache_into(used, root).reused  # decoded again
    with pytest.raises(SettingError, match="older_than_days must be 0 or more"):
        image_cache.clear_cache(root, older_than_days=-1)


# Holds a lock on a decoding file as a live decoding run does, until its stdin closes.
DECODER = """
import fcntl, os, sys
handle = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(handle, fcntl.LOCK_EX)
print("decoding", flush=True)
sys.stdin.read()
"""


def test_a_killed_decodings_file_is_removed_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    """Abandoned (no process holds its lock): removed by the next decoding run. Held by a live
    process: left alone, by the next run and by `clear` alike."""
    root = tmp_path / "cache"
    root.mkdir()
    abandoned, live = root / ".decoding-dead1.npy", root / ".decoding-live1.npy"
    abandoned.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 500)
    holder = subprocess.Popen([sys.executable, "-c", DECODER, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "decoding"
        cache_into(image_set(tmp_path / "data", 12), root)
        assert not abandoned.exists() and live.exists()
        cleared = image_cache.clear_cache(root)
        assert live.exists() and cleared.removed == 1  # the complete set; the live decoding stays
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert image_cache.clear_cache(root).to_dict() == {"removed": 1, "removed_bytes": 500, "kept": 0}
    assert list(root.iterdir()) == []


def test_a_decoding_run_killed_midway_leaves_a_file_the_next_run_removes(tmp_path: Path) -> None:
    """SIGKILL a process while it decodes into the cache: its half-written file stays, and the
    next run's decoding removes it (its lock died with it)."""
    root = tmp_path / "cache"
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from test_image_cache_folder import image_set
from tltk.train import image_cache
def decode(self, image):
    print("decoding", flush=True)
    time.sleep(60)
image_cache.BatchAugment.decode = decode
dataset = image_set(Path({str(tmp_path / 'killed')!r}), 12)
image_cache.open_images(dataset, image_cache.batch_form(dataset.transform), 2**30, root=Path({str(root)!r}))
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "decoding"
    child.kill()
    child.wait(timeout=30)
    assert len(list(root.glob(".decoding-*.npy"))) == 1
    cache_into(image_set(tmp_path / "next", 12), root)
    assert list(root.glob(".decoding-*.npy")) == []


def test_cli_info_and_clear_report_the_cache_named_by_TLTK_CACHE(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TLTK_CACHE", str(tmp_path / "tltk-cache"))
    cache_into(image_set(tmp_path / "data", 12), image_cache.cache_root())
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "info", "--json"])
    assert listed.exit_code == 0, listed.output
    record = json.loads(listed.output)
    assert record["folder"] == str(tmp_path / "tltk-cache" / "images")
    assert [(e["images"], e["height"], e["width"]) for e in record["entries"]] == [(8, 12, 12)]
    assert record["bytes"] == record["entries"][0]["bytes"] > 8 * 3 * 12 * 12
    shown = runner.invoke(main, ["cache", "info"])
    assert shown.exit_code == 0 and "1 image set," in shown.output
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 file" in cleared.output
    assert json.loads(runner.invoke(main, ["cache", "info", "--json"]).output)["entries"] == []
    refused = runner.invoke(main, ["cache", "clear", "--older-than-days", "-2"])
    assert refused.exit_code != 0 and "--older-than-days must be 0 or more" in refused.output
    assert "Traceback" not in refused.output
