"""Pages and text of a PDF that Chromium printed, read without a PDF library.

Chromium (Skia) writes each page's content as a Flate stream whose text operators show
glyph ids as hex strings, and gives each font a ToUnicode map from glyph ids to text.
Reading those two is enough to get every page's text back, so the tests can check what
a printed report says where no PDF package is installed.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from pathlib import Path

_OBJECT = re.compile(rb"(\d+) 0 obj\s*(.*?)endobj", re.S)
_STREAM = re.compile(rb"stream\r?\n(.*?)endstream", re.S)
_REFERENCE = r"{key}\s+(\d+) 0 R"


def _objects(data: bytes) -> dict[int, bytes]:
    return {int(number): body for number, body in _OBJECT.findall(data)}


def _stream(body: bytes) -> bytes:
    """The object's stream, inflated where it says /FlateDecode."""
    match = _STREAM.search(body)
    if match is None:
        return b""
    raw = match.group(1)
    if b"/FlateDecode" not in body[: match.start()]:
        return raw
    return zlib.decompressobj().decompress(raw)  # tolerates the end-of-line before endstream


def _hex_text(hex_digits: bytes) -> str:
    digits = re.sub(rb"\s", b"", hex_digits).decode()
    return bytes.fromhex(digits + "0" * (len(digits) % 2)).decode("utf-16-be", "replace")


def _unicode_map(cmap: bytes) -> dict[str, str]:
    """Glyph code (as hex) -> text, from a ToUnicode CMap's bfchar and bfrange sections."""
    table: dict[str, str] = {}
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap, re.S):
        for code, text in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
            table[code.decode().upper()] = _hex_text(text)
    for block in re.findall(rb"beginbfrange(.*?)endbfrange", cmap, re.S):
        for low, high, start in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
            width = len(low)
            first = ord(_hex_text(start)[-1])
            prefix = _hex_text(start)[:-1]
            for offset, code in enumerate(range(int(low, 16), int(high, 16) + 1)):
                table[f"{code:0{width}X}"] = prefix + chr(first + offset)
    return table


def _fonts(page: bytes, objects: dict[int, bytes]) -> dict[str, dict[str, str]]:
    """Font resource name -> its ToUnicode map, for one page."""
    resources = page
    found = re.search(rb"/Resources\s+(\d+) 0 R", page)
    if found:
        resources = objects[int(found.group(1))]
    font_dict = re.search(rb"/Font\s*<<(.*?)>>", resources, re.S)
    if font_dict is None:
        found = re.search(rb"/Font\s+(\d+) 0 R", resources)
        font_dict = re.search(rb"<<(.*)>>", objects[int(found.group(1))], re.S) if found else None
    fonts = {}
    for name, number in re.findall(rb"/(\w+)\s+(\d+) 0 R", font_dict.group(1) if font_dict else b""):
        to_unicode = re.search(rb"/ToUnicode\s+(\d+) 0 R", objects[int(number)])
        fonts[name.decode()] = _unicode_map(_stream(objects[int(to_unicode.group(1))])) if to_unicode else {}
    return fonts


def _page_text(content: bytes, fonts: dict[str, dict[str, str]]) -> str:
    """The text a page's content stream shows, a space between separate text runs."""
    pieces: list[str] = []
    table: dict[str, str] = {}
    for token in re.finditer(rb"/(\w+)\s+[\d.]+\s+Tf|\[(.*?)\]\s*TJ|<([0-9A-Fa-f\s]*)>\s*Tj|\bET\b", content, re.S):
        if token.group(1):
            table = fonts.get(token.group(1).decode(), {})
            continue
        if token.group(0) == b"ET":
            pieces.append(" ")
            continue
        runs = re.findall(rb"<([0-9A-Fa-f\s]*)>", token.group(2)) if token.group(2) is not None else [token.group(3)]
        for run in runs:
            digits = re.sub(rb"\s", b"", run).decode().upper()
            width = 4 if table and len(next(iter(table))) == 4 else 2
            pieces += [table.get(digits[i:i + width], "") for i in range(0, len(digits), width)]
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", "".join(pieces))).strip()  # ligatures as letters


def _root_pages(objects: dict[int, bytes]) -> int:
    """The page tree's root: the /Pages node no other node names as a kid."""
    nodes = [n for n, body in objects.items() if re.search(rb"/Type\s*/Pages\b", body)]
    kids = {int(k) for n in nodes for k in re.findall(rb"(\d+) 0 R", _kids(objects[n]))}
    return next(n for n in nodes if n not in kids)


def _kids(body: bytes) -> bytes:
    return re.search(rb"/Kids\s*\[(.*?)\]", body, re.S).group(1)


def _leaves(objects: dict[int, bytes], node: int) -> list[int]:
    """The page objects under ``node``, in order (a Chromium page tree may nest /Pages nodes)."""
    body = objects[node]
    if not re.search(rb"/Type\s*/Pages\b", body):
        return [node]
    return [leaf for kid in re.findall(rb"(\d+) 0 R", _kids(body)) for leaf in _leaves(objects, int(kid))]


def pdf_pages(path: str | Path) -> list[str]:
    """The text of every page of a Chromium-printed PDF, in page order."""
    data = Path(path).read_bytes()
    objects = _objects(data)
    texts = []
    for number in _leaves(objects, _root_pages(objects)):
        page = objects[number]
        contents = re.search(rb"/Contents\s+(\d+) 0 R", page)
        content = _stream(objects[int(contents.group(1))]) if contents else b""
        texts.append(_page_text(content, _fonts(page, objects)))
    return texts


def page_objects(path: str | Path) -> int:
    """How many ``/Type /Page`` objects the file holds (not counting the ``/Pages`` tree)."""
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", Path(path).read_bytes()))
