"""PASCAL VOC as distributed, and the "Pascal VOC" folders annotation tools export:
``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}``.

The classes are the object names in the annotations of the listed images, sorted, so the
real PASCAL data keeps its 20 classes in their usual (alphabetical) order, and an export
from labelImg, CVAT, Roboflow or Label Studio gets its own classes. A ``labels.txt`` or
``classes.txt`` beside ImageSets fixes the classes and their order instead (an annotation
naming a class it does not list is then an error, as a typo would be).

An image is positive for every class with an object in it. As in the VOC devkit's
classification ground truth, an image whose only objects of a class are marked
difficult gets label -1 ("ignored") for that class: it counts neither as a positive nor
as a negative when scoring, unless ``--voc-difficult`` says otherwise. Annotation XML is
parsed with defusedxml, so entity-expansion bombs and external entities are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from tltk.data.formats import drop_undecodable
from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError, printable

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1
VOC_SPLITS = ("train", "val", "test")
# Files beside ImageSets that fix the classes and their order, one name a line.
LABEL_FILES = ("labels.txt", "classes.txt")


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of an annotation: its class name and whether it is marked difficult."""

    name: str
    difficult: bool


@dataclass(frozen=True)
class _Listed:
    """One listed image with the objects its annotation holds."""

    image: Path
    annotation: Path
    objects: tuple[VocObject, ...]


def read_voc(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A VOCdevkit folder (or one year's folder inside it), multi-label: the PASCAL 20 classes
    or the export's own (see the module docstring for how the classes are found)."""
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
    listed = {name: [_listed(year_dir, image_id, where) for image_id, where in ids] for name, ids in splits.items()}
    declared = read_label_file(year_dir)
    class_names = declared[1] if declared is not None else _annotated_classes(listed)
    labelled = {
        name: [
            Sample(str(item.image.absolute()), image_labels(item.objects, class_names, item.annotation,
                                                            declared[0] if declared else None),
                   f"JPEGImages/{item.image.name}")
            for item in items
        ]
        for name, items in listed.items()
    }
    return drop_undecodable(labelled, class_names, year_dir, strict)


def read_label_file(year_dir: Path) -> tuple[Path, list[str]] | None:
    """(the file, its class names in order) from labels.txt or classes.txt, or None if neither.

    One name a line; blank lines and lines starting with '#' are skipped. Both files may be
    present only if they list the same classes, so that which one counts never matters.
    """
    found = [(file, _label_names(file)) for name in LABEL_FILES if (file := year_dir / name).is_file()]
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise DataError(
            f"{found[0][0]} and {found[1][0]} list different classes; keep the one that is right and delete the other."
        )
    return found[0] if found else None


def _label_names(file: Path) -> list[str]:
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc}); save it as UTF-8, one class name a line.") from exc
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise DataError(f"{file} lists no classes; write one class name a line, or delete it to use the annotations' names.")
    duplicate = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if duplicate is not None:
        raise DataError(f"{file} lists class '{printable(duplicate)}' twice; keep one line per class.")
    return names


def _annotated_classes(listed: dict[str, list[_Listed]]) -> list[str]:
    """Every object name in the listed annotations, sorted: the PASCAL 20 in their usual order."""
    return sorted({obj.name for items in listed.values() for item in items for obj in item.objects})


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


def _listed(year_dir: Path, image_id: str, listed_at: str) -> _Listed:
    image = year_dir / "JPEGImages" / f"{image_id}.jpg"
    annotation = year_dir / "Annotations" / f"{image_id}.xml"
    for needed, what in ((image, "JPEG"), (annotation, "annotation XML")):
        if not needed.is_file():
            raise DataError(f"{listed_at} lists image {image_id} but its {what} {needed} does not exist; "
                            f"restore the file or remove the line.")
    return _Listed(image, annotation, tuple(parse_objects(annotation)))


def parse_objects(path: Path) -> list[VocObject]:
    """The objects of one annotation file, in file order."""
    objects = []
    for obj in _parse_xml(path).iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path}:{_line_of(path, '')} has an object without a class <name>; fix the annotation.")
        objects.append(VocObject(name, (obj.findtext("difficult") or "0").strip() == "1"))
    return objects


def image_labels(
    objects: Sequence[VocObject], class_names: Sequence[str], annotation: Path, label_file: Path | None = None
) -> tuple[int, ...]:
    """Per-class labels of one image: 1 positive, 0 negative, -1 only difficult objects."""
    labels = [NEGATIVE] * len(class_names)
    for obj in objects:
        if obj.name not in class_names:
            where = f"listed in {label_file}" if label_file else f"one of the {len(class_names)} classes"
            advice = "fix the annotation or add the class to that file" if label_file else "fix the annotation"
            raise DataError(
                f"{annotation}:{_line_of(annotation, obj.name)} names class '{printable(obj.name)}', which is not "
                f"{where}; {advice}."
            )
        index = class_names.index(obj.name)
        if obj.difficult:
            labels[index] = POSITIVE if labels[index] == POSITIVE else IGNORED
        else:
            labels[index] = POSITIVE
    return tuple(labels)


def parse_annotation(path: Path, class_names: Sequence[str] = VOC_CLASSES) -> tuple[int, ...]:
    """Per-class labels of one annotation file over ``class_names`` (the PASCAL 20 by default)."""
    return image_labels(parse_objects(path), class_names, path)


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
