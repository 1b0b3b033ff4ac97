"""Peak memory of extraction, prediction, evaluation and ``index --add`` at two dataset sizes.

Each (operation, size) runs in a fresh child process, which reports its own peak resident
set size (``VmHWM`` of /proc/self/status, the same figure as ``ru_maxrss``); the ratio is
the peak at the large size over the peak at the small one (goal: at most 1.10). The
images are ``synthetic:N`` (``tltk.data.synthetic``): 8 x 8 RGB made from their row
number when read, so nothing large is stored and only tltk's own bookkeeping can grow.

- extract: ``tltk.features.extract`` of ``fc7`` (16-d) of ``tiny8`` (a 3x3 convolution and a dense
  layer, defined here) into a new store; the
  peak is also read when the last row has streamed to disk, before the FAISS index is
  built (``rows``), since an index holds its vectors in memory by design.
  ``--index auto`` builds an exact (flat) index below 50,000 rows and an IVF one above,
  so ``extract-flat`` repeats it with ``--index flat`` at both sizes, to tell the IVF
  machinery (k-means, the recall probe) from growth with the number of rows.
- add: ``tltk.features.add_images`` of N images to a store of 1,000 (``tltk index --add``).
- predict: ``Run.export_predictions`` of a Kaggle CSV (``tltk predict``) for the test split
  of ``synthetic:N`` carved with ``--test-split 0.95`` (95% of the images).
- evaluate: ``Run.evaluate`` of the same split (multi-class: a tally per batch).

Run: ``python benchmarks/bench_memory_scale.py`` (sizes 10,000 and 200,000; several
minutes on two cores, most of it the 200,000-image passes; ``--sizes 2000 20000`` for a
quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = ("extract", "add", "predict", "evaluate", "extract-flat")
BATCH = 256
TEST_SPLIT = 0.95  # predict and evaluate the test split: 95% of synthetic:N


def register_synthetic() -> None:
    """The ``synthetic`` data format and the ``tiny8`` backbone, for this process only."""
    from tltk.data.synthetic import read_synthetic
    from tltk.registry import BACKBONES, DATA_FORMATS

    DATA_FORMATS.add("synthetic", read_synthetic)
    BACKBONES.add("tiny8", tiny8)


def tiny8(pretrained: bool = False):  # noqa: ANN201 - a tltk Backbone
    """One 3x3 convolution and a dense layer of 16 on 8 x 8 images: the model costs little,
    so the figures show tltk's bookkeeping rather than a network's arithmetic."""
    from torch import nn

    from tltk.backbones.small import conv_then_dense, no_pretrained

    no_pretrained("tiny8", pretrained)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    fc = nn.Sequential(nn.Linear(8 * 4 * 4, 16), nn.ReLU())
    return conv_then_dense("tiny8", features, fc, 8, {"conv1": "features.1", "fc7": "fc.1"})


def peak_mib() -> float:
    """This process's peak resident set so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- the child: one operation at one size ------------------------------------------------


def loading():  # noqa: ANN201 - tltk.features.Loading, imported late so the parent stays light
    from tltk.features import Loading

    return Loading(batch_size=BATCH, device="cpu", workers=0)


def do_extract(size: int, work: Path, report: dict, index: str = "auto") -> None:
    from tltk.features import IndexOptions, extract, load_source

    def progress(done: int, total: int) -> None:
        if done == total:
            report["rows_peak_mib"] = peak_mib()

    source = load_source("tiny8", weights="none", seed=0)
    extract(source, "fc7", work / f"store-{index}-{size}", f"synthetic:{size}", loading=loading(), progress=progress,
            index=IndexOptions(kind=index))


def do_extract_flat(size: int, work: Path, report: dict) -> None:
    do_extract(size, work, report, index="flat")


def do_add(size: int, work: Path, report: dict) -> None:
    from tltk.features import FeatureStore, add_images

    store = work / f"added-{size}"
    shutil.copytree(work / "base-store", store)
    add_images(FeatureStore.open(store), f"synthetic:{size}", loading=loading())


def do_predict(size: int, work: Path, report: dict) -> None:
    from tltk.run import load_run

    written = load_run(work / "run").export_predictions(work / f"predictions-{size}.csv", "kaggle", f"synthetic:{size}",
                                                        "test", device="cpu", batch_size=BATCH, workers=0,
                                                        exporter_options={"id_from": "path"}, test_split=TEST_SPLIT)
    report["rows"] = written.rows


def do_evaluate(size: int, work: Path, report: dict) -> None:
    from tltk.run import load_run

    result = load_run(work / "run").evaluate("test", f"synthetic:{size}", device="cpu", batch_size=BATCH,
                                             test_split=TEST_SPLIT)
    report["rows"] = result["n"]


CHILD: dict[str, Callable[[int, Path, dict], None]] = {
    "extract": do_extract, "add": do_add, "predict": do_predict, "evaluate": do_evaluate,
    "extract-flat": do_extract_flat,
}


def child(operation: str, size: int, work: Path) -> None:
    import torch

    import tltk.features  # noqa: F401 - imported before the start figure, as every operation needs it
    import tltk.run  # noqa: F401

    torch.set_num_threads(1)
    register_synthetic()
    report: dict = {"operation": operation, "size": size, "start_mib": peak_mib()}
    started = time.perf_counter()
    CHILD[operation](size, work, report)
    report.update(seconds=round(time.perf_counter() - started, 1), peak_mib=peak_mib())
    print(json.dumps(report))


# --- the parent: set-up, one child per case, the table ------------------------------------


def setup(work: Path) -> None:
    """A tiny trained run and a store of 500 images to add to, made in a child of their own."""
    run_child(["--setup", str(work)])


def do_setup(work: Path) -> None:
    import torch

    from tltk.features import extract, load_source
    from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
    from tltk.train.trainer import TrainConfig

    torch.set_num_threads(1)
    register_synthetic()
    train = TrainConfig(epochs=1, batch_size=64, workers=0, device="cpu")
    finetune(FinetuneConfig(backbone="tiny8", weights="none", data=DataOptions("synthetic:2000"), train=train),
             work / "run")
    extract(load_source("tiny8", weights="none", seed=0), "fc7", work / "base-store", "synthetic:500",
            loading=loading())


def run_child(arguments: list[str]) -> str:
    """Run this script again in a fresh process, importing tltk from this checkout."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def measure(operation: str, size: int, work: Path) -> dict:
    lines = run_child(["--child", operation, str(size), str(work)]).strip().splitlines()
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 200_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--operations", nargs="+", choices=OPERATIONS, default=list(OPERATIONS))
    parser.add_argument("--child", nargs=3, metavar=("OPERATION", "SIZE", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return
    if args.setup:
        do_setup(Path(args.setup))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_line

    print(machine_line())
    small, large = args.sizes
    with tempfile.TemporaryDirectory(prefix="tltk-memory-") as tmp:
        work = Path(tmp)
        setup(work)
        print(f"{'operation':<10}{'images':>9}{'start MiB':>11}{'peak MiB':>10}{'rows MiB':>10}{'seconds':>9}")
        for operation in args.operations:
            reports = [measure(operation, size, work) for size in (small, large)]
            for r in reports:
                rows = f"{r['rows_peak_mib']:.0f}" if "rows_peak_mib" in r else ""
                print(f"{operation:<10}{r.get('rows', r['size']):>9}{r['start_mib']:>11.0f}{r['peak_mib']:>10.0f}{rows:>10}{r['seconds']:>9}")
            ratio = reports[1]["peak_mib"] / reports[0]["peak_mib"]
            line = f"  peak ratio {large}/{small}: {ratio:.3f} (goal at most 1.10)"
            if "rows_peak_mib" in reports[0]:
                line += f"; until the index is built: {reports[1]['rows_peak_mib'] / reports[0]['rows_peak_mib']:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
