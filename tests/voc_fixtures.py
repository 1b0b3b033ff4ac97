"""A small PASCAL VOC tree in the real VOCdevkit layout, with real annotation XML."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from tltk.data.voc import VOC_CLASSES

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<annotation><object><name>&lol4;</name><difficult>0</difficult></object></annotation>
"""


def annotation_xml(image_id: str, objects: Iterable[tuple[str, bool]]) -> str:
    body = "".join(
        f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n"
        f"    <difficult>{int(difficult)}</difficult>\n"
        f"    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox>\n  </object>\n"
        for name, difficult in objects
    )
    return (
        f"<annotation>\n  <folder>VOC2007</folder>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size><width>24</width><height>24</height><depth>3</depth></size>\n{body}</annotation>\n"
    )


def default_objects(index: int) -> list[tuple[str, bool]]:
    """Image i shows classes i % 20 and (i + 7) % 20; every fifth image's second object is difficult."""
    first, second = VOC_CLASSES[index % 20], VOC_CLASSES[(index + 7) % 20]
    return [(first, False), (second, index % 5 == 0)]


def write_voc(root: Path, *, images: int = 40, splits: dict[str, range] | None = None,
              objects=default_objects) -> Path:
    """``root/VOCdevkit/VOC2007`` with ``images`` JPEGs; returns the VOCdevkit folder."""
    year = root / "VOCdevkit" / "VOC2007"
    for part in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / part).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(1, images + 1)]
    for index, image_id in enumerate(ids):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(year / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (year / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, objects(index)))
    splits = splits or {"train": range(0, images // 2), "val": range(images // 2, 3 * images // 4),
                        "test": range(3 * images // 4, images)}
    for name, members in splits.items():
        (year / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{ids[i]}\n" for i in members))
    return root / "VOCdevkit"
