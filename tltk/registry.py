"""Named components (backbones, heads, strategies, ...) and how they are found.

One ``Registry`` per kind of component. Components register with a decorator next to
their factory, and other packages add theirs through an entry-point group; the group is
read lazily, the first time a name is looked up or listed, so importing tltk stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, Iterable, TypeVar

from tltk.errors import TltkError, UnknownNameError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """A registered component and where it came from (``tltk`` or a plugin package)."""

    name: str
    obj: T
    source: str = "tltk"
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names to components for one kind, e.g. ``BACKBONES``.

    Registering the same object under the same name twice is harmless (a module
    imported twice); registering a different object under a taken name raises.
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points_loaded = group is None

    def register(self, name: str, *, source: str = "tltk", **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@BACKBONES.register("lenet5")`` above a factory."""

        def decorator(obj: T) -> T:
            self.add(name, obj, source=source, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, source: str = "tltk", **meta: Any) -> None:
        existing = self._entries.get(name)
        if existing is not None:
            if _same_object(existing.obj, obj):
                return
            raise TltkError(
                f"{self.kind} '{name}' is already registered by {existing.source}; "
                f"register it under another name."
            )
        self._entries[name] = Entry(name, obj, source, dict(meta))

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._load_entry_points()
        if name in self._entries:
            return self._entries[name]
        raise UnknownNameError(self._unknown_message(name))

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"Unknown {self.kind} '{name}'.{hint} "
            f"Known {self.kind}s: {', '.join(names) or '(none)'}."
        )

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in _entry_points(self.group or ""):
            if ep.name in self._entries:
                continue
            source = _distribution_label(ep)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break tltk
                self._entries[ep.name] = Entry(ep.name, _broken(self.kind, ep.name, source, exc), source, {"broken": str(exc)})
                continue
            self.add(ep.name, obj, source=source)


def _same_object(a: Any, b: Any) -> bool:
    """The same component registered again, e.g. by a module imported twice.

    Module-level functions and classes match by module and qualified name; lambdas and
    closures never match each other (they share a qualified name); dataclass records
    such as ``BackboneInfo`` match field by field.
    """
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same_object(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    qualname = getattr(a, "__qualname__", None)
    if callable(a) and isinstance(qualname, str):
        if "<lambda>" in qualname or "<locals>" in qualname:
            return False
        return (a.__module__, qualname) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    return not callable(a) and a == b


def _entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    if not group:
        return []
    return metadata.entry_points(group=group)


def _distribution_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    return f"{dist.metadata['Name']}=={dist.version}"


def _broken(kind: str, name: str, source: str, exc: Exception) -> Callable[..., Any]:
    def raise_on_use(*args: Any, **kwargs: Any) -> Any:
        raise TltkError(f"{kind} '{name}' from {source} failed to load: {exc}")

    return raise_on_use
