"""Datasets for tltk: reading formats, splitting, and image preprocessing.

``load_data(spec)`` gives ``DataSplits``; ``build_transforms`` and ``ImageDataset`` turn
its samples into tensors. The transform names are imported on first use, so that
``import tltk.data`` (and commands that only list or validate data) do not pay for
importing torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tltk.data import builtin, cifar10, csvfile, folder, mnist  # noqa: F401  (readers; declared as entry points)
from tltk.data.builtin import BUILTIN_DATASETS
from tltk.data.formats import DATA_FORMATS, FormatReader
from tltk.data.images import IMAGE_EXTENSIONS, load_image, scan_image_files, validate_images
from tltk.data.samples import DataSplits, RawDataset, Sample
from tltk.data.specs import detect_format, load_data, parse_spec, resolve_spec

if TYPE_CHECKING:
    from tltk.data.transforms import AUGMENT_PRESETS, ImageDataset, build_transforms

_LAZY = {"AUGMENT_PRESETS", "ImageDataset", "build_transforms"}

__all__ = [
    "AUGMENT_PRESETS",
    "BUILTIN_DATASETS",
    "DATA_FORMATS",
    "DataSplits",
    "FormatReader",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "RawDataset",
    "Sample",
    "build_transforms",
    "detect_format",
    "load_data",
    "load_image",
    "parse_spec",
    "resolve_spec",
    "scan_image_files",
    "validate_images",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("tltk.data.transforms"), name)
    raise AttributeError(f"module 'tltk.data' has no attribute '{name}'")
