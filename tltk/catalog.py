"""What ``tltk list`` and ``tltk plugins`` show: components and the packages they came from.

Listing reads package metadata only, so it imports neither torch nor any plugin.
``catalog(kind, details=True)`` imports every component of the kind to describe it;
``plugin_rows`` imports each plugin component's module (only that) to say whether it loads.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from tltk.errors import TltkError
from tltk.kinds import KINDS, OPTIONS_NONE, REQUIRED, Kind, options_of
from tltk.registry import BLOCKED, FAILED, OK, Entry, PluginPolicy, registries, registry

# The words `tltk list` takes, one per kind, from the kind table.
LISTABLE: tuple[str, ...] = tuple(record.listed_as for record in KINDS)


def catalog(kind: str, details: bool = False) -> list[dict[str, Any]]:
    """One row per name of ``kind`` (one of ``LISTABLE``): name and ``package==version``;
    with ``details``, also status, description and options (and for backbones, published weights)."""
    found = registry(kind)
    rows = []
    for entry in found.entries():
        row: dict[str, Any] = {"name": found.listed_name(entry), "source": entry.source,
                               "package": entry.package, "version": entry.version}
        if details:
            row.update(_details(kind, found.try_load(entry)))
            row["options"] = _options(found.record, entry)
        rows.append(row)
    if kind == "backbones":
        rows.append(_timm_row(details))
    return rows


def _details(kind: str, entry: Entry[Any]) -> dict[str, Any]:
    if entry.status != OK:
        return {"status": entry.status, **({"pretrained": "-"} if kind == "backbones" else {}), "description": entry.error}
    row: dict[str, Any] = {"status": OK}
    if kind == "backbones":
        row["pretrained"] = "yes" if getattr(entry.obj, "pretrained_available", False) else "no"
    row["description"] = getattr(entry.obj, "description", "") or _first_line(entry.obj)
    return row


def _options(record: Kind, entry: Entry[Any]) -> list[dict[str, Any]] | None:
    """The options a loaded component declares (name, default, help; a default of None where it
    has none and must be given), [] for none, None when it takes any (``**kwargs``) or did not load."""
    if entry.status != OK:
        return None
    declared = () if record.options == OPTIONS_NONE else options_of(entry.obj, record.call)
    if declared is None:
        return None
    return [{"name": o.name, "default": None if o.default is REQUIRED else o.default, "required": o.default is REQUIRED,
             "help": o.help} for o in declared]


def declared_options(kind_key: str, name: str, given: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The options ``name`` of a kind declares, each with the value it is built with (given, or
    its default): what ``tltk summary`` shows beside the layers. None when it takes any."""
    found = registry(kind_key)
    try:
        entry = found.entry(name)
    except TltkError:
        return None
    declared = _options(found.record, entry)
    if declared is None:
        return None
    return [option | {"value": given[option["name"]] if given.get(option["name"]) is not None else option["default"]}
            for option in declared]


def options_text(options: list[dict[str, Any]] | None) -> str:
    """The options column of ``tltk list KIND --details``: ``hidden=512, dropout=0.5``."""
    if options is None:
        return "any"
    if not options:
        return "-"
    return ", ".join(_option_text(o) for o in options)


def _option_text(option: dict[str, Any]) -> str:
    value = f"{option['name']} (required)" if option["required"] else f"{option['name']}={option['default']!r}"
    return f"{value}: {option['help']}" if option["help"] else value


def _timm_row(details: bool) -> dict[str, Any]:
    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        version = ""
    row: dict[str, Any] = {"name": "timm:NAME", "source": f"timm=={version}" if version else "timm",
                           "package": "timm", "version": version}
    if details:
        row.update({"status": OK, "pretrained": "per model", "description": "any timm model, by its timm name",
                    "options": []})
    return row


def plugin_rows(include_builtin: bool = False) -> list[dict[str, str]]:
    """Every plugin component (and tltk's own with ``include_builtin``), with its status:
    ``ok``, ``failed`` (would not load, breaks its contract, or lost its name to a clash)
    or ``blocked`` (by TLTK_PLUGINS or TLTK_DISABLE_PLUGIN_AUTOLOAD), and why."""
    rows = []
    for found in registries():
        for entry in found.all_entries():
            if entry.builtin and not include_builtin:
                continue
            status, detail = _status(found.try_load(entry))
            rows.append({"group": found.group or "", "name": entry.name, "package": entry.package,
                         "version": entry.version, "source": entry.source, "status": status, "detail": detail})
    return rows


def _status(entry: Entry[Any]) -> tuple[str, str]:
    if entry.status in (BLOCKED, FAILED):
        return entry.status, entry.error
    if entry.clash:
        return FAILED, entry.clash
    return entry.status, ""


def policy_note() -> str | None:
    """What TLTK_PLUGINS / TLTK_DISABLE_PLUGIN_AUTOLOAD restrict, if anything."""
    return PluginPolicy.from_environment().describe()


def _first_line(obj: Any) -> str:
    """The docstring's first paragraph, on one line."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())
