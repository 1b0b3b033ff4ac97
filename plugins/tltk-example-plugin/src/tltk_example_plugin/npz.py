"""``npz``: images and labels saved with ``numpy.savez``, read with ``--data npz:FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tltk.plugin import DataError, recognises

if TYPE_CHECKING:
    from tltk.plugin import RawDataset

SPLITS = ("train", "val", "test")


def is_npz(path: Path) -> bool:
    """A file ending in .npz: what ``--data PATH`` means by this format without ``npz:``."""
    return path.is_file() and path.suffix.lower() == ".npz"


@recognises(is_npz)
def read_npz(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """Arrays ``images`` (N x H x W or N x H x W x C, uint8, C = 1 or 3) and ``labels`` (N
    class indices); optional ``class_names`` (one per class) and ``split`` (train, val or
    test per image). Without ``split``, tltk carves validation and test sets itself."""
    from tltk.plugin import RawDataset, Sample

    arrays = _load(path)
    images = _images(arrays["images"], path)
    class_names = _class_names(arrays, path)
    labels = _labels(arrays["labels"], len(images), len(class_names), path)
    splits = _splits(arrays.get("split"), len(images), path)
    grouped: dict[str, list[Any]] = {}
    for index, (label, split) in enumerate(zip(labels, splits)):
        grouped.setdefault(split, []).append(Sample(index, int(label), f"{split}/{index}" if split != "all" else str(index)))
    return RawDataset(class_names, grouped, str(path), arrays=images)


def _load(path: Path) -> dict[str, Any]:
    import numpy as np

    if not path.is_file():
        raise DataError(f"{path} is not a file; npz:FILE needs a file written by numpy.savez.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez.") from exc
    missing = [name for name in ("images", "labels") if name not in arrays]
    if missing:
        raise DataError(f"{path} has no array named {missing[0]}; save images=... and labels=... with numpy.savez.")
    return arrays


def _images(images: Any, path: Path) -> Any:
    import numpy as np

    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: images is {images.dtype} of shape {images.shape}; it must be uint8, N x H x W or N x H x W x C "
            f"with C 1 or 3 (scale to 0..255 and use .astype(numpy.uint8))."
        )
    return images


def _class_names(arrays: dict[str, Any], path: Path) -> list[str]:
    if "class_names" in arrays:
        names = [str(name) for name in arrays["class_names"].tolist()]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"{path}: class_names is empty or repeats a name; give each class one unique name.")
        return names
    labels = arrays["labels"]
    return [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]


def _labels(labels: Any, count: int, num_classes: int, path: Path) -> Any:
    import numpy as np

    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels is {labels.dtype} of shape {labels.shape}; it must be {count} integer class indices.")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels run {labels.min()}..{labels.max()} but there are {num_classes} class names.")
    return labels


def _splits(split: Any, count: int, path: Path) -> list[str]:
    if split is None:
        return ["all"] * count
    names = [str(s) for s in split.tolist()] if split.shape == (count,) else []
    unknown = sorted(set(names) - set(SPLITS))
    if len(names) != count or unknown:
        raise DataError(f"{path}: split must name train, val or test for each of the {count} images"
                        f"{f' (found {unknown[0]!r})' if unknown else ''}.")
    return names
