"""PASCAL VOC as distributed: ``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}``.

An image is positive for every class with an object in it. As in the VOC devkit's
classification ground truth, an image whose only objects of a class are marked
difficult gets label -1 ("ignored") for that class: it counts neither as a positive nor
as a negative when scoring, unless ``--voc-difficult`` says otherwise. Annotation XML is
parsed with defusedxml, so entity-expansion bombs and external entities are refused.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from tltk.data.formats import DATA_FORMATS
from tltk.data.images import validate_images
from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError, printable

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1
VOC_SPLITS = ("train", "val", "test")


@DATA_FORMATS.register("voc")
def read_voc(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A VOCdevkit folder (or one year's folder inside it): 20 classes, multi-label."""
    year_dir = find_voc_dir(path)
    if year_dir is None:
        raise DataError(
            f"{path} is not a PASCAL VOC folder; expected VOCdevkit/VOC2007 with JPEGImages/, "
            f"Annotations/ and ImageSets/Main/."
        )
    splits = {name: ids for name in VOC_SPLITS if (ids := read_image_set(year_dir, name)) is not None}
    if "train" not in splits and (trainval := read_image_set(year_dir, "trainval")) is not None:
        splits["train"] = trainval
    if not splits:
        raise DataError(
            f"{year_dir / 'ImageSets' / 'Main'} has none of train.txt, trainval.txt, val.txt, test.txt; "
            f"the VOC folder is incomplete."
        )
    labelled = {name: [_sample(year_dir, image_id, where) for image_id, where in ids] for name, ids in splits.items()}
    return _drop_undecodable(labelled, year_dir, strict)


def find_voc_dir(path: Path) -> Path | None:
    """The year folder: ``path`` itself, or the first VOC20xx inside it (VOC2007 first)."""
    if _is_year_dir(path):
        return path
    if path.is_dir():
        for child in sorted(path.glob("VOC20*")) + sorted(path.glob("*/VOC20*")):
            if _is_year_dir(child):
                return child
    return None


def _is_year_dir(path: Path) -> bool:
    return all((path / part).is_dir() for part in ("JPEGImages", "Annotations", "ImageSets/Main"))


def read_image_set(year_dir: Path, split: str) -> list[tuple[str, str]] | None:
    """(image id, "file:line") per line of ImageSets/Main/SPLIT.txt, or None if absent."""
    listing = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        return None
    ids = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        image_id = line.strip().split(" ")[0] if line.strip() else ""
        if image_id:
            ids.append((image_id, f"{listing}:{number}"))
    return ids


def _sample(year_dir: Path, image_id: str, listed_at: str) -> Sample:
    image = year_dir / "JPEGImages" / f"{image_id}.jpg"
    annotation = year_dir / "Annotations" / f"{image_id}.xml"
    for needed, what in ((image, "JPEG"), (annotation, "annotation XML")):
        if not needed.is_file():
            raise DataError(f"{listed_at} lists image {image_id} but its {what} {needed} does not exist; "
                            f"restore the file or remove the line.")
    return Sample(str(image.absolute()), parse_annotation(annotation), f"JPEGImages/{image_id}.jpg")


def parse_annotation(path: Path) -> tuple[int, ...]:
    """Per-class labels of one annotation file: 1 positive, 0 negative, -1 only difficult objects."""
    root = _parse_xml(path)
    labels = [NEGATIVE] * len(VOC_CLASSES)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(
                f"{path}:{_line_of(path, name)} names class '{printable(name)}', which is not one of the 20 VOC classes; "
                f"fix the annotation."
            )
        index = VOC_CLASSES.index(name)
        if (obj.findtext("difficult") or "0").strip() == "1":
            labels[index] = POSITIVE if labels[index] == POSITIVE else IGNORED
        else:
            labels[index] = POSITIVE
    return tuple(labels)


def _parse_xml(path: Path) -> Element:
    try:
        return SafeET.parse(str(path)).getroot()
    except DefusedXmlException as exc:
        raise DataError(f"{path} was refused: it declares XML entities ({type(exc).__name__}), "
                        f"which annotation files never need; replace the file.") from exc
    except SafeET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({exc}); fix or restore the annotation.") from exc


def _line_of(path: Path, name: str) -> int:
    text = path.read_text(encoding="utf-8", errors="replace")
    at = text.find(f"<name>{name}")
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def _drop_undecodable(labelled: dict[str, list[Sample]], year_dir: Path, strict: bool) -> RawDataset:
    files = [Path(s.source) for samples in labelled.values() for s in samples]
    good, bad = validate_images(list(dict.fromkeys(files)), strict=strict)
    decodable = {str(p.absolute()) for p in good}
    splits = {name: [s for s in samples if s.source in decodable] for name, samples in labelled.items()}
    return RawDataset(list(VOC_CLASSES), splits, str(year_dir), skipped=[str(p.absolute()) for p in bad])
