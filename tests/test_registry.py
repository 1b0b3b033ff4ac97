"""Tests for tltk.registry: names to components, and plugins found through entry points.

Entry points are faked by replacing ``tltk.registry._entry_points`` with objects that have
what the registry reads from a real ``importlib.metadata.EntryPoint``: ``.name``,
``.value``, ``.load()`` and ``.dist`` (whose ``metadata['Name']`` and ``version`` label it).
tests/test_plugins.py does the same with real installed packages.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import tltk.registry
from tltk.backbones import BACKBONES, backbone_info
from tltk.errors import TltkError, UnknownNameError
from tltk.registry import BLOCKED, FAILED, NOT_LOADED, OK, PluginError, PluginPolicy, Registry, registries, STRATEGIES


def alpha() -> str:
    return "alpha"


def beta() -> str:
    return "beta"


def gamma() -> str:
    return "gamma"


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint; counts how often it is loaded."""

    def __init__(self, name: str, load: Callable[[], Any], dist: FakeDist | None, value: str = "") -> None:
        self.name = name
        self._load = load
        self.dist = dist
        self.value = value
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        return self._load()


@dataclass
class FakeEntryPoints:
    """Stands in for tltk.registry._entry_points; records which groups were read."""

    points: list[FakeEntryPoint]

    def __post_init__(self) -> None:
        self.groups_read: list[str] = []

    def __call__(self, group: str) -> list[FakeEntryPoint]:
        self.groups_read.append(group)
        return list(self.points)


def plugin_function() -> str:
    return "from the plugin"


def raise_import_error() -> Any:
    raise ImportError("No module named 'brokenpkg.heads'")


@pytest.fixture(autouse=True)
def quiet_reports(monkeypatch):
    """Collect what the registry reports instead of warning, fresh for each test."""
    reported: list[str] = []
    monkeypatch.setattr(tltk.registry, "_reported", set())
    monkeypatch.setattr(tltk.registry, "_reporter", reported.append)
    monkeypatch.delenv("TLTK_PLUGINS", raising=False)
    monkeypatch.delenv("TLTK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return reported


@pytest.fixture
def fake_plugins(monkeypatch):
    good = FakeEntryPoint("plugged", lambda: plugin_function, FakeDist("pkg", "1.0"))
    broken = FakeEntryPoint("broken", raise_import_error, FakeDist("brokenpkg", "2.0"))
    shadow = FakeEntryPoint("alpha", lambda: beta, FakeDist("shadowpkg", "0.1"))
    fake = FakeEntryPoints([good, broken, shadow])
    monkeypatch.setattr(tltk.registry, "_entry_points", fake)
    return fake, good, broken, shadow


# ----------------------------------------------------------------- register / get / names


def test_register_decorator_returns_the_object_and_get_returns_it_by_name():
    reg: Registry[Callable[[], str]] = Registry("widget")
    returned = reg.register("a")(alpha)
    reg.add("b", beta, source="mine", colour="blue")
    assert returned is alpha
    assert reg.get("a") is alpha and reg.get("b") is beta
    assert reg.names() == ["a", "b"]
    entry = reg.entry("b")
    assert (entry.name, entry.obj, entry.source, entry.metadata) == ("b", beta, "mine", {"colour": "blue"})
    assert [e.name for e in reg.entries()] == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_names_are_sorted_whatever_the_registration_order():
    reg: Registry[Callable[[], str]] = Registry("widget")
    for name, obj in (("zeta", alpha), ("eta", beta), ("alpha", gamma)):
        reg.add(name, obj)
    assert reg.names() == ["alpha", "eta", "zeta"]


def test_registering_the_same_object_twice_under_one_name_is_harmless():
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("a", alpha)
    reg.add("a", alpha)
    reg.register("a")(alpha)
    assert reg.names() == ["a"]
    assert reg.get("a") is alpha


def test_registering_a_module_level_function_again_after_a_reimport_is_a_clash():
    # Registering in code is for code; packages declare entry points. Only the very same
    # object registers twice without complaint: a reimported module's function is another one.
    source = "def factory():\n    return 'v'\n"
    first, second = {"__name__": "plugin_mod"}, {"__name__": "plugin_mod"}
    exec(source, first)
    exec(source, second)
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("f", first["factory"])
    with pytest.raises(TltkError, match="already registered"):
        reg.add("f", second["factory"])
    assert reg.get("f") is first["factory"]


def test_registering_a_different_function_under_a_taken_name_raises_naming_the_owner():
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("a", alpha, source="firstpkg==1.0")
    with pytest.raises(TltkError, match="'a' is already registered by firstpkg==1.0"):
        reg.add("a", beta)
    assert reg.get("a") is alpha


def test_registering_a_different_lambda_under_a_taken_name_raises():
    # Two lambdas share a __qualname__ ('...<locals>.<lambda>'), but they are different objects.
    reg: Registry[Callable[[], int]] = Registry("widget")
    reg.add("a", lambda: 1)
    with pytest.raises(TltkError, match="already registered"):
        reg.add("a", lambda: 2)
    assert reg.get("a")() == 1


def test_registering_a_different_backbone_factory_under_a_taken_name_raises():
    def impostor(pretrained: bool = False) -> Any:
        raise AssertionError("the impostor must never be registered")

    original = backbone_info("simplecnn").factory
    with pytest.raises(TltkError, match="'simplecnn' is already registered"):
        BACKBONES.add("simplecnn", impostor)
    assert backbone_info("simplecnn").factory is original
    assert "simplecnn" in BACKBONES


# ----------------------------------------------------------------- unknown names


def test_unknown_name_raises_unknown_name_error_that_is_a_tltk_error_and_a_key_error():
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("resnet18", alpha)
    with pytest.raises(UnknownNameError) as info:
        reg.get("nothing-like-it")
    assert isinstance(info.value, TltkError)
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError):  # code that catches KeyError keeps working
        reg.entry("nothing-like-it")


def test_unknown_name_message_suggests_close_matches_and_lists_every_name():
    reg: Registry[Callable[[], str]] = Registry("widget")
    for name in ("resnet18", "resnet50", "alexnet"):
        reg.add(name, alpha if name == "resnet18" else beta if name == "resnet50" else gamma)
    with pytest.raises(UnknownNameError) as info:
        reg.get("resnet81")
    message = str(info.value)
    assert message.startswith("Unknown widget 'resnet81'.")
    assert "Did you mean 'resnet18'" in message
    assert "Known widgets: alexnet, resnet18, resnet50." in message
    assert not message.startswith('"')  # KeyError's repr-quoting is undone


def test_unknown_name_without_close_matches_has_no_did_you_mean_but_still_lists_names():
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("alexnet", alpha)
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Known widgets: alexnet." in str(info.value)


def test_strategy_scratch_is_answered_with_how_tltk_trains_from_scratch():
    with pytest.raises(UnknownNameError) as info:
        STRATEGIES.get("scratch")
    message = str(info.value)
    assert "--weights none" in message and "Known strategies:" in message and "finetune" in message

def test_unknown_name_in_an_empty_registry_says_none_are_known():
    with pytest.raises(UnknownNameError, match=r"Known widgets: \(none\)\."):
        Registry("widget").get("x")



# ----------------------------------------------------------------- entry points: lazy discovery


def test_listing_names_reads_entry_points_once_and_imports_none_of_them(fake_plugins):
    fake, good, broken, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert fake.groups_read == []  # creating a registry reads nothing
    reg.add("alpha", alpha)
    assert reg.names() == ["alpha", "broken", "plugged", "shadowpkg:alpha"]
    assert "plugged" in reg and "broken" in reg
    reg.names()
    assert fake.groups_read == ["tltk.widgets"]
    assert good.loads == 0 and broken.loads == 0


def test_only_the_component_asked_for_is_loaded_and_only_once(fake_plugins):
    fake, good, broken, shadow = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.get("plugged")() == "from the plugin"
    reg.get("plugged")
    assert (good.loads, broken.loads, shadow.loads) == (1, 0, 0)
    assert fake.groups_read == ["tltk.widgets"]


def test_a_registry_without_a_group_never_reads_entry_points(fake_plugins):
    fake, good, _, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget")
    assert reg.names() == []
    assert fake.groups_read == [] and good.loads == 0


def test_plugin_entry_records_its_distribution_and_status(fake_plugins):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.find("plugged").status == NOT_LOADED
    entry = reg.entry("plugged")
    assert (entry.source, entry.package, entry.version, entry.status) == ("pkg==1.0", "pkg", "1.0", OK)
    assert entry.obj is plugin_function
    assert entry.metadata == {}


def test_plugin_entry_point_without_a_distribution_is_labelled_unknown(monkeypatch):
    ep = FakeEntryPoint("orphan", lambda: alpha, None)
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.entry("orphan").source == "unknown"


def test_the_same_distribution_found_twice_on_the_path_gives_one_entry(monkeypatch):
    twice = [FakeEntryPoint("plugged", lambda: plugin_function, FakeDist("pkg", "1.0")) for _ in range(2)]
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints(twice))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.names() == ["plugged"]
    assert reg.get("plugged")() == "from the plugin"


# ----------------------------------------------------------------- broken plugins


def test_broken_plugin_does_not_break_the_registry(fake_plugins):
    _, _, broken, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)
    assert "broken" in reg.names()
    assert reg.get("alpha")() == "alpha"
    assert reg.get("plugged")() == "from the plugin"
    assert broken.loads == 0


def test_using_a_broken_plugin_raises_one_sentence_naming_its_package_version_and_cause(fake_plugins):
    _, _, broken, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    with pytest.raises(PluginError) as info:
        reg.get("broken")
    message = str(info.value)
    assert message.startswith("widget 'broken' from brokenpkg 2.0 failed to load (ImportError: No module named 'brokenpkg.heads')")
    assert "\n" not in message and "TLTK_PLUGINS" in message
    with pytest.raises(PluginError, match="brokenpkg 2.0 failed to load"):
        reg.get("broken")  # the failure is remembered, not retried
    assert broken.loads == 1
    assert (reg.find("broken").status, reg.find("broken").error) == (FAILED, message)


def test_load_all_records_failures_on_their_entries_instead_of_raising(fake_plugins):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    statuses = {e.qualified_name: e.status for e in reg.load_all()}
    assert statuses == {"pkg:plugged": OK, "brokenpkg:broken": FAILED, "shadowpkg:alpha": OK}


def test_an_exception_from_a_plugin_component_becomes_a_plugin_error_naming_the_package(monkeypatch):
    def explode(pretrained: bool = False) -> None:
        raise RuntimeError("CUDA kernel image not found")

    ep = FakeEntryPoint("boom", lambda: explode, FakeDist("boompkg", "0.3"))
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    reg: Registry[Callable[..., None]] = Registry("backbone", group="tltk.backbones")
    with pytest.raises(PluginError) as info:
        reg.get("boom")(pretrained=False)
    assert str(info.value).startswith("backbone 'boom' from boompkg 0.3 raised RuntimeError: CUDA kernel image not found;")
    assert isinstance(info.value.__cause__, RuntimeError)  # --debug shows the plugin's own traceback


def test_a_tltk_error_from_a_plugin_component_passes_through_unchanged(monkeypatch):
    def refuse() -> None:
        raise TltkError("option width=0 is not at least 1.")

    monkeypatch.setattr(tltk.registry, "_entry_points",
                        FakeEntryPoints([FakeEntryPoint("picky", lambda: refuse, FakeDist("pickypkg", "1"))]))
    reg: Registry[Callable[[], None]] = Registry("widget", group="tltk.widgets")
    with pytest.raises(TltkError, match=r"^option width=0 is not at least 1\.$"):
        reg.get("picky")()


def test_a_guarded_plugin_factory_keeps_its_signature_and_declared_attributes(monkeypatch):
    def factory(pretrained: bool = False, width: int = 16) -> None:
        """A factory."""

    factory.pretrained_available = True  # type: ignore[attr-defined]
    monkeypatch.setattr(tltk.registry, "_entry_points",
                        FakeEntryPoints([FakeEntryPoint("f", lambda: factory, FakeDist("p", "1"))]))
    reg: Registry[Callable[..., None]] = Registry("backbone", group="tltk.backbones")
    guarded = reg.get("f")
    assert guarded is not factory and reg.get("f") is guarded
    assert list(importlib.import_module("inspect").signature(guarded).parameters) == ["pretrained", "width"]
    assert guarded.pretrained_available is True and guarded.__doc__ == "A factory."


def test_an_entry_point_of_the_wrong_shape_fails_its_contract_at_load(monkeypatch):
    def no_num_classes(in_features: int, in_channels: int | None) -> None: ...

    points = [FakeEntryPoint("shapeless", lambda: no_num_classes, FakeDist("shapes", "1.2")),
              FakeEntryPoint("constant", lambda: 42, FakeDist("shapes", "1.2"))]
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints(points))
    reg: Registry[Callable[..., None]] = Registry("head", group="tltk.heads")
    with pytest.raises(PluginError, match=r"head 'shapeless' from shapes 1\.2 does not meet the head contract: it cannot "
                                          r"be called as f\(in_features=\.\.\., in_channels=\.\.\., num_classes=\.\.\.\).*"
                                          r"see HeadFactory in tltk\.plugin"):
        reg.get("shapeless")
    with pytest.raises(PluginError, match="'constant' from shapes 1.2 does not meet the head contract: it names a int, not a callable"):
        reg.get("constant")


# ----------------------------------------------------------------- plugin API version


def _module_declaring(name: str, version: object) -> Any:
    module = type(importlib)(name)
    module.TLTK_PLUGIN_API = version  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("declared", ["2.0", "1.9", "0.4"])
def test_a_plugin_for_an_incompatible_api_is_refused_with_what_to_upgrade(monkeypatch, declared):
    monkeypatch.setitem(importlib.import_module("sys").modules, "futurepkg", _module_declaring("futurepkg", declared))
    ep = FakeEntryPoint("fancy", lambda: alpha, FakeDist("futurepkg", "3.0"), value="futurepkg.heads:fancy")
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    with pytest.raises(PluginError) as info:
        reg.get("fancy")
    assert str(info.value) == (
        f"widget 'fancy' from futurepkg 3.0 cannot be used: it is written for tltk plugin API {declared} and this tltk "
        f"provides plugin API 1.0; install a release of futurepkg made for plugin API 1.x, or a tltk that matches it."
    )


@pytest.mark.parametrize("declared", ["1.0", "1"])
def test_a_plugin_declaring_a_compatible_api_loads(monkeypatch, declared):
    monkeypatch.setitem(importlib.import_module("sys").modules, "nowpkg", _module_declaring("nowpkg", declared))
    ep = FakeEntryPoint("fine", lambda: alpha, FakeDist("nowpkg", "1.0"), value="nowpkg.sub:fine")
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    assert Registry("widget", group="tltk.widgets").get("fine")() == "alpha"


def test_an_import_failure_of_a_plugin_for_another_api_is_explained_by_the_api(monkeypatch):
    # The package's __init__ declared its API, then a submodule failed importing a name this tltk lacks.
    monkeypatch.setitem(importlib.import_module("sys").modules, "oldpkg", _module_declaring("oldpkg", "2.1"))

    def fail() -> Any:
        raise ImportError("cannot import name 'FeatureHook' from 'tltk.plugin'")

    ep = FakeEntryPoint("hook", fail, FakeDist("oldpkg", "5.0"), value="oldpkg.hooks:hook")
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    with pytest.raises(PluginError, match=r"written for tltk plugin API 2\.1 .*\(importing it failed with ImportError: "
                                          r"cannot import name 'FeatureHook' from 'tltk\.plugin'\)\.$"):
        Registry("widget", group="tltk.widgets").get("hook")


# ----------------------------------------------------------------- name clashes


def test_a_plugin_never_replaces_a_name_registered_in_code_and_is_reachable_by_package(fake_plugins, quiet_reports):
    _, _, _, shadow = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)
    assert reg.get("alpha") is alpha
    assert shadow.loads == 0
    assert reg.get("shadowpkg:alpha")() == "beta"
    assert quiet_reports == ["widget 'alpha' from shadowpkg 0.1 clashes with the one from test_registry, which keeps "
                             "the name; use shadowpkg:alpha to pick the other."]


def test_a_plugin_never_replaces_tltks_own_component(monkeypatch, quiet_reports):
    own = FakeEntryPoint("simple", lambda: alpha, FakeDist("tltk", "0.1.0"))
    rival = FakeEntryPoint("simple", lambda: beta, FakeDist("tltk-rival", "9.9"))
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([rival, own]))  # the plugin comes first
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.get("simple")() == "alpha"
    assert reg.get("tltk-rival:simple")() == "beta"
    assert reg.get("tltk_Rival:simple")() == "beta"  # package names compare as pip compares them
    assert reg.get("tltk:simple")() == "alpha"
    assert reg.names() == ["simple", "tltk-rival:simple"]
    assert len(quiet_reports) == 1 and "tltk-rival 9.9 clashes with the one from tltk 0.1.0" in quiet_reports[0]


def test_two_plugins_with_one_name_both_lose_it_and_the_error_names_both(monkeypatch, quiet_reports):
    points = [FakeEntryPoint("dup", lambda: alpha, FakeDist("pkg-a", "1")),
              FakeEntryPoint("dup", lambda: beta, FakeDist("pkg-b", "2"))]
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints(points))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    with pytest.raises(PluginError) as info:
        reg.get("dup")
    assert str(info.value) == "widget 'dup' is provided by pkg-a 1 and pkg-b 2; pick one as pkg-a:dup or pkg-b:dup."
    assert (reg.get("pkg-a:dup")(), reg.get("pkg-b:dup")()) == ("alpha", "beta")
    assert reg.names() == ["pkg-a:dup", "pkg-b:dup"]
    assert quiet_reports == [str(info.value)]  # reported once, not once per package
    assert "dup" in reg  # claimed, so lookups explain rather than say 'unknown'


def test_code_registering_under_a_name_tltks_entry_point_holds_raises_without_loading_it(monkeypatch):
    # tltk declares its own components once, as entry points: code that registers the same
    # name is refused, and nothing reconciles the two.
    ep = FakeEntryPoint("alpha", lambda: alpha, FakeDist("tltk", "0.1.0"), value=f"{__name__}:alpha")
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    with pytest.raises(TltkError, match="'alpha' is already registered by tltk==0.1.0"):
        reg.register("alpha")(alpha)
    assert (reg.find("alpha").status, ep.loads) == (NOT_LOADED, 0)
    assert reg.get("alpha") is alpha and ep.loads == 1


# ----------------------------------------------------------------- TLTK_PLUGINS and autoload


def test_tltk_plugins_allows_only_the_listed_packages(fake_plugins, monkeypatch):
    monkeypatch.setenv("TLTK_PLUGINS", "PKG, otherpkg")
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.names() == ["plugged"]
    assert reg.find("plugged").status == NOT_LOADED
    with pytest.raises(PluginError) as info:
        reg.get("broken")
    assert str(info.value) == ("widget 'broken' from brokenpkg 2.0 is not loaded: TLTK_PLUGINS=PKG, otherpkg does not "
                               "list brokenpkg; add it there to use this.")
    assert [e.status for e in reg.all_entries() if e.package != "pkg"] == [BLOCKED, BLOCKED]


def test_disabling_autoload_blocks_every_plugin_but_not_tltks_own(monkeypatch):
    points = [FakeEntryPoint("own", lambda: alpha, FakeDist("tltk", "0.1.0")),
              FakeEntryPoint("plugged", lambda: plugin_function, FakeDist("pkg", "1.0"))]
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints(points))
    monkeypatch.setenv("TLTK_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("TLTK_PLUGINS", "pkg")  # the switch wins over the list
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.names() == ["own"]
    with pytest.raises(PluginError, match="TLTK_DISABLE_PLUGIN_AUTOLOAD is set, so no plugin loads; unset it to use pkg"):
        reg.get("plugged")
    assert points[1].loads == 0


@pytest.mark.parametrize("value, autoload", [("", True), ("0", True), ("false", True), ("1", False), ("yes", False)])
def test_the_autoload_switch_reads_common_spellings(monkeypatch, value, autoload):
    monkeypatch.setenv("TLTK_DISABLE_PLUGIN_AUTOLOAD", value)
    assert PluginPolicy.from_environment().autoload is autoload


def test_refresh_rereads_the_environment_and_keeps_registrations_from_code(fake_plugins, monkeypatch):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("gamma", gamma)
    assert "plugged" in reg.names()
    monkeypatch.setenv("TLTK_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg.refresh()
    assert reg.names() == ["gamma"]


# ----------------------------------------------------------------- tltk's own entry points


def _import_every_module(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{package}."):
        importlib.import_module(info.name)


def test_no_tltk_module_registers_a_component_in_code():
    # Built-ins are declared once, in pyproject.toml: no decorator or add() call beside the
    # entry point, so nothing has to reconcile two registrations of one component.
    import ast
    from pathlib import Path

    package = Path(tltk.registry.__file__).parent
    calls = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "registry.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("register", "add") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.isupper():
                calls.append(f"{path.relative_to(package)}:{node.lineno}")
            if isinstance(node, ast.Name) and node.id == "register_backbone":
                calls.append(f"{path.relative_to(package)}:{node.lineno}")
    assert calls == []
    assert not hasattr(Registry, "_same_component") and not hasattr(Registry, "_adopt")


def test_tltk_declares_its_own_components_only_as_entry_points():
    # Importing every component module registers nothing in code: each built-in is declared
    # once, in pyproject.toml, and loads from there like a plugin's.
    for package in ("tltk.backbones", "tltk.heads", "tltk.strategies", "tltk.export", "tltk.data"):
        _import_every_module(package)
    for registry in registries():
        from_code = [e.name for e in registry.all_entries() if e.entry_point is None]
        assert from_code == [], f"declare these in [project.entry-points.\"{registry.group}\"] instead"


def test_every_entry_point_tltk_declares_loads_and_meets_its_contract():
    for registry in registries():
        own = [e for e in registry.all_entries() if e.builtin]
        # Callbacks come from plugins and code only; every other kind has tltk's own.
        assert bool(own) == registry.ships_builtins, f"tltk declares nothing in {registry.group}: reinstall it"
        for entry in own:
            assert registry.try_load(entry).status == OK, entry.error
            assert entry.source == "tltk==0.1.0"


def test_unknown_name_message_uses_the_kinds_proper_plural():
    from tltk.errors import UnknownNameError
    from tltk.registry import Registry

    strategies = Registry("strategy")
    strategies.register("finetune")(lambda: None)
    with pytest.raises(UnknownNameError, match="Known strategies: finetune"):
        strategies.get("scratch")


# ----------------------------------------------------------------- the kind table


def test_every_kind_fact_comes_from_the_one_kind_table():
    from tltk.catalog import LISTABLE
    from tltk.cli.core import LISTABLE as CLI_LISTABLE
    from tltk.kinds import KINDS
    from tltk.plugin import GROUPS

    assert [k.word for k in KINDS] == ["backbone", "head", "strategy", "exporter", "data format", "callback"]
    assert GROUPS == {k.group: k.word for k in KINDS}
    assert [r.record for r in registries()] == list(KINDS)
    assert [(r.kind, r.group, r.call, r.ships_builtins) for r in registries()] == [
        (k.word, k.group, k.call, k.ships_builtins) for k in KINDS]
    assert LISTABLE == tuple(k.listed_as for k in KINDS) and CLI_LISTABLE == (*LISTABLE, "layers")
    # The data-format kind keeps the group plugins declare in and the word `tltk list` takes.
    assert (tltk.registry.DATA_FORMATS.group, tltk.registry.DATA_FORMATS.record.listed_as) == ("tltk.datasets", "formats")
    assert not hasattr(tltk.registry, "CALL_SHAPES")


def test_the_data_format_reader_contract_is_defined_once():
    import tltk.data
    import tltk.data.formats
    import tltk.plugin

    assert tltk.data.FormatReader is tltk.data.formats.FormatReader is tltk.plugin.FormatReader
    assert tltk.data.DATA_FORMATS is tltk.registry.DATA_FORMATS and tltk.registry.DATA_FORMATS.kind == "data format"


def test_a_kind_is_found_by_its_word_group_or_listing_word_and_an_unknown_one_is_one_sentence():
    from tltk.kinds import DATA_FORMAT, kind

    assert kind("data format") is kind("tltk.datasets") is kind("formats") is DATA_FORMAT
    with pytest.raises(TltkError, match="^there is no component kind 'widget'; the kinds are backbone, head, .*callback\\.$"):
        kind("widget")


def test_build_applies_one_options_rule_to_every_kind_that_takes_options():
    from tltk.errors import UnknownOptionError
    from tltk.kinds import KINDS, OPTIONS_NONE
    from tltk.registry import Registry, build

    factories = {"backbone": lambda pretrained=False, width=1: ("backbone", width),
                 "head": lambda in_features, in_channels, num_classes, width=1: ("head", width),
                 "strategy": lambda width=1: ("strategy", width),
                 "exporter": lambda predictions, out, width=1: ("exporter", width),
                 "callback": lambda width=1: ("callback", width)}
    arguments = {"backbone": ((), {"pretrained": False}), "head": ((), dict(in_features=1, in_channels=None, num_classes=2)),
                 "strategy": ((), {}), "exporter": ((None, None), {}), "callback": ((), {})}
    for record in KINDS:
        if record.options == OPTIONS_NONE:
            assert record.word == "data format"  # called with its path, no options
            continue
        registry = Registry(dataclasses.replace(record, check=None))  # only the options rule is under test
        registry.add("w", factories[record.word])
        args, keywords = arguments[record.word]
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(tltk.registry.REGISTRIES, record.word, registry)
            assert build(record.word, "w", *args, **keywords, width=3, depth=None) == (record.word, 3)
            with pytest.raises(UnknownOptionError) as info:
                build(record.word, "w", *args, **keywords, depth=2)
        assert str(info.value) == f"{record.word} 'w' has no option 'depth'; it takes width=1."


def test_a_factory_that_takes_any_keyword_takes_any_option_and_an_explicit_declaration_wins():
    from tltk.errors import UnknownOptionError
    from tltk.kinds import STRATEGY, Option, declare_options, options_of
    from tltk.registry import build_from

    unchecked = dataclasses.replace(STRATEGY, check=None)  # only the options rule is under test

    def anything(**options: Any) -> dict[str, Any]:
        return options

    assert options_of(anything, STRATEGY.call) is None
    assert build_from(unchecked, "any", anything, "here", colour="red", depth=None) == {"colour": "red"}
    stated = declare_options(Option("colour", "blue", "what colour"))(lambda **options: options)
    assert options_of(stated, STRATEGY.call) == (Option("colour", "blue", "what colour"),)
    with pytest.raises(UnknownOptionError, match="^strategy 'stated' has no option 'size'; it takes colour='blue'\\.$"):
        build_from(unchecked, "stated", stated, "here", size=3)


def test_listing_every_kind_imports_no_torch():
    import subprocess
    import sys

    probe = ("import sys; from click.testing import CliRunner; from tltk.cli import main; "
             "codes = [CliRunner().invoke(main, ['list', w]).exit_code for w in "
             "('backbones', 'heads', 'strategies', 'exporters', 'formats', 'callbacks')]; "
             "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("]")[-1].strip() == "False" and "[0, 0, 0, 0, 0, 0]" in done.stdout, done.stderr


def test_option_help_joins_the_options_read_from_the_signature_and_refuses_a_name_it_does_not_take():
    from tltk.kinds import STRATEGY, Option, option_help, options_of

    @option_help(depth="how deep")
    def factory(depth: int = 2, width: int = 1) -> None: ...

    assert options_of(factory, STRATEGY.call) == (Option("depth", 2, "how deep"), Option("width", 1, ""))
    with pytest.raises(TltkError, match="option_help names colour, which factory does not take"):
        option_help(colour="red")(factory)


def test_an_option_without_a_default_must_be_given_and_its_absence_is_one_sentence():
    from tltk.kinds import STRATEGY
    from tltk.registry import build_from

    unchecked = dataclasses.replace(STRATEGY, check=None)

    def factory(seconds: float, grace: int = 0) -> tuple[float, int]:
        return seconds, grace

    assert build_from(unchecked, "budget", factory, "here", seconds=5) == (5, 0)
    with pytest.raises(TltkError, match=r"^strategy 'budget' needs the option 'seconds'; it takes seconds \(required\), "
                                        r"grace=0\.$"):
        build_from(unchecked, "budget", factory, "here", seconds=None)
