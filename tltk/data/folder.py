"""The ``folder`` format: one folder of images per class, optionally inside ``train/``,
``val/`` and ``test/`` folders (an ImageNet-style tree)."""

from __future__ import annotations

from pathlib import Path

from tltk.data.images import is_hidden, scan_image_files, validate_images
from tltk.data.samples import RawDataset, Sample, relative_id
from tltk.errors import DataError

# Folder names that mean "a split of the dataset" rather than "a class".
SPLIT_FOLDER_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_folder(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """Class-named subfolders, optionally inside ``train/``, ``val/`` and ``test/``."""
    root = _existing_dir(path, "folder")
    split_dirs = _folder_split_dirs(root)
    class_dirs = {split: _class_subfolders(folder) for split, folder in split_dirs.items()}
    class_names = _folder_class_names(root, class_dirs)

    listed: list[tuple[str, int, Path]] = []  # (split, target, file)
    problems: dict[str, str] = {}
    for split, classes in class_dirs.items():
        for name, folder in classes.items():
            files = scan_image_files(folder)
            if not files:
                problems.setdefault(name, (
                    f"Class folder {folder} contains no images; add images "
                    f"({', '.join(sorted(_EXTENSIONS_FOR_MESSAGES))}), remove the folder or leave the class out "
                    f"with --classes."
                ))
            listed.extend((split, class_names.index(name), file) for file in files)

    good, bad = validate_images([file for _, _, file in listed], strict=strict)
    decodable = set(good)
    splits: dict[str, list[Sample]] = {split: [] for split in split_dirs}
    for split, target, file in listed:
        if file in decodable:
            splits[split].append(Sample(str(file.absolute()), target, relative_id(file, root)))
    for name, problem in _undecodable_classes(splits, class_names, class_dirs, bad).items():
        problems.setdefault(name, problem)
    return RawDataset(class_names, splits, str(root), skipped=[str(p.absolute()) for p in bad],
                      class_problems=problems)


_EXTENSIONS_FOR_MESSAGES = (".jpg", ".png", ".bmp", ".gif", ".tif", ".webp")


def _folder_split_dirs(root: Path) -> dict[str, Path]:
    """``{"train": ..., "test": ...}`` for a split layout, else ``{"all": root}``."""
    subdirs = _visible_subdirs(root)
    if not subdirs:
        raise DataError(
            f"No class subfolders in {root}; put each class's images in its own folder "
            f"({root}/CLASS/image.jpg)."
        )
    split_like = [d for d in subdirs if d.name.lower() in SPLIT_FOLDER_ALIASES]
    if not split_like:
        return {"all": root}
    if len(split_like) != len(subdirs):
        others = sorted(d.name for d in subdirs if d not in split_like)
        raise DataError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_like)}) with class "
            f"folders ({', '.join(others)}); put the class folders inside {split_like[0].name}/."
        )
    split_dirs: dict[str, Path] = {}
    for folder in split_like:
        split = SPLIT_FOLDER_ALIASES[folder.name.lower()]
        if split in split_dirs:
            raise DataError(
                f"{root} has two {split} folders ({split_dirs[split].name}, {folder.name}); keep one."
            )
        split_dirs[split] = folder
    if "train" not in split_dirs:
        raise DataError(
            f"{root} has {', '.join(d.name for d in split_like)} folders but no train/ folder; "
            f"add {root}/train/CLASS/ folders."
        )
    return dict(sorted(split_dirs.items(), key=lambda item: ("train", "val", "test").index(item[0])))


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def _class_subfolders(folder: Path) -> dict[str, Path]:
    return {d.name: d for d in _visible_subdirs(folder)}


def _folder_class_names(root: Path, class_dirs: dict[str, dict[str, Path]]) -> list[str]:
    """Sorted union of class folders over the splits; every class must be in train."""
    names = sorted({name for classes in class_dirs.values() for name in classes})
    if "all" in class_dirs:
        return names
    train = class_dirs["train"]
    if not train:
        raise DataError(f"No class subfolders in {root}/train; add {root}/train/CLASS/ folders.")
    for split, classes in class_dirs.items():
        missing = sorted(set(classes) - set(train))
        if missing:
            raise DataError(
                f"Class folder {root}/{split}/{missing[0]} has no counterpart in "
                f"{root}/train; add {root}/train/{missing[0]}/ with training images or remove it."
            )
    return names


def _undecodable_classes(
    splits: dict[str, list[Sample]],
    class_names: list[str],
    class_dirs: dict[str, dict[str, Path]],
    bad: list[Path],
) -> dict[str, str]:
    """A class folder whose every image was undecodable is as unusable as an empty one; the
    sentence for each such class, raised later only if --classes keeps the class."""
    problems: dict[str, str] = {}
    for split, classes in class_dirs.items():
        present = {sample.target for sample in splits[split]}
        for name, folder in classes.items():
            if class_names.index(name) not in present and any(folder in p.parents for p in bad):
                skipped = sum(1 for p in bad if folder in p.parents)
                problems.setdefault(name, (
                    f"Class folder {folder} has no decodable images ({skipped} could not be "
                    f"decoded); replace them, remove the folder or leave the class out with --classes."
                ))
    return problems


def _existing_dir(path: Path, format_name: str) -> Path:
    if not path.exists():
        raise DataError(f"Data folder {path} does not exist; check the --data spec.")
    if not path.is_dir():
        raise DataError(f"{format_name}:{path} is not a folder; give the dataset's folder.")
    return path
