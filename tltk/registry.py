"""Named components (backbones, heads, strategies, exporters, data formats, callbacks) and how they are found.

Each kind of component (a record of ``tltk.kinds.KINDS``) has a ``Registry`` fed by its
entry-point group, and every kind is built by one function, ``build(kind, name, **options)``,
which applies one options rule and the kind's contract check. tltk's own components are
declared only as entry points in its pyproject.toml, exactly as a plugin declares its own,
so the path plugins take is the one every run takes. Reading a group reads package metadata
only: a component's module is imported the first time that component is used, so
listing names stays fast and a broken plugin costs nothing until someone asks for it.

What can go wrong with a plugin is turned into one sentence naming its package and
version, and the rest of tltk keeps working: a module that fails to import, a plugin
written for another plugin API, an object of the wrong shape, a name another package
already uses, a factory that raises. A plugin never takes a name from tltk or from code
that registered it; ``package:name`` picks a plugin's component explicitly.
``TLTK_PLUGINS=a,b`` lets only those packages' components load and
``TLTK_DISABLE_PLUGIN_AUTOLOAD=1`` lets none load (tltk's own always do).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, Iterable, TypeVar

from tltk.errors import TltkError, UnknownNameError
from tltk.kinds import HELP_ATTRIBUTE, KINDS, OPTIONS_ATTRIBUTE, CallShape, Kind, kind
from tltk.plugin import API_ATTRIBUTE, PLUGIN_API_VERSION, api_incompatibility

T = TypeVar("T")

TLTK = "tltk"
OK, NOT_LOADED, FAILED, BLOCKED = "ok", "not loaded", "failed", "blocked"


class PluginError(TltkError):
    """A component that cannot be used: it failed to load, is blocked, clashes, or raised."""


class PluginWarning(UserWarning):
    """A plugin problem found on the way to something else; tltk carries on without it."""


# --- which packages may load ----------------------------------------------------------------


@dataclass(frozen=True)
class PluginPolicy:
    """``TLTK_PLUGINS`` (an allow-list of package names) and ``TLTK_DISABLE_PLUGIN_AUTOLOAD``."""

    allowed: frozenset[str] | None = None
    autoload: bool = True
    allowed_text: str = ""

    @classmethod
    def from_environment(cls) -> PluginPolicy:
        switch = os.environ.get("TLTK_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower()
        listed = os.environ.get("TLTK_PLUGINS", "").strip()
        allowed = frozenset(canonical(p) for p in listed.split(",") if p.strip()) if listed else None
        return cls(allowed, switch in ("", "0", "false", "no", "off"), listed)

    def blocked_reason(self, package: str) -> str | None:
        """Why ``package``'s components may not load, or None; tltk's own always may."""
        if canonical(package) == TLTK:
            return None
        if not self.autoload:
            return f"TLTK_DISABLE_PLUGIN_AUTOLOAD is set, so no plugin loads; unset it to use {package}"
        if self.allowed is not None and canonical(package) not in self.allowed:
            return f"TLTK_PLUGINS={self.allowed_text} does not list {package}; add it there to use this"
        return None

    def describe(self) -> str | None:
        """One line on what the environment restricts, for ``tltk plugins``; None when nothing."""
        if not self.autoload:
            return "TLTK_DISABLE_PLUGIN_AUTOLOAD is set: only tltk's own components load."
        if self.allowed is not None:
            return f"TLTK_PLUGINS={self.allowed_text}: only these packages' components load (and tltk's own)."
        return None


# --- one registered component ---------------------------------------------------------------


@dataclass(eq=False)
class Entry(Generic[T]):
    """A component and where it came from. ``status`` is ``ok`` (loaded and checked),
    ``not loaded`` (found in package metadata, imported on first use), ``failed`` or
    ``blocked``, with the reason in ``error``; ``clash`` says why the plain name is not its."""

    name: str
    package: str
    version: str = ""
    target: str = ""  # "module:attribute" that the entry point names; "" for one registered in code
    status: str = OK
    error: str = ""
    obj: T | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    entry_point: Any = field(default=None, repr=False)
    clash: str = ""
    guarded: Any = field(default=None, repr=False)

    @property
    def source(self) -> str:
        """``package==version``, or the package (or module) alone where there is no version."""
        return f"{self.package}=={self.version}" if self.version else self.package

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}".strip()

    @property
    def builtin(self) -> bool:
        return canonical(self.package) == TLTK

    @property
    def from_plugin(self) -> bool:
        return self.entry_point is not None and not self.builtin

    @property
    def qualified_name(self) -> str:
        return f"{self.package}:{self.name}"


# --- the registry ---------------------------------------------------------------------------


class Registry(Generic[T]):
    """Names to components for one kind, e.g. ``BACKBONES``.

    A plain name belongs to tltk's own component, else to one registered in code, else to
    the one plugin that provides it; where two plugins provide it, to neither. Every
    component is also reachable as ``package:name``.
    """

    def __init__(self, kind: str | Kind, group: str | None = None, *, call: CallShape | None = None,
                 aliases_elsewhere: dict[str, str] | None = None, ships_builtins: bool = True) -> None:
        """A registry for one of tltk's kinds (``Registry(HEAD)``, everything read from its
        record), or an ad-hoc one named by a word, with an entry-point group if any."""
        if isinstance(kind, Kind):
            record = kind
        else:  # a group of the kind table keeps its call shape and contract check
            known = next((k for k in KINDS if group and k.group == group), None)
            record = Kind(kind, group or "", known.listed_as if known else "",
                          call or (known.call if known else CallShape()),
                          check=known.check if known else None, ships_builtins=ships_builtins)
        self.record = record
        self.kind = record.word
        self.group = record.group or None
        # Whether tltk declares components of this kind itself (an empty kind then means a broken install).
        self.ships_builtins = record.ships_builtins
        # Names people reach for that tltk spells another way: the unknown-name message says how.
        self.aliases_elsewhere = dict(aliases_elsewhere or {})
        self.call = record.call
        self._entries: list[Entry[T]] = []
        self._discovered = self.group is None
        _ALL_REGISTRIES.add(self)

    # registering from code

    def register(self, name: str, *, source: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@HEADS.register("mine")`` above a factory defined in code (a notebook,
        a test); a package, tltk itself included, declares an entry point instead."""

        def decorator(obj: T) -> T:
            self.add(name, obj, source=source, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, source: str | None = None, **meta: Any) -> None:
        """Register ``obj`` under ``name``.

        This is for code (a notebook, a test, an application embedding tltk); packages,
        tltk itself included, declare entry points instead. The very same object again is
        harmless; another one under a name that tltk or code already holds raises. A plugin
        holding the name gives way, and the clash is reported.
        """
        self._discover()
        if any(e.name == name and e.obj is obj for e in self._entries):
            return
        owner = self._owner(name)
        if owner is not None and not owner.from_plugin:
            raise TltkError(f"{self.kind} '{name}' is already registered by {owner.source}; register it under another name.")
        problem = self.call.problem(obj)
        if problem:
            raise TltkError(f"{self.kind} '{name}' cannot be registered: {problem}.")
        package, version = _split_source(source) if source else (_package_of(obj), "")
        self._entries.append(Entry(name, package, version, obj=obj, metadata=dict(meta)))
        self._note_clashes()

    # looking up

    def get(self, name: str) -> T:
        """The component, imported if need be. A plugin's comes wrapped so that an exception
        it raises becomes a ``PluginError`` naming its package."""
        entry = self.entry(name)
        if entry.from_plugin:
            if entry.guarded is None:
                entry.guarded = _guard(self.kind, entry)
            return entry.guarded
        return entry.obj  # type: ignore[return-value]

    def entry(self, name: str) -> Entry[T]:
        """The loaded entry for ``name`` (plain, or ``package:name``)."""
        found = self.find(name)
        self._load(found)
        return found

    def find(self, name: str) -> Entry[T]:
        """The entry ``get`` would use, without importing it; raises if there is none or it is unusable."""
        self._discover()
        owner = self._owner(name)
        if owner is not None:
            self._report_clashes(e for e in self._entries if e.name == name)
            return owner
        qualified = self._qualified(name)
        if qualified is not None:
            if qualified.status == BLOCKED:
                raise PluginError(qualified.error)
            return qualified
        claimants = [e for e in self._entries if e.name == name]
        if claimants:  # contested by two plugins, or blocked
            raise PluginError(next((e.clash for e in claimants if e.clash), claimants[0].error))
        raise UnknownNameError(self._unknown_message(name))

    def origin(self, name: str) -> str:
        """``package version`` of the component ``name`` resolves to, for messages."""
        return self.find(name).label

    def __contains__(self, name: object) -> bool:
        """True when some package claims ``name``: ``get`` returns it, or says why it cannot."""
        if not isinstance(name, str):
            return False
        try:
            self.find(name)
        except UnknownNameError:
            return False
        except PluginError:
            return True
        return True

    # listing (imports nothing)

    def names(self) -> list[str]:
        """Every name ``get`` accepts: plain, or ``package:name`` for a name another package keeps."""
        return [self._listed_name(e) for e in self.entries()]

    def entries(self) -> list[Entry[T]]:
        """The usable entries, sorted by the name ``names`` lists them under."""
        self._discover()
        usable = [e for e in self._entries if e.status != BLOCKED]
        self._report_clashes(usable)
        return sorted(usable, key=self._listed_name)

    def all_entries(self) -> list[Entry[T]]:
        """Every entry, blocked ones included, in the order found."""
        self._discover()
        return list(self._entries)

    def listed_name(self, entry: Entry[T]) -> str:
        """The name ``names`` lists ``entry`` under."""
        self._discover()
        return self._listed_name(entry)

    def try_load(self, entry: Entry[T]) -> Entry[T]:
        """Import ``entry`` if it may load; a failure is recorded in its status and error, not raised."""
        if entry.status == NOT_LOADED:
            try:
                self._load(entry)
            except Exception:  # recorded on the entry, which is what the caller shows
                pass
        return entry

    def load_all(self) -> list[Entry[T]]:
        """Import every entry that may load, recording failures on the entries."""
        return [self.try_load(entry) for entry in self.all_entries()]

    def refresh(self) -> None:
        """Read the entry points again, e.g. after installing a package or changing TLTK_PLUGINS."""
        self._entries = [e for e in self._entries if e.entry_point is None]
        for entry in self._entries:
            entry.clash = ""
        self._discovered = self.group is None

    # internals

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        policy = PluginPolicy.from_environment()
        seen: set[tuple[str, str]] = set()
        for ep in _entry_points(self.group or ""):
            package, version = _distribution_of(ep)
            if (canonical(package), ep.name) in seen:  # one distribution found twice on sys.path
                continue
            seen.add((canonical(package), ep.name))
            entry: Entry[T] = Entry(ep.name, package, version, target=str(getattr(ep, "value", "")),
                                    status=NOT_LOADED, entry_point=ep)
            reason = policy.blocked_reason(package)
            if reason:
                entry.status = BLOCKED
                entry.error = f"{self.kind} '{ep.name}' from {entry.label} is not loaded: {reason}."
            self._entries.append(entry)
        self._note_clashes()

    def _owner(self, name: str) -> Entry[T] | None:
        claimants = [e for e in self._entries if e.name == name and e.status != BLOCKED]
        if not claimants:
            return None
        best = min(_rank(e) for e in claimants)
        top = [e for e in claimants if _rank(e) == best]
        return top[0] if len(top) == 1 else None

    def _qualified(self, name: str) -> Entry[T] | None:
        package, sep, rest = name.partition(":")
        if not sep:
            return None
        return next((e for e in self._entries if e.name == rest and canonical(e.package) == canonical(package)), None)

    def _listed_name(self, entry: Entry[T]) -> str:
        return entry.name if self._owner(entry.name) is entry else entry.qualified_name

    def _note_clashes(self) -> None:
        """Give each entry that lost its plain name the reason (reported when the name is used or listed)."""
        for name in sorted({e.name for e in self._entries}):
            claimants = [e for e in self._entries if e.name == name and e.status != BLOCKED]
            if len(claimants) < 2:
                continue
            owner = self._owner(name)
            for entry in claimants:
                if entry is owner or entry.clash:
                    continue
                entry.clash = self._clash_message(entry, owner, claimants)

    @staticmethod
    def _report_clashes(entries: Iterable[Entry[T]]) -> None:
        """A plugin that lost its name to another component is reported, once, where that name
        is used or listed; where two plugins share a name, using it raises instead."""
        for entry in entries:
            if entry.clash and entry.from_plugin:
                report(entry.clash)

    def _clash_message(self, entry: Entry[T], owner: Entry[T] | None, claimants: list[Entry[T]]) -> str:
        if owner is not None:
            return (f"{self.kind} '{entry.name}' from {entry.label} clashes with the one from {owner.label}, "
                    f"which keeps the name; use {entry.qualified_name} to pick the other.")
        rivals = sorted(claimants, key=lambda e: canonical(e.package))
        return (f"{self.kind} '{entry.name}' is provided by {' and '.join(e.label for e in rivals)}; "
                f"pick one as {' or '.join(e.qualified_name for e in rivals)}.")

    def _load(self, entry: Entry[T]) -> None:
        if entry.status == OK:
            return
        if entry.status != NOT_LOADED:
            raise PluginError(entry.error)
        try:
            obj = entry.entry_point.load()
        except Exception as exc:
            entry.status, entry.error = FAILED, self._load_failure(entry, exc)
            if entry.builtin:
                raise  # a bug in tltk keeps its traceback
            raise PluginError(entry.error) from exc
        problem = self._api_problem(entry) or self._contract_problem(entry, obj)
        if problem:
            entry.status, entry.error = FAILED, problem
            raise PluginError(problem)
        entry.obj, entry.status = obj, OK

    def _load_failure(self, entry: Entry[T], exc: Exception) -> str:
        api = self._api_problem(entry)  # a plugin for another API often fails on import
        if api:
            return f"{api[:-1]} (importing it failed with {type(exc).__name__}: {_one_line(exc)})."
        return (f"{self.kind} '{entry.name}' from {entry.label} failed to load ({type(exc).__name__}: {_one_line(exc)}); "
                f"fix or uninstall {entry.package}, or leave it out with TLTK_PLUGINS.")

    def _api_problem(self, entry: Entry[T]) -> str | None:
        if entry.builtin:
            return None
        declared = _declared_api(_entry_module(entry))
        reason = api_incompatibility(declared) if declared is not None else None
        if reason is None:
            return None
        return (f"{self.kind} '{entry.name}' from {entry.label} cannot be used: {reason}; install a release of "
                f"{entry.package} made for plugin API {PLUGIN_API_VERSION.split('.')[0]}.x, or a tltk that matches it.")

    def _contract_problem(self, entry: Entry[T], obj: object) -> str | None:
        problem = self.call.problem(obj)
        if problem is None:
            return None
        protocol = f"; see {self.call.protocol} in tltk.plugin" if self.call.protocol else ""
        return f"{self.kind} '{entry.name}' from {entry.label} does not meet the {self.kind} contract: {problem}{protocol}."

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        if name in self.aliases_elsewhere:
            hint = f" {self.aliases_elsewhere[name]}"
        message = f"Unknown {self.kind} '{name}'.{hint} Known {self.record.plural}: {', '.join(names) or '(none)'}."
        if self.ships_builtins and self.group and not any(e.builtin for e in self._entries):
            message += (f" tltk's own {self.kind}s are missing from its package metadata: reinstall tltk "
                        f"(pip install -e .) and delete any stale tltk.egg-info folder on the Python path.")
        return message


def _rank(entry: Entry[Any]) -> int:
    """Who keeps a plain name: tltk's own, then code registrations, then plugins."""
    if entry.builtin:
        return 0
    return 1 if entry.entry_point is None else 2


def _guard(kind: str, entry: Entry[Any]) -> Callable[..., Any]:
    """``entry.obj`` with any exception but a TltkError turned into a PluginError that names
    the package, so that a plugin's failure is one line, not tltk's traceback."""
    component = entry.obj

    @functools.wraps(component, updated=())  # type: ignore[arg-type]
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return component(*args, **kwargs)  # type: ignore[misc]
        except TltkError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{kind} '{entry.name}' from {entry.label} raised {type(exc).__name__}: {_one_line(exc)}; "
                f"report it to the authors of {entry.package}, or pick another {kind}."
            ) from exc

    for attribute in ("pretrained_available", "description", OPTIONS_ATTRIBUTE, HELP_ATTRIBUTE):
        if hasattr(component, attribute):
            setattr(guarded, attribute, getattr(component, attribute))
    return guarded


def _entry_module(entry: Entry[Any]) -> str:
    module = getattr(entry.entry_point, "module", None)
    return module if isinstance(module, str) else entry.target.partition(":")[0].strip()


def _declared_api(module_name: str) -> object | None:
    """``TLTK_PLUGIN_API`` of the module or the nearest package above it that sets it."""
    parts = module_name.split(".") if module_name else []
    for end in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and hasattr(module, API_ATTRIBUTE):
            return getattr(module, API_ATTRIBUTE)
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def canonical(package: str) -> str:
    """A package name as pip compares them: ``TLTK_Example.plugin`` is ``tltk-example-plugin``."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _split_source(source: str) -> tuple[str, str]:
    package, _, version = source.partition("==")
    return package, version


def _package_of(obj: object) -> str:
    module = getattr(obj, "__module__", None) or "__main__"
    return module.split(".")[0]


# --- reading entry points (package metadata only) -------------------------------------------


@functools.lru_cache(maxsize=1)
def _installed_entry_points() -> metadata.EntryPoints:
    return metadata.entry_points()


def _entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    if not group:
        return []
    return _installed_entry_points().select(group=group)


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return str(dist.metadata["Name"] or getattr(dist, "name", "unknown")), str(dist.version or "")


_ALL_REGISTRIES: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


def refresh() -> None:
    """Read installed packages' entry points again, in every registry."""
    _installed_entry_points.cache_clear()
    for registry in list(_ALL_REGISTRIES):
        registry.refresh()


# --- reporting problems found along the way --------------------------------------------------

_reported: set[str] = set()


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=4)


_reporter: Callable[[str], None] = _warn


def set_reporter(reporter: Callable[[str], None]) -> Callable[[str], None]:
    """Where plugin problems found along the way go (a PluginWarning unless set); returns the old one."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def report(message: str) -> None:
    """Pass ``message`` to the reporter, once per process."""
    if message in _reported:
        return
    _reported.add(message)
    _reporter(message)


# --- tltk's registries, one per kind of the kind table ------------------------------------------

# Names people reach for that tltk spells another way, per kind: the unknown-name message says how.
_ELSEWHERE: dict[str, dict[str, str]] = {
    "strategy": {"scratch": "Training from scratch is not a strategy here: use --weights none (random initial weights) "
                            "with --strategy finetune."},
}

REGISTRIES: dict[str, Registry[Any]] = {
    record.word: Registry(record, aliases_elsewhere=_ELSEWHERE.get(record.word)) for record in KINDS
}
BACKBONES: Registry[Any] = REGISTRIES["backbone"]
HEADS: Registry[Any] = REGISTRIES["head"]
STRATEGIES: Registry[Any] = REGISTRIES["strategy"]
EXPORTERS: Registry[Any] = REGISTRIES["exporter"]
DATA_FORMATS: Registry[Any] = REGISTRIES["data format"]
CALLBACKS: Registry[Any] = REGISTRIES["callback"]


def registries() -> list[Registry[Any]]:
    """Every registry tltk reads, in the order of the kind table (the order ``tltk plugins`` shows)."""
    return [REGISTRIES[record.word] for record in KINDS]


def registry(key: str) -> Registry[Any]:
    """The registry of a kind, by its word, entry-point group or ``tltk list`` word."""
    return REGISTRIES[kind(key).word]


# --- where a run's components came from ---------------------------------------------------------


def provenance(kind_key: str, name: str) -> dict[str, str]:
    """The component ``name`` of a kind with the distribution and version that provide it:
    what a run records, so that reloading it takes that package's component whatever else
    is installed by then. Names no registry holds (``timm:NAME``, an import path) are kept
    as they are."""
    try:
        entry = registry(kind_key).find(name)
    except TltkError:
        return {"name": name}
    return {"name": entry.name, "package": entry.package, "version": entry.version}


def recorded_name(kind_key: str, record: dict[str, str]) -> str:
    """The name to build a recorded component by: the recording package's own
    (``package:name``), so that another package providing the same name later changes
    nothing. A package that is gone, or at another major version, is one sentence saying
    what to install; another minor version loads, with a note."""
    name, package, version = record.get("name", ""), record.get("package"), record.get("version", "")
    if not package or canonical(package) == TLTK:
        return name  # tltk's own names are always its own
    word = kind(kind_key).word
    pin = f"{package}=={version}" if version else package
    try:
        entry = registry(kind_key).find(f"{package}:{name}")
    except UnknownNameError:
        raise PluginError(f"this run was trained with {word} '{name}' from {package} {version}, which is not "
                          f"installed; install it (pip install '{pin}').".replace("  ", " ")) from None
    if version and entry.version and entry.version != version:
        if entry.version.split(".")[0] != version.split(".")[0]:
            raise PluginError(f"this run was trained with {word} '{name}' from {package} {version}, and {package} "
                              f"{entry.version} is installed, another major version; install '{pin}' to use the run.")
        report(f"note: this run was trained with {word} '{name}' from {package} {version}; {entry.version} is "
               f"installed.")
    return f"{package}:{name}"


# --- building a component: one path for every kind ----------------------------------------------


def build(kind_key: str, name: str, /, *args: Any, **options: Any) -> Any:
    """The component ``name`` of a kind (``"head"``, ``"strategy"``, ...), built: the one way
    tltk turns a name and options into a component.

    ``args`` and the keywords of the kind's call shape (``in_features`` for a head,
    ``pretrained`` for a backbone) are tltk's own arguments; every other keyword is an
    option, refused unless the component declares it, and None means "not given".
    """
    found = registry(kind_key)
    factory = found.get(name)
    return build_from(found.record, name, factory, found.origin(name), *args, **options)


def build_from(record: Kind, name: str, factory: Any, origin: str, /, *args: Any, **options: Any) -> Any:
    """``build`` for a factory found another way (``timm:NAME``, a head by import path):
    the options rule, the call, and the kind's contract check on what it built."""
    arguments = {key: options.pop(key) for key in record.call.keywords if key in options}
    accepted = record.check_options(name, factory, options)
    built = factory(*args, **arguments, **accepted)
    problems = record.check(built) if record.check else []
    if problems:
        protocol = f"; see {record.call.protocol} in tltk.plugin" if record.call.protocol else ""
        raise PluginError(f"{record.word} '{name}' from {origin} does not meet the {record.word} contract: "
                          f"{'; '.join(problems)}{protocol}.")
    return built
