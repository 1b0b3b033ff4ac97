"""The transfer demo that `make demo` runs: its data halves and one short end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

DEMO = Path(__file__).resolve().parents[1] / "examples" / "transfer_demo.py"


@pytest.fixture(scope="module")
def demo():
    # Loading the demo pins torch's kernels through environment variables (for processes it
    # starts); they must not leak into the subprocesses of later tests.
    environment = dict(os.environ)
    spec = importlib.util.spec_from_file_location("transfer_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the kernel pin is for x86 CPUs")
def test_the_demo_keeps_torch_to_its_avx2_kernels_so_every_x86_cpu_prints_the_same_table():
    # AVX-512 kernels sum in another order: the fine-tuned run's accuracy moved by 4 images of 180.
    script = (f"import runpy; runpy.run_path({str(DEMO)!r}, run_name='demo'); import torch; "
              f"print(torch.backends.cpu.get_cpu_capability())")
    environment = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    shown = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.split()[-1] == "AVX2"


def _written(folder: Path) -> dict[int, tuple[str, Path]]:
    """Digit index -> (class folder, file) of every PNG under ``folder``."""
    return {int(path.stem.removeprefix("digit")): (path.parent.name, path) for path in folder.glob("*/*.png")}


def test_the_halves_share_no_image_and_cover_all_of_them(demo, tmp_path):
    source, target = demo.write_digit_folders(tmp_path / "data", seed=0)
    in_source, in_target = _written(source), _written(target)
    assert not set(in_source) & set(in_target)
    assert set(in_source) | set(in_target) == set(range(1797))
    assert abs(len(in_source) - len(in_target)) <= 1


def test_labels_are_the_digit_in_the_source_and_its_parity_in_the_target(demo, tmp_path):
    source, target = demo.write_digit_folders(tmp_path / "data", seed=3)
    digits = load_digits()
    assert all(label == str(digits.target[i]) for i, (label, _) in _written(source).items())
    assert all(label == ("even", "odd")[digits.target[i] % 2] for i, (label, _) in _written(target).items())
    assert {label for label, _ in _written(target).values()} == {"even", "odd"}


def test_pixels_are_those_of_builtin_digits(demo, tmp_path):
    from tltk.data import load_data

    builtin = load_data("builtin:digits", val_split=0.0, test_split=0.0)
    source, _ = demo.write_digit_folders(tmp_path / "data", seed=0)
    index, (_, path) = next(iter(_written(source).items()))
    assert np.array_equal(np.asarray(Image.open(path)), builtin.arrays[index].squeeze(-1))


def test_another_seed_rewrites_the_folders_instead_of_mixing_halves(demo, tmp_path):
    demo.write_digit_folders(tmp_path / "data", seed=0)
    source, target = demo.write_digit_folders(tmp_path / "data", seed=1)
    assert len(_written(source)) + len(_written(target)) == 1797


@pytest.mark.slow  # the three demo runs and their report
def test_the_demo_runs_end_to_end_and_reports_three_test_accuracies(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["transfer_demo", "--out", str(tmp_path / "demo"), "--epochs", "1",
                                      "--per-class", "2"])
    demo.main()
    *_, table_line, report_line = capsys.readouterr().out.strip().splitlines()
    # It ends with the path of the three runs' report page, their ablation table first.
    page = Path(report_line.removeprefix("report: "))
    assert page == tmp_path / "demo" / "report.html"
    assert 'data-table="ablation"' in page.read_text(encoding="utf-8")
    report = json.loads(table_line)
    assert set(report) == {"transfer, frozen backbone", "transfer, fine-tuned", "from scratch"}
    assert all(0.0 <= accuracy <= 1.0 for accuracy in report.values())
    for run in ("source", "transfer-frozen-backbone", "transfer-fine-tuned", "from-scratch"):
        # fp32 whatever the CPU, so the README's table is the one every machine prints.
        assert json.loads((tmp_path / "demo" / run / "summary.json").read_text())["precision"] == "fp32"
