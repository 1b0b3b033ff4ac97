"""A small COCO dataset in the real layout: ``annotations/instances_{train,val}2017.json``
beside ``train2017/`` and ``val2017/``, with COCO's sparse category ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# COCO's own ids for these: sparse, and not in name order.
CATEGORIES = {1: "person", 3: "car", 18: "dog"}
Instances = list[tuple[int, bool]]  # (category id, iscrowd) per instance


def default_instances(index: int) -> Instances:
    """Image i shows category i % 3 and, every other image, a crowd of (i + 1) % 3; every seventh has none."""
    ids = list(CATEGORIES)
    if index % 7 == 6:
        return []
    return [(ids[index % 3], False)] + ([(ids[(index + 1) % 3], True)] if index % 2 else [])


def coco_document(images: list[tuple[int, str]], instances: dict[int, Instances],
                  categories: dict[int, str] = CATEGORIES) -> dict:
    """An instances_*.json document as COCO writes it (boxes and areas included, which tltk ignores)."""
    annotations = [
        {"id": len(images) * 10 + n, "image_id": image_id, "category_id": category_id, "iscrowd": int(crowd),
         "bbox": [1.0, 1.0, 8.0, 8.0], "area": 64.0, "segmentation": [[1, 1, 9, 1, 9, 9]]}
        for image_id, found in instances.items() for n, (category_id, crowd) in enumerate(found)
    ]
    return {
        "info": {"description": "tltk test"}, "licenses": [],
        "images": [{"id": image_id, "file_name": name, "width": 16, "height": 16} for image_id, name in images],
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "thing"} for i, name in categories.items()],
    }


def write_coco(root: Path, *, splits: dict[str, int] | None = None,
               instances: Callable[[int], Instances] = default_instances) -> Path:
    """``root/coco`` with ``splits[NAME]`` images in ``NAME/`` and ``annotations/instances_NAME.json``."""
    base = root / "coco"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = 0
    for split, count in (splits or {"train2017": 14, "val2017": 7}).items():
        (base / split).mkdir(exist_ok=True)
        images, found = [], {}
        for _ in range(count):
            image_id = 1000 + index
            name = f"{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(base / split / name)
            images.append((image_id, name))
            found[image_id] = instances(index)
            index += 1
        (base / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_document(images, found)))
    return base
