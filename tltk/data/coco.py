"""COCO-format detection data as image-level multi-label classification:
``PATH/annotations/instances_*.json`` and the images they name.

Each ``instances_NAME.json`` is one split: ``train2017`` (or ``train``) is train, ``val2017``
val, ``test...`` test; a single file with another name (CVAT's ``instances_default.json``)
is the whole dataset, split the usual way. The classes are the file's categories, ordered
by their ids, under their names. An image is positive for every category with an instance
in it. An instance marked ``iscrowd`` (a crowd of objects outlined as one region) counts
like VOC's "difficult": an image whose only instances of a category are crowds gets label
-1 (ignored) for it, unless ``--voc-difficult`` says otherwise. An image without instances
is negative for every category.

Annotation files come from anywhere, and COCO's own run to hundreds of megabytes, so a
file is refused above ``MAX_ANNOTATION_BYTES`` before it is read, and every field tltk uses
is checked, with the file and the entry named when one is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tltk.data.formats import drop_undecodable
from tltk.data.samples import RawDataset, Sample, relative_id
from tltk.errors import DataError, printable

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1
ANNOTATION_GLOB = "instances_*.json"
# COCO 2017's train annotations are 448 MB; a file far beyond that is not one to parse whole.
MAX_ANNOTATION_BYTES = 2 * 1024**3
_SPLIT_OF = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class CocoImage:
    """One entry of ``images``: its id and the file name, relative to the split's image folder."""

    id: int
    file_name: str


@dataclass(frozen=True)
class CocoFile:
    """What tltk uses from one annotation file."""

    path: Path
    categories: dict[int, str]  # id -> name, in id order
    images: list[CocoImage]
    instances: dict[int, list[tuple[int, bool]]]  # image id -> (category id, is crowd) per instance


def read_coco(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A COCO folder: ``annotations/instances_*.json`` and the image folders beside them."""
    files = annotation_files(path)
    parsed = {split: read_annotation_file(file) for split, file in files.items()}
    categories = _shared_categories(parsed)
    class_names = list(categories.values())
    column = {category_id: index for index, category_id in enumerate(categories)}
    labelled = {
        split: _samples(coco, image_root if image_root is not None else _image_folder(path, coco), column, path)
        for split, coco in parsed.items()
    }
    return drop_undecodable(labelled, class_names, path, strict)


def _samples(coco: CocoFile, folder: Path, column: dict[int, int], root: Path) -> list[Sample]:
    """One sample per listed image, annotated or not; ids are paths relative to the COCO folder."""
    samples = []
    for image in coco.images:
        file = folder / image.file_name.replace("\\", "/")
        labels = image_labels(coco.instances.get(image.id, []), column)
        samples.append(Sample(str(file.absolute()), labels, relative_id(file, root)))
    return samples


def find_coco_dir(path: Path) -> Path | None:
    """``path`` when it holds ``annotations/instances_*.json``, else None."""
    folder = path / "annotations"
    return path if folder.is_dir() and any(folder.glob(ANNOTATION_GLOB)) else None


def annotation_files(path: Path) -> dict[str, Path]:
    """The annotation file of each split, by split name (``all`` for a lone file of another name)."""
    if path.is_file():
        folder = path.parent.parent if path.parent.name == "annotations" else path.parent
        raise DataError(f"{path} is a file; give coco: the folder that holds annotations/ (coco:{folder}), "
                        f"whose instances_*.json files make the splits.")
    if not path.is_dir():
        raise DataError(f"COCO folder {path} does not exist; check the --data spec.")
    if find_coco_dir(path) is None:
        raise DataError(
            f"{path} is not a COCO folder; expected {path}/annotations/instances_train2017.json (or another "
            f"instances_*.json) and the image folders beside annotations/."
        )
    found = sorted((path / "annotations").glob(ANNOTATION_GLOB))
    splits: dict[str, Path] = {}
    for file in found:
        split = split_of(file)
        if split is None and len(found) == 1:
            split = "all"
        if split is None:
            raise DataError(
                f"{file} is not a train, val or test file, beside {', '.join(f.name for f in found if f != file)}; "
                f"name it instances_train*.json, instances_val*.json or instances_test*.json, or move it out."
            )
        if split in splits:
            raise DataError(f"{splits[split]} and {file} are both {split} annotations; keep one of them in {file.parent}.")
        splits[split] = file
    if "all" not in splits and "train" not in splits:
        raise DataError(
            f"{path / 'annotations'} has {', '.join(f.name for f in found)} but no instances_train*.json; "
            f"add the training annotations."
        )
    return splits


def split_of(file: Path) -> str | None:
    """``instances_train2017.json`` -> ``train``; None when the name is no split's."""
    name = re.sub(r"\d+$", "", file.stem[len("instances_"):]).lower()
    return _SPLIT_OF.get(name)


def read_annotation_file(file: Path) -> CocoFile:
    """Parse and check one annotation file: categories, images, and each image's instances."""
    document = _load_json(file)
    if not isinstance(document, dict):
        raise DataError(f"{file} holds a JSON {type(document).__name__}, not the object of a COCO annotation file; "
                        f"give an instances_*.json file as COCO writes it.")
    categories = _categories(file, _list_field(document, "categories", file))
    images = _images(file, _list_field(document, "images", file))
    known_images = {image.id for image in images}
    instances: dict[int, list[tuple[int, bool]]] = {}
    for index, entry in enumerate(_list_field(document, "annotations", file)):
        where = f"{file}: annotations[{index}]"
        entry = _object(entry, where)
        image_id = _int_field(entry, "image_id", where)
        category_id = _int_field(entry, "category_id", where)
        if image_id not in known_images:
            raise DataError(f"{where} is of image {image_id}, which images does not list; fix or remove the annotation.")
        if category_id not in categories:
            raise DataError(f"{where} has category_id {category_id}, which categories does not list; "
                            f"fix the annotation or add the category.")
        crowd = entry.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise DataError(f"{where} has iscrowd {printable(json.dumps(crowd))}; COCO writes 0 or 1.")
        instances.setdefault(image_id, []).append((category_id, crowd == 1))
    return CocoFile(file, categories, images, instances)


def image_labels(instances: list[tuple[int, bool]], column: dict[int, int]) -> tuple[int, ...]:
    """Per-class labels of one image: 1 positive, 0 negative, -1 only crowd instances."""
    labels = [NEGATIVE] * len(column)
    for category_id, crowd in instances:
        index = column[category_id]
        if crowd:
            labels[index] = POSITIVE if labels[index] == POSITIVE else IGNORED
        else:
            labels[index] = POSITIVE
    return tuple(labels)


def _load_json(file: Path) -> Any:
    size = file.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise DataError(
            f"{file} is {size / 1024**3:.1f} GiB, over the {MAX_ANNOTATION_BYTES / 1024**3:.0f} GiB tltk reads from one "
            f"annotation file; split the annotations into smaller files."
        )
    try:
        return json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc}); save it as UTF-8 JSON.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"fix or export the file again.") from exc
    except RecursionError as exc:
        raise DataError(f"{file} nests JSON too deeply to be a COCO annotation file; export the file again.") from exc


def _list_field(document: dict[str, Any], key: str, file: Path) -> list[Any]:
    value = document.get(key)
    if not isinstance(value, list):
        found = "has no" if value is None else f"has a {type(value).__name__} for its"
        raise DataError(f"{file} {found} '{key}' list; a COCO annotation file has images, annotations and categories.")
    return value


def _object(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise DataError(f"{where} is a JSON {type(entry).__name__}, not an object; fix the file.")
    return entry


def _int_field(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where} has {key} {printable(json.dumps(value))}, not an integer; fix the file.")
    return value


def _str_field(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} has {key} {printable(json.dumps(value))}, not a non-empty string; fix the file.")
    return value.strip()


def _categories(file: Path, entries: list[Any]) -> dict[int, str]:
    """Category id -> name, in id order; ids and names must each be unique."""
    found: dict[int, str] = {}
    for index, entry in enumerate(entries):
        where = f"{file}: categories[{index}]"
        entry = _object(entry, where)
        category_id, name = _int_field(entry, "id", where), _str_field(entry, "name", where)
        if category_id in found:
            raise DataError(f"{where} repeats category id {category_id}; give each category its own id.")
        if name in found.values():
            raise DataError(f"{where} repeats category name '{printable(name)}'; give each category its own name.")
        found[category_id] = name
    if not found:
        raise DataError(f"{file} lists no categories; a COCO annotation file names the classes in 'categories'.")
    return dict(sorted(found.items()))


def _images(file: Path, entries: list[Any]) -> list[CocoImage]:
    images: list[CocoImage] = []
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        where = f"{file}: images[{index}]"
        entry = _object(entry, where)
        image = CocoImage(_int_field(entry, "id", where), _str_field(entry, "file_name", where))
        if image.id in seen:
            raise DataError(f"{where} repeats image id {image.id}; give each image its own id.")
        pure = PurePosixPath(image.file_name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts:
            raise DataError(f"{where} has file_name '{printable(image.file_name)}', which leaves the image folder; "
                            f"file names are relative to it.")
        seen.add(image.id)
        images.append(image)
    return images


def _shared_categories(parsed: dict[str, CocoFile]) -> dict[int, str]:
    """The categories, which every split's file must give alike (the same id for the same name)."""
    first, *others = parsed.values()
    for coco in others:
        if coco.categories != first.categories:
            raise DataError(f"{first.path} and {coco.path} list different categories; export them from the same "
                            f"dataset so that every split has the same classes.")
    return first.categories


def _image_folder(path: Path, coco: CocoFile) -> Path:
    """Where a split's images are: ``PATH/NAME`` for ``instances_NAME.json`` (COCO), ``PATH/images/NAME``,
    ``PATH/images`` (CVAT) or ``PATH``; the first that holds the split's first image."""
    name = coco.path.stem[len("instances_"):]
    candidates = [path / name, path / "images" / name, path / "images", path]
    if not coco.images:
        return candidates[0]
    probe = coco.images[0].file_name
    for folder in candidates:
        if (folder / probe).is_file():
            return folder
    raise DataError(
        f"No image folder for {coco.path}: its first image {printable(probe)} is in none of "
        f"{', '.join(str(c) for c in candidates)}; put the images in {candidates[0]} or give --image-root."
    )
