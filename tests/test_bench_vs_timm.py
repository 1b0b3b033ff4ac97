"""The helpers of benchmarks/bench_vs_timm.py: the data set both tools read, the two
commands' shared settings, and how each side's accuracy is read back. timm's train.py
itself is not run here (it is not part of this repository, and a run takes minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_vs_timm

        yield bench_vs_timm
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_data_set_is_an_image_folder_tltk_reads_as_train_and_validation(bench, tmp_path):
    """train/ and validation/ with one folder per digit, JPEGs of the asked size and
    count; tltk's folder format takes validation/ as its validation split."""
    from tltk.data import load_data

    root = bench.write_coloured_digits(tmp_path / "digits", train_images=30, validation_images=12, size=16)
    train = sorted((root / "train").glob("*/*.jpg"))
    validation = sorted((root / "validation").glob("*/*.jpg"))
    assert (len(train), len(validation)) == (30, 12)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    with Image.open(train[0]) as image:
        assert (image.size, image.mode) == ((16, 16), "RGB")
    data = load_data(f"folder:{root}", test_split=0.0)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 12, 0)
    assert data.class_names == [str(d) for d in range(10)]


def test_the_data_set_is_made_once_and_its_pictures_differ(bench, tmp_path):
    """A second call with the same settings rewrites nothing (the marker file), and two
    drawings of digits are not the same picture (random size, place and colours)."""
    root = bench.write_coloured_digits(tmp_path / "digits", train_images=20, validation_images=10, size=16)
    first = root / "train" / "0" / "00000.jpg"
    stamp = first.stat().st_mtime_ns
    bench.write_coloured_digits(root, train_images=20, validation_images=10, size=16)
    assert first.stat().st_mtime_ns == stamp
    digit = np.zeros((8, 8), np.uint8)
    digit[2:6, 3:5] = 255
    rng = np.random.default_rng(0)
    a, b = (np.asarray(bench.draw_digit(digit, 32, rng), np.int16) for _ in range(2))
    assert a.shape == (32, 32, 3) and np.abs(a - b).mean() > 10


def test_both_commands_get_the_same_model_size_batch_epochs_and_workers(bench, tmp_path):
    """What the comparison sets alike appears on both command lines with the same values."""
    setup = bench.Setup(tmp_path, image_size=48, batch_size=32, epochs=4, workers=3)
    timm = bench.timm_command(tmp_path / "train.py", setup, tmp_path / "t")
    tltk = bench.tltk_command(setup, tmp_path / "k")

    def value(command: list[str], *flags: str) -> str:
        index = next(i for i, item in enumerate(command) if item in flags)
        return command[index + 1]

    assert value(timm, "--model") == value(tltk, "--backbone") == "resnet18"
    assert value(timm, "--img-size") == value(tltk, "--input-size") == "48"
    assert value(timm, "-b") == value(tltk, "--batch-size") == "32"
    assert value(timm, "--epochs") == value(tltk, "--epochs") == "4"
    assert value(timm, "--workers") == value(tltk, "--workers") == "3"
    assert value(tltk, "--weights") == "none" and "--pretrained" not in timm
    assert value(timm, "--data-dir") == str(tmp_path) and value(tltk, "--data") == f"folder:{tmp_path}"


def test_extra_flags_go_to_their_own_side_only(bench, tmp_path):
    """--timm-extra / --tltk-extra add flags to one command and leave the other as it was."""
    plain = bench.Setup(tmp_path, 64, 64, 1, 2)
    extra = bench.Setup(tmp_path, 64, 64, 1, 2, timm_extra=("--amp", "--amp-dtype", "bfloat16"),
                        tltk_extra=("--precision", "fp32"))
    timm = bench.timm_command(tmp_path / "train.py", extra, tmp_path / "t")
    assert timm[-3:] == ["--amp", "--amp-dtype", "bfloat16"] and "--precision" not in timm
    assert timm[:-3] == bench.timm_command(tmp_path / "train.py", plain, tmp_path / "t")
    tltk = bench.tltk_command(extra, tmp_path / "k")
    assert tltk[-2:] == ["--precision", "fp32"] and "--amp" not in tltk
    assert tltk[:-2] == bench.tltk_command(plain, tmp_path / "k")


def test_each_sides_accuracy_is_read_from_its_last_epoch(bench, tmp_path):
    """timm's summary.csv holds percent per epoch: the last row, as a fraction; tltk's
    summary.json: the final epoch's validation accuracy."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "summary.csv").write_text(
        "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,2.3,2.2,31.5,80.0,0.01\n1,1.9,1.7,47.25,90.0,0.02\n"
    )
    assert bench.timm_accuracy(tmp_path) == pytest.approx(0.4725)
    (tmp_path / "summary.json").write_text('{"best_val_accuracy": 0.9, "final": {"val_accuracy": 0.75}}')
    assert bench.tltk_accuracy(tmp_path) == pytest.approx(0.75)


def test_the_children_import_this_checkout_and_share_the_threads(bench, monkeypatch):
    """Both commands see the same OMP_NUM_THREADS, and `python -m tltk.cli` imports the
    tltk beside the benchmark, not another installed copy; 0 threads leaves it unset."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = bench.child_environment(1)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(BENCHMARKS.parent)
    assert "OMP_NUM_THREADS" not in bench.child_environment(0)


def test_a_command_reports_the_cpu_time_of_its_whole_process_tree(bench, tmp_path):
    """CPU seconds count the work of the processes a command starts (timm's loader
    workers), not only its own; a command that fails stops the benchmark with its output."""
    burn = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(range(3 * 10**7))'], check=True)"
    seconds = bench.run_command([sys.executable, "-c", burn], dict(), tmp_path / "log")
    assert seconds > 0.2
    with pytest.raises(SystemExit, match="exited with 3:\n.*gone wrong"):
        bench.run_command([sys.executable, "-c", "import sys; print('gone wrong'); sys.exit(3)"], dict(),
                          tmp_path / "log")


def test_the_report_prints_both_ratios_and_says_whether_the_goal_is_met(bench, capsys):
    """The wall-time ratio is tltk / timm per repeat (median); the goal needs both the
    ratio and the accuracy."""
    runs = {bench.TIMM: bench.Runs([0.60, 0.62], [200.0, 220.0], [1.0, 1.0]),
            bench.TLTK: bench.Runs([0.70, 0.71], [80.0, 90.0], [1.0, 1.0], [50.0, 60.0])}
    bench.report({bench.TIMM: [100.0, 120.0], bench.TLTK: [40.0, 66.0]}, runs)
    out = capsys.readouterr().out
    assert "wall time tltk / timm: 0.475" in out and "goal met" in out
    assert "CPU time tltk / timm (whole process trees; less moved by other jobs than the wall clock): 0.405" in out
    runs[bench.TLTK].accuracy = [0.5, 0.5]
    bench.report({bench.TIMM: [100.0, 120.0], bench.TLTK: [40.0, 66.0]}, runs)
    assert "accuracy WORSE" in capsys.readouterr().out
