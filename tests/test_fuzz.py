"""Fuzzed parsers: every input gives a valid result or tltk's own error, never another exception.

The CSV label reader, the VOC and COCO annotation readers and the ``--data`` spec parser read what
users and downloads hand them. Hypothesis generates the inputs: near-valid files built
from the formats' own tokens (so the parsers get past their first check) as well as
arbitrary text and bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data_fixtures import write_image
from tests.voc_fixtures import BILLION_LAUGHS
from tltk.data.coco import read_annotation_file
from tltk.data.csvfile import read_csv
from tltk.data.samples import RawDataset
from tltk.data.specs import parse_spec, resolve_spec
from tltk.data.voc import VOC_CLASSES, parse_annotation
from tltk.errors import TltkError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGES = ("a.png", "b.png", "sub/c.png", "missing.png")


@pytest.fixture(scope="module")
def workdir():
    """A folder holding three real images the generated CSVs may name (and one they may not find)."""
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        for image in IMAGES[:3]:
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            write_image(root / image)
        yield root


csv_cells = st.one_of(
    st.sampled_from(IMAGES + ("filename", "label", "labels", "tags", "id", "0", "1", "-1", "2", "cat", "cat dog", "")),
    st.text(max_size=8),
)
csv_rows = st.lists(st.lists(csv_cells, min_size=0, max_size=4), min_size=0, max_size=6)
csv_headers = st.sampled_from([
    ["filename", "label"], ["filename", "labels"], ["image", "tags"], ["id", "cat", "dog"], ["file", "class", "x"],
    ["filename"], [],
])


def _csv_text(header: list[str], rows: list[list[str]], separator: str) -> str:
    lines = [header, *rows]
    return "".join(separator.join(line) + "\n" for line in lines)


@FUZZ
@given(header=csv_headers, rows=csv_rows, separator=st.sampled_from([",", ";", ",,", "\t", ',"']))
def test_csv_reader_on_generated_tables_gives_a_dataset_or_a_tltk_error(workdir, header, rows, separator):
    path = workdir / "labels.csv"
    path.write_text(_csv_text(header, rows, separator), encoding="utf-8")
    _expect_result_or_tltk_error(lambda: read_csv(path), RawDataset)


@FUZZ
@given(data=st.binary(max_size=200))
def test_csv_reader_on_arbitrary_bytes_gives_a_dataset_or_a_tltk_error(workdir, data):
    path = workdir / "bytes.csv"
    path.write_bytes(data)
    _expect_result_or_tltk_error(lambda: read_csv(path), RawDataset)


xml_names = st.one_of(st.sampled_from(VOC_CLASSES), st.text(max_size=6))
xml_objects = st.lists(
    st.tuples(xml_names, st.sampled_from(["0", "1", "", "yes", " 1 "]), st.booleans()), max_size=4,
)


def _annotation(objects: list[tuple[str, str, bool]], close_root: bool) -> str:
    body = "".join(
        f"<object><name>{_escape(name)}</name>" + (f"<difficult>{flag}</difficult>" if with_flag else "") + "</object>"
        for name, flag, with_flag in objects
    )
    return f"<annotation>{body}" + ("</annotation>" if close_root else "")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@FUZZ
@given(objects=xml_objects, close_root=st.booleans())
def test_voc_annotation_reader_on_generated_xml_gives_labels_or_a_tltk_error(workdir, objects, close_root):
    path = workdir / "annotation.xml"
    path.write_text(_annotation(objects, close_root), encoding="utf-8")
    labels = _expect_result_or_tltk_error(lambda: parse_annotation(path), tuple)
    if labels is not None:
        assert len(labels) == len(VOC_CLASSES) and set(labels) <= {-1, 0, 1}
        for name, flag, with_flag in objects:
            if name in VOC_CLASSES and not (with_flag and flag.strip() == "1"):
                assert labels[VOC_CLASSES.index(name)] == 1


@FUZZ
@given(data=st.binary(max_size=300))
def test_voc_annotation_reader_on_arbitrary_bytes_gives_labels_or_a_tltk_error(workdir, data):
    path = workdir / "bytes.xml"
    path.write_bytes(data)
    _expect_result_or_tltk_error(lambda: parse_annotation(path), tuple)


@pytest.mark.parametrize("entity_xml", [
    BILLION_LAUGHS,
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation><object>'
    "<name>&e;</name></object></annotation>",
])
def test_voc_annotation_reader_refuses_entity_declarations_instead_of_expanding_them(tmp_path, entity_xml):
    path = tmp_path / "bomb.xml"
    path.write_text(entity_xml)
    with pytest.raises(TltkError, match="refused"):
        parse_annotation(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12,
)
coco_fields = {
    "image": st.fixed_dictionaries({"id": st.one_of(st.integers(0, 3), json_values),
                                    "file_name": st.one_of(st.sampled_from(["a.jpg", "../x.jpg", "/abs.jpg", ""]), json_values)}),
    "annotation": st.fixed_dictionaries({"image_id": st.one_of(st.integers(0, 3), json_values),
                                         "category_id": st.one_of(st.integers(0, 3), json_values),
                                         "iscrowd": st.one_of(st.sampled_from([0, 1, True, 2, "1"]), json_values)}),
    "category": st.fixed_dictionaries({"id": st.one_of(st.integers(0, 3), json_values),
                                       "name": st.one_of(st.sampled_from(["cat", "dog", " ", ""]), json_values)}),
}
coco_documents = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "images": st.one_of(st.lists(st.one_of(coco_fields["image"], json_values), max_size=4), json_values),
        "annotations": st.one_of(st.lists(st.one_of(coco_fields["annotation"], json_values), max_size=4), json_values),
        "categories": st.one_of(st.lists(st.one_of(coco_fields["category"], json_values), max_size=3), json_values),
    }),
)


@FUZZ
@given(document=coco_documents)
def test_coco_annotation_reader_on_generated_json_gives_a_file_or_a_tltk_error(workdir, document):
    import json

    path = workdir / "instances_train.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    coco = _expect_result_or_tltk_error(lambda: read_annotation_file(path), object)
    if coco is not None:
        assert all(category_id in coco.categories for found in coco.instances.values() for category_id, _ in found)


@FUZZ
@given(data=st.binary(max_size=300))
def test_coco_annotation_reader_on_arbitrary_bytes_gives_a_file_or_a_tltk_error(workdir, data):
    path = workdir / "instances_bytes.json"
    path.write_bytes(data)
    _expect_result_or_tltk_error(lambda: read_annotation_file(path), object)


spec_prefixes = st.sampled_from(["", "folder:", "csv:", "voc:", "cifar10:", "mnist:", "builtin:", "nope:", ":", "::"])


@FUZZ
@given(prefix=spec_prefixes, rest=st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=20))
def test_data_spec_parser_gives_a_format_and_path_or_a_tltk_error(prefix, rest):
    spec = prefix + rest
    parsed = _expect_result_or_tltk_error(lambda: parse_spec(spec), tuple)
    if parsed is not None:
        format_name, location = parsed
        assert location and location == location.strip()
        assert format_name is None or spec.strip().startswith(format_name + ":")
    _expect_result_or_tltk_error(lambda: resolve_spec(spec), tuple)


def _expect_result_or_tltk_error(call, result_type):
    """The call's result when it is of ``result_type``; None when it raised a one-line TltkError."""
    try:
        result = call()
    except TltkError as error:
        message = str(error)
        assert message and "\n" not in message.strip(), f"error is not one line: {message!r}"
        return None
    assert isinstance(result, result_type)
    return result


# --- the feature store's manifest --------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def store_manifest(workdir):
    """A real 40-row store; each example rewrites its manifest and opens it again."""
    import numpy as np

    from tltk.features.store import create_store
    from tltk.features.writing import iter_chunks

    vectors = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    rows = [{"id": str(i), "path": f"img{i}.png", "labels": ["a"], "split": "train"} for i in range(40)]
    header = {"source": {"fingerprint": "f" * 64, "description": "fuzz"}, "layer": "fc7", "pool": "avg",
              "class_names": ["a"], "task": "multiclass", "data": []}
    path = workdir / "store"
    create_store(path, iter_chunks(vectors, rows, 16), header, metric="l2")
    return path, (path / "manifest.json").read_text(encoding="utf-8")


def _open_and_search(path):
    import numpy as np

    from tltk.features.store import FeatureStore

    store = FeatureStore.open(path)
    store.search(np.zeros((1, 8), np.float32), 3)
    return store


@FUZZ
@given(key=st.sampled_from(["count", "dim", "metric", "format", "index", "layer", "source", "class_names", "pool"]),
       value=json_values)
def test_store_with_one_manifest_field_replaced_opens_or_gives_a_tltk_error(store_manifest, key, value):
    import json

    from tltk.features.store import FeatureStore

    path, original = store_manifest
    manifest = json.loads(original)
    manifest[key] = value
    try:
        (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        _expect_result_or_tltk_error(lambda: _open_and_search(path), FeatureStore)
    finally:
        (path / "manifest.json").write_text(original, encoding="utf-8")


@FUZZ
@given(cut=st.integers(0, 400), junk=st.binary(max_size=20))
def test_store_with_a_truncated_or_garbled_manifest_gives_a_tltk_error(store_manifest, cut, junk):
    from tltk.features.store import FeatureStore

    path, original = store_manifest
    try:
        (path / "manifest.json").write_bytes(original.encode()[:cut] + junk)
        _expect_result_or_tltk_error(lambda: _open_and_search(path), FeatureStore)
    finally:
        (path / "manifest.json").write_text(original, encoding="utf-8")
