"""Fixtures shared by the test files, and the precision the precision-sensitive tests train in."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from tltk.runtime import cpu_has_native_bf16

PRECISION_CHOICES = ("auto", "fp32", "bf16", "other")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--precision", choices=PRECISION_CHOICES, default="auto",
        help="precision the tests marked `precision` train in: auto (what this CPU picks, as a user gets), fp32, "
             "bf16 (emulated and slower where the CPU lacks it), or other: the one auto does not pick here.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "precision: trains in the precision of --precision; `make test` runs these "
                                       "tests a second time with --precision other, so both paths run on every CPU")
    config.addinivalue_line("markers", "slow: an end-to-end test of several processes; left out of a plain `pytest` "
                                       "(`-m slow` runs them; `make test` runs every test)")
    # Decoded training images go to a folder of the test session's own, not the user's cache
    # (set before any test builds the environment of a `tltk` subprocess); removed at the end.
    if "TLTK_CACHE" not in os.environ:
        os.environ["TLTK_CACHE"] = _SESSION_CACHE[0] = tempfile.mkdtemp(prefix="tltk-test-cache-")


_SESSION_CACHE: list[str] = [""]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE[0]:
        shutil.rmtree(_SESSION_CACHE[0], ignore_errors=True)
        os.environ.pop("TLTK_CACHE", None)


def precision_for(choice: str) -> str:
    """The --precision value the tests pass on: ``other`` is bf16 on a CPU without native bf16
    (where auto means fp32) and fp32 on one with it (where auto means bf16)."""
    if choice == "other":
        return "fp32" if cpu_has_native_bf16() else "bf16"
    return choice


@pytest.fixture(scope="session")
def train_precision(request: pytest.FixtureRequest) -> str:
    """The --precision the precision-sensitive tests train with (their tolerances follow the
    precision each run recorded in summary.json, not this choice: auto resolves per machine)."""
    return precision_for(request.config.getoption("--precision"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny training runs: on a small shared machine two
    threads wait on each other at every operation while a neighbour holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
