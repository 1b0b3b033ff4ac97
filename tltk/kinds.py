"""The kinds of component, in one table: what every other module derives its kind facts from.

Each kind (backbone, head, strategy, exporter, data format, callback) is one ``Kind``
record: the entry-point group packages declare its components in, the word messages use,
the word ``tltk list`` takes, how tltk calls a component (``CallShape``), which options a
component takes (``OPTIONS_DECLARED`` or ``OPTIONS_NONE``) and the check tltk runs on what
a factory built. The registries, ``tltk list``, ``tltk plugins``, ``tltk.testing`` and
``tltk.plugin.GROUPS`` all read this table, so a new kind is one record here.

A component declares its options by its factory's signature: each named parameter that
is not part of the call shape is an option, its default the option's default (a factory
that takes ``**kwargs`` takes any option). ``declare_options`` states them explicitly,
with help text, where the signature cannot say enough. Like ``tltk.plugin``, this module
imports no torch: the contract checks import it when they run.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from tltk.errors import TltkError, UnknownOptionError

# The options rules. "declared": the options a component declares, each refused by name
# when not declared. "none": the call shape is all a component gets (data formats).
OPTIONS_DECLARED = "declared"
OPTIONS_NONE = "none"

ContractCheck = Callable[[object], list[str]]
F = TypeVar("F", bound=Callable[..., Any])


class _Required:
    """The default of an option that has none: the component needs it given."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


# --- how tltk calls a component ----------------------------------------------------------


@dataclass(frozen=True)
class CallShape:
    """How tltk calls the components of one kind: the arguments tltk itself passes, which
    are never the user's options. Checked when an entry point loads, so a factory of the
    wrong shape is reported by name before anything runs."""

    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    protocol: str = ""

    @property
    def arguments(self) -> frozenset[str]:
        """The parameter names tltk fills in; every other parameter is an option."""
        return frozenset((*self.positional, *self.keywords))

    def problem(self, obj: object) -> str | None:
        """Why tltk cannot call ``obj`` this way, or None."""
        if not callable(obj):
            return f"it names a {type(obj).__name__}, not a callable"
        signature = _signature(obj)
        if signature is None:  # some C callables have no signature; calling will tell
            return None
        try:
            signature.bind(*([None] * len(self.positional)), **dict.fromkeys(self.keywords))
        except TypeError as exc:
            return f"it cannot be called as f({', '.join([*self.positional, *(f'{k}=...' for k in self.keywords)])}): {exc}"
        return None


# --- the options a component takes -----------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a component: its name, default (``REQUIRED`` where it has none), and
    the help ``tltk list KIND --details`` shows."""

    name: str
    default: Any = REQUIRED
    help: str = ""

    def describe(self) -> str:
        """``name=default``, or ``name (required)``: how a message lists it."""
        return f"{self.name} (required)" if self.default is REQUIRED else f"{self.name}={self.default!r}"


OPTIONS_ATTRIBUTE = "tltk_options"
HELP_ATTRIBUTE = "tltk_option_help"


def declare_options(*options: Option) -> Callable[[F], F]:
    """Decorator: the options a factory takes, stated rather than read from its signature
    (for a factory that takes ``**kwargs`` but only some keys, or to give help text)."""

    def decorator(factory: F) -> F:
        setattr(factory, OPTIONS_ATTRIBUTE, tuple(options))
        return factory

    return decorator


def option_help(**texts: str) -> Callable[[F], F]:
    """Decorator: help text for options read from the factory's signature, so that each
    default stays stated once, in the signature, and ``tltk list KIND --details`` can say
    what the option does. A name that is not a parameter of the factory is a mistake here."""

    def decorator(factory: F) -> F:
        signature = _signature(factory)
        unknown = sorted(set(texts) - set(signature.parameters)) if signature is not None else []
        if unknown:
            raise TltkError(f"option_help names {', '.join(unknown)}, which {getattr(factory, '__name__', 'the factory')} "
                            f"does not take; give help only for its parameters.")
        setattr(factory, HELP_ATTRIBUTE, dict(texts))
        return factory

    return decorator


def options_of(factory: object, call: CallShape) -> tuple[Option, ...] | None:
    """The options ``factory`` declares; None when it takes any option (``**kwargs`` and
    no explicit declaration)."""
    declared = getattr(factory, OPTIONS_ATTRIBUTE, None)
    if declared is not None:
        return tuple(declared)
    signature = _signature(factory)
    if signature is None:
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    texts: dict[str, str] = getattr(factory, HELP_ATTRIBUTE, None) or {}
    return tuple(
        Option(p.name, REQUIRED if p.default is inspect.Parameter.empty else p.default, texts.get(p.name, ""))
        for p in params if p.kind in named and p.name not in call.arguments
    )


def given_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a caller gave: a value of None means "not given" (a CLI flag left out),
    so it is dropped here and never refused; the component's own default applies."""
    return {key: value for key, value in options.items() if value is not None}


def _signature(obj: object) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# --- the kind table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """Everything tltk knows about one kind of component, stated once."""

    word: str  # what messages call one: "backbone", "data format"
    group: str  # the entry-point group packages declare them in
    listed_as: str  # the word `tltk list` takes: "backbones", "formats"
    call: CallShape
    options: str = OPTIONS_DECLARED
    check: ContractCheck | None = None  # what a built component may lack; run by every build
    ships_builtins: bool = True  # tltk declares some itself (none found then means a broken install)

    @property
    def plural(self) -> str:
        return self.word[:-1] + "ies" if self.word.endswith("y") else self.word + "s"

    def check_options(self, name: str, factory: object, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options to pass to ``factory``: those given (not None), once each is known to be
        one it declares and every option without a default is among them."""
        given = given_options(options)
        declared = () if self.options == OPTIONS_NONE else options_of(factory, self.call)
        if declared is not None:
            self._refuse_undeclared(name, given, declared)
            self._require_missing(name, given, declared)
        return given

    def _refuse_undeclared(self, name: str, given: Mapping[str, Any], declared: tuple[Option, ...]) -> None:
        unknown = [key for key in given if key not in {o.name for o in declared}]
        if unknown:
            raise UnknownOptionError(unknown_options_message(self.word, name, unknown, declared))

    def _require_missing(self, name: str, given: Mapping[str, Any], declared: tuple[Option, ...]) -> None:
        missing = [o.name for o in declared if o.default is REQUIRED and o.name not in given]
        if missing:
            raise TltkError(f"{self.word} '{name}' needs the option{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(m) for m in missing)}; it takes {', '.join(o.describe() for o in declared)}.")


def unknown_options_message(word: str, name: str, unknown: list[str], declared: tuple[Option, ...]) -> str:
    """One sentence: which options the component has not, and which it takes."""
    which = f"option '{unknown[0]}'" if len(unknown) == 1 else "options " + ", ".join(f"'{k}'" for k in unknown)
    takes = f"it takes {', '.join(o.describe() for o in declared)}" if declared else "it takes no options"
    return f"{word} '{name}' has no {which}; {takes}."


# --- the contract checks tltk runs on every build ----------------------------------------------

BACKBONE_MEMBERS = ("net", "feature_dim", "spatial_channels", "layers", "preprocessing",
                    "forward_spatial", "forward_vector", "stages")
STRATEGY_METHODS = ("prepare", "param_groups", "on_epoch_start", "describe")
CALLBACK_METHODS = ("bind", "on_train_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_message",
                    "on_train_end", "state_dict", "load_state_dict", "close")


def backbone_problems(backbone: object) -> list[str]:
    """What a built backbone lacks of ``BackboneModule``: cheap checks tltk runs on every build."""
    from torch import nn

    if not isinstance(backbone, nn.Module):
        return [f"the factory returned a {type(backbone).__name__}, not a torch.nn.Module"]
    missing = [m for m in BACKBONE_MEMBERS if not hasattr(backbone, m)]
    if missing:
        return [f"it has no {', '.join(missing)}"]
    problems = _dimension_problems(backbone) + _preprocessing_problems(backbone.preprocessing)
    return problems + _layer_problems(backbone)


def head_problems(head: object) -> list[str]:
    """What a built head lacks: it must be a ``torch.nn.Module``."""
    from torch import nn

    return [] if isinstance(head, nn.Module) else [f"the factory returned a {type(head).__name__}, not a torch.nn.Module"]


def strategy_problems(strategy: object) -> list[str]:
    """What a built strategy lacks of ``TrainingStrategy``."""
    missing = [m for m in STRATEGY_METHODS if not callable(getattr(strategy, m, None))]
    return [f"it has no {', '.join(missing)} method"] if missing else []


def callback_problems(callback: object) -> list[str]:
    """What a built callback lacks of ``tltk.plugin.Callback``'s hooks (read by shape, so this
    check needs nothing from the training layer)."""
    missing = [m for m in CALLBACK_METHODS if not callable(getattr(callback, m, None))]
    if missing:
        return [f"the factory built a {type(callback).__name__}, which has no {', '.join(missing)}; "
                f"return a tltk.plugin.Callback"]
    return []


def _dimension_problems(backbone: Any) -> list[str]:
    problems = []
    if not _positive_int(backbone.feature_dim):
        problems.append(f"feature_dim is {backbone.feature_dim!r}, not a positive int")
    if backbone.spatial_channels is not None and not _positive_int(backbone.spatial_channels):
        problems.append(f"spatial_channels is {backbone.spatial_channels!r}, not None or a positive int")
    return problems


def _preprocessing_problems(prep: Any) -> list[str]:
    size = getattr(prep, "input_size", None)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_positive_int(n) for n in size)):
        return [f"preprocessing.input_size is {size!r}, not (height, width)"]
    for field in ("mean", "std"):
        values = getattr(prep, field, None)
        if not (isinstance(values, (tuple, list)) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            return [f"preprocessing.{field} is {values!r}, not three numbers (R, G, B)"]
    if any(v <= 0 for v in prep.std):
        return [f"preprocessing.std {tuple(prep.std)} has a value that is not positive"]
    return []


def _layer_problems(backbone: Any) -> list[str]:
    if not isinstance(backbone.layers, Mapping):
        return [f"layers is a {type(backbone.layers).__name__}, not a mapping of layer names to module paths"]
    problems = []
    for label, path in backbone.layers.items():
        try:
            backbone.net.get_submodule(path)
        except (AttributeError, TypeError):
            problems.append(f"layers['{label}'] = {path!r} names no module inside .net")
    return problems


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


BACKBONE = Kind("backbone", "tltk.backbones", "backbones",
                CallShape(keywords=("pretrained",), protocol="BackboneFactory"), check=backbone_problems)
HEAD = Kind("head", "tltk.heads", "heads",
            CallShape(keywords=("in_features", "in_channels", "num_classes"), protocol="HeadFactory"),
            check=head_problems)
STRATEGY = Kind("strategy", "tltk.strategies", "strategies", CallShape(protocol="StrategyFactory"),
                check=strategy_problems)
EXPORTER = Kind("exporter", "tltk.exporters", "exporters", CallShape(positional=("predictions", "out"), protocol="Exporter"))
DATA_FORMAT = Kind("data format", "tltk.datasets", "formats",
                   CallShape(positional=("path",), keywords=("image_root", "strict"), protocol="FormatReader"),
                   options=OPTIONS_NONE)
CALLBACK = Kind("callback", "tltk.callbacks", "callbacks", CallShape(protocol="CallbackFactory"),
                check=callback_problems, ships_builtins=False)

# Every kind, in the order `tltk plugins` and `tltk list` show them.
KINDS: tuple[Kind, ...] = (BACKBONE, HEAD, STRATEGY, EXPORTER, DATA_FORMAT, CALLBACK)


def kind(key: str) -> Kind:
    """The record for a kind, by its word (``"head"``), group (``"tltk.heads"``) or the word
    ``tltk list`` takes (``"heads"``)."""
    for record in KINDS:
        if key in (record.word, record.group, record.listed_as):
            return record
    known = ", ".join(record.word for record in KINDS)
    raise TltkError(f"there is no component kind '{key}'; the kinds are {known}.")
