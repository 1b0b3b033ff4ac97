"""What `tltk list` shows: each registered component with where it came from."""

from __future__ import annotations

from typing import Any


def catalog(kind: str) -> list[dict[str, Any]]:
    if kind == "backbones":
        from tltk.backbones import BACKBONES

        return [
            {"name": e.name, "pretrained": "yes" if getattr(e.obj, "pretrained_available", False) else "no",
             "source": e.source, "description": getattr(e.obj, "description", "")}
            for e in BACKBONES.entries()
        ] + [{"name": "timm:NAME", "pretrained": "per model", "source": "timm", "description": "any timm model"}]
    if kind == "heads":
        from tltk.heads import HEADS

        return [{"name": e.name, "source": e.source, "description": _first_line(e.obj)} for e in HEADS.entries()]
    if kind == "strategies":
        from tltk.strategies import STRATEGIES

        return [{"name": e.name, "source": e.source} for e in STRATEGIES.entries()]
    from tltk.data.formats import DATA_FORMATS

    return [{"name": e.name, "source": e.source, "description": _first_line(e.obj)} for e in DATA_FORMATS.entries()]


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
