"""Reading image files: listing them, checking they decode, and loading them as RGB.

Datasets collected from the web contain corrupt, truncated and mislabelled-extension
files. They are found once, when the dataset is listed, so that training never dies on
image 40,000 of epoch 3: bad files are skipped and reported (or, with ``strict``, are an
error). Loading always yields 8-bit RGB whatever the file's mode, so a backbone never
sees a 16-bit, palette, CMYK or transparent image it was not trained on.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from tltk.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Folders that archivers and operating systems add next to real data.
_JUNK_NAMES = frozenset({"__MACOSX"})

# Below this many files a thread pool costs more than it saves.
_PARALLEL_THRESHOLD = 16

_WHITE = (255, 255, 255, 255)


def is_hidden(name: str) -> bool:
    """Hidden (dot) files and archive junk are never data."""
    return name.startswith(".") or name in _JUNK_NAMES


def is_image_file(path: Path) -> bool:
    """Whether a file's extension says it is an image (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan_image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in a stable sorted order.

    Hidden files and folders are ignored, as are files whose extension is not an image
    extension (READMEs, label files): they are not images, so they are not "skipped".
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in filenames:
            path = Path(dirpath, name)
            if not is_hidden(name) and is_image_file(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def decode_error(path: Path | bytes) -> str | None:
    """Why ``path`` (or an encoded image held in memory) cannot be decoded, or None when it can.

    Cheap: JPEGs are decoded at reduced scale (``draft``), which still reads the whole
    entropy-coded stream and so still catches truncation. PIL's decompression-bomb limit
    stays in force; a file over it counts as undecodable.
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))
            img.load()
    except Image.DecompressionBombError as exc:
        return f"too many pixels ({exc})"
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"{type(exc).__name__}: {exc}"
    return None


def validate_images(paths: Sequence[Path], *, strict: bool) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into (decodable, undecodable), both in the input order.

    With ``strict`` the first undecodable file (in input order) is a DataError instead.
    """
    if len(paths) >= _PARALLEL_THRESHOLD:
        workers = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(decode_error, paths))
    else:
        errors = [decode_error(path) for path in paths]
    good = [path for path, error in zip(paths, errors) if error is None]
    bad = [(path, error) for path, error in zip(paths, errors) if error is not None]
    if strict and bad:
        path, error = bad[0]
        raise DataError(
            f"Cannot decode image {path} ({error}); remove the file, or drop --strict to skip "
            f"undecodable images."
        )
    return good, [path for path, _ in bad]


def load_image(source: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, rotated upright according to its EXIF tag.

    The decoded image is turned upright in place and copied once, by ``to_rgb``: every
    image of every epoch passes through here, and a full-size copy per step is not free.
    """
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            _exif_upright_in_place(img)
            return to_rgb(img)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"Cannot decode image {path} ({type(exc).__name__}: {exc}); remove or replace the file."
        ) from exc


def load_image_bytes(data: bytes, where: str) -> Image.Image:
    """An encoded image held in memory (a row of a Hugging Face dataset), opened exactly as
    ``load_image`` opens a file; ``where`` names it in the error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            _exif_upright_in_place(img)
            return to_rgb(img)
    except Exception as exc:
        raise DataError(f"Cannot decode image {where} ({type(exc).__name__}: {exc}); remove or replace it.") from exc


def _exif_upright_in_place(img: Image.Image) -> None:
    """Apply the EXIF Orientation tag; a malformed EXIF block leaves the image as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would view it.

    Transparent pixels are composited on white (``convert("RGB")`` would expose whatever
    colour the transparent pixels happen to store, often black). High-bit-depth images
    are scaled to 0..255 by their range; PIL's own conversion clips them to white.
    """
    if img.mode == "RGB":
        return img.copy()
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    return img.convert("RGB")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer or float greyscale image to uint8.

    ``I;16*`` modes use the full 16-bit range. ``I`` (32-bit, also how some 16-bit PNGs
    and TIFFs open) uses 8-bit range if the values fit, else 16-bit, else min..max.
    ``F`` uses 0..1 if the values fit, else min..max.
    """
    values = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = values / 257.0
    elif values.size == 0:
        scaled = values
    else:
        low, high = float(values.min()), float(values.max())
        if img.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif img.mode != "F" and low >= 0 and high <= 255:
            scaled = values
        elif img.mode != "F" and low >= 0 and high <= 65535:
            scaled = values / 257.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
