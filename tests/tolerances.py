"""How closely two runs of the same training agree, by the precision they ran in.

Runs compared across process counts (or batch splits) take the same steps on the same
samples, but sum them in another order, and float rounding depends on the order:

- fp32 (24 significant bits): a reordered sum moves the last bits. Measured on the data-parallel
  tests: logged losses within 4.4e-7 relative, no prediction flipped, weight tensors within
  6e-4 (norm of the difference over the norm of the tensor) after 20 Adam steps with
  augmentation. Adam divides each update by the root of the squared-gradient average,
  which magnifies rounding in gradients near zero, hence the looser weight figure.
- bf16 (8 significant bits): autocast rounds every matmul and convolution output to bf16,
  whose rounding step is 2^-8 = 3.9e-3 relative, so a reordered batch moves a logged loss by
  up to about one such step (measured 7.6e-4), a prediction near a tie may flip (accuracies
  measured 1.4e-2 apart on 145 images, two flips), and Adam turns gradients that rounding
  decides the sign of into whole-step updates (weights measured 7.9e-2 apart after 20
  augmented Adam steps; 1.6e-3 with a frozen backbone).

So the tolerance is chosen from the precision a run actually used (summary.json), not from
the command line: ``--precision auto`` is bf16 on one CPU and fp32 on another. Comparisons
that are exact by construction (a resumed run against an uninterrupted one) stay exact in
every precision and do not use this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tolerance:
    loss: float  # relative, on every logged loss
    accuracy: float  # absolute, on every accuracy (a fraction of images whose prediction may flip)
    weights: float  # per tensor: |a - b| / |b| in Frobenius norms
    # Training moves each tensor this many times further from its start than the two runs are apart
    # (measured: 40x and more in fp32; in bf16 3.9x, then 2.3x for lenet5's last bias once the
    # light augmentation drew its numbers per image, the runs otherwise within `weights`).
    moved: float = 3.0


TOLERANCES = {
    "fp32": Tolerance(loss=1e-4, accuracy=1e-6, weights=5e-3),
    "bf16": Tolerance(loss=2 ** -8, accuracy=0.03, weights=0.15, moved=2.0),
}


def run_precision(run: Path) -> str:
    """The precision a finished run trained in, as it recorded it."""
    return json.loads((run / "summary.json").read_text())["precision"]


def tolerance_for(*runs: Path) -> Tolerance:
    """The tolerance for comparing runs; they must have trained in the same precision."""
    precisions = {run_precision(run) for run in runs}
    assert len(precisions) == 1, f"the compared runs trained in different precisions: {sorted(precisions)}"
    return TOLERANCES[precisions.pop()]
