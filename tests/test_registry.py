"""Tests for tltk.registry: names to components, and plugins found through entry points.

Entry points are faked by replacing ``tltk.registry._entry_points`` with objects that have
the three things the registry reads from a real ``importlib.metadata.EntryPoint``:
``.name``, ``.load()`` and ``.dist`` (whose ``metadata['Name']`` and ``version`` label it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

import tltk.registry
from tltk.backbones import BACKBONES, backbone_info, register_backbone
from tltk.errors import TltkError, UnknownNameError
from tltk.registry import Registry


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

    def __init__(self, name: str, load: Callable[[], Any], dist: FakeDist | None) -> None:
        self.name = name
        self._load = load
        self.dist = dist
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


def test_registering_a_module_level_function_again_after_a_reimport_is_harmless():
    # A module imported twice (say, under importlib.reload) defines a new function object
    # with the same module and qualified name: that is the same component, not a clash.
    source = "def factory():\n    return 'v'\n"
    first, second = {"__name__": "plugin_mod"}, {"__name__": "plugin_mod"}
    exec(source, first)
    exec(source, second)
    assert first["factory"] is not second["factory"]
    reg: Registry[Callable[[], str]] = Registry("widget")
    reg.add("f", first["factory"])
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
        register_backbone("simplecnn", pretrained=False)(impostor)
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


def test_unknown_name_in_an_empty_registry_says_none_are_known():
    with pytest.raises(UnknownNameError, match=r"Known widgets: \(none\)\."):
        Registry("widget").get("x")


# ----------------------------------------------------------------- entry points


def test_entry_points_are_not_read_or_loaded_until_a_name_is_listed(fake_plugins):
    fake, good, broken, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)  # registering in-tree does not touch the group
    assert fake.groups_read == [] and good.loads == 0 and broken.loads == 0
    assert reg.names() == ["alpha", "broken", "plugged"]
    assert fake.groups_read == ["tltk.widgets"]
    assert good.loads == 1
    reg.names()
    reg.get("plugged")
    assert fake.groups_read == ["tltk.widgets"] and good.loads == 1  # read once, cached


def test_entry_points_are_loaded_by_the_first_get(fake_plugins):
    fake, good, _, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert good.loads == 0
    assert reg.get("plugged") is plugin_function
    assert good.loads == 1 and fake.groups_read == ["tltk.widgets"]


def test_a_registry_without_a_group_never_reads_entry_points(fake_plugins):
    fake, good, _, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget")
    assert reg.names() == []
    assert fake.groups_read == [] and good.loads == 0


def test_plugin_entry_records_its_distribution_as_source(fake_plugins):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    entry = reg.entry("plugged")
    assert entry.source == "pkg==1.0"
    assert entry.obj() == "from the plugin"
    assert entry.metadata == {}


def test_plugin_entry_point_without_a_distribution_is_labelled_unknown(monkeypatch):
    ep = FakeEntryPoint("orphan", lambda: alpha, None)
    monkeypatch.setattr(tltk.registry, "_entry_points", FakeEntryPoints([ep]))
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    assert reg.entry("orphan").source == "unknown"


def test_plugin_cannot_replace_an_in_tree_name(fake_plugins):
    _, _, _, shadow = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)
    assert reg.get("alpha") is alpha
    assert reg.entry("alpha").source == "tltk"
    assert shadow.loads == 0


def test_broken_plugin_does_not_break_the_registry(fake_plugins):
    _, _, broken, _ = fake_plugins
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)
    assert "broken" in reg.names()
    assert reg.get("alpha")() == "alpha"
    assert reg.get("plugged")() == "from the plugin"
    assert broken.loads == 1
    entry = reg.entry("broken")
    assert entry.source == "brokenpkg==2.0"
    assert "No module named 'brokenpkg.heads'" in entry.metadata["broken"]


def test_using_a_broken_plugin_raises_a_tltk_error_naming_its_package_and_cause(fake_plugins):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    factory = reg.get("broken")  # looking it up works; using it explains why it cannot
    with pytest.raises(TltkError) as info:
        factory(pretrained=False)
    message = str(info.value)
    assert "widget 'broken'" in message
    assert "brokenpkg==2.0" in message
    assert "No module named 'brokenpkg.heads'" in message


def test_unknown_name_message_includes_plugin_names(fake_plugins):
    reg: Registry[Callable[[], str]] = Registry("widget", group="tltk.widgets")
    reg.add("alpha", alpha)
    with pytest.raises(UnknownNameError) as info:
        reg.get("pluged")
    assert "Did you mean 'plugged'" in str(info.value)
    assert "alpha, broken, plugged" in str(info.value)
