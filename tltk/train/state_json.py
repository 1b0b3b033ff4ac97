"""Values of a training run's state as JSON, with every tensor kept aside for one safetensors file.

A checkpoint stores ``state_dict``s without pickle: ``TensorTable.encode`` turns a tree
of dicts, lists, tuples, numbers and tensors into JSON in which each tensor is a
reference ``{"$tensor": key, "dtype": ..., "shape": [...]}``, and ``Decoder`` turns such a
tree back, checking every reference against the tensors read from the file. Int-keyed
dicts and tuples are tagged so they come back as what they were: a ``state_dict``
compares equal only then.

Reading fails in one of two ways, kept apart because the user's remedy differs: the
file is ``Damaged`` (train again), or it is intact but a ``Mismatch`` for the objects
it is restored into (resume with the run's own settings).
"""

from __future__ import annotations

from typing import Any

import torch

from tltk.errors import printable


class Damaged(Exception):
    """Raised inside the reader with what is wrong; turned into one RunDirError at the edge."""


class Mismatch(Exception):
    """The checkpoint is intact but was written for a differently built run."""


class TensorTable:
    """Tensors to write, by key, with the JSON that stands in for them in the manifest.

    A tensor that appears twice (tied weights) is stored once and referenced twice; one
    that overlaps another's memory is copied, since safetensors refuses shared storage.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[tuple[str, int]] = set()

    def encode(self, value: Any, path: str) -> Any:
        """``value`` as JSON: tensors become references, int-keyed dicts and tuples are tagged
        so that they come back as what they were (``state_dict`` equality depends on it)."""
        if isinstance(value, torch.Tensor):
            return self._reference(value, path)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return self._encode_dict(value, path)
        raise TypeError(f"{path} holds a {type(value).__name__}, which a checkpoint cannot store without pickle")

    def _encode_dict(self, value: dict[Any, Any], path: str) -> Any:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        for key in value:
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(f"{path} has a key of type {type(key).__name__}; a checkpoint keeps int and str keys")
        return {"$map": [[k, self.encode(v, f"{path}/{k}")] for k, v in value.items()]}

    def _reference(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        tensor = tensor.detach()
        view = None
        if tensor.numel() > 0:
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
            view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in self._views:
                return tensor_ref(self._views[view], tensor)
            if storage in self._storages:
                tensor = tensor.clone()
            self._storages.add(storage)
        key = path
        while key in self.tensors:
            key += "'"
        self.tensors[key] = tensor
        if view is not None:
            self._views[view] = key
        return tensor_ref(key, tensor)


def tensor_ref(key: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"$tensor": key, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or is_kind(value, kind[:-1])
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "rows":
        return isinstance(value, list) and all(isinstance(row, dict) for row in value)
    raise AssertionError(kind)


def show(value: Any) -> str:
    return printable(repr(value))[:60]


class Decoder:
    """Turns manifest trees back into values, resolving tensor references against the file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, node: Any, where: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise Damaged(f"{where} holds a {type(node).__name__}")
        if "$tensor" in node:
            return self._tensor(node, where)
        if "$tuple" in node:
            if set(node) != {"$tuple"} or not isinstance(node["$tuple"], list):
                raise Damaged(f"{where} is a malformed tuple")
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(node["$tuple"]))
        if "$map" in node:
            return self._map(node, where)
        if any(key.startswith("$") for key in node):
            raise Damaged(f"{where} has an unknown tag")
        return {key: self.decode(v, f"{where}.{key}") for key, v in node.items()}

    def _map(self, node: dict[str, Any], where: str) -> dict[Any, Any]:
        items = node["$map"]
        if set(node) != {"$map"} or not isinstance(items, list):
            raise Damaged(f"{where} is a malformed mapping")
        result: dict[Any, Any] = {}
        for item in items:
            if not isinstance(item, list) or len(item) != 2:
                raise Damaged(f"{where} has an entry that is not a [key, value] pair")
            key = item[0]
            if isinstance(key, bool) or not isinstance(key, (int, str)) or key in result:
                raise Damaged(f"{where} has a key {show(key)} that is not a unique int or string")
            result[key] = self.decode(item[1], f"{where}[{key!r}]")
        return result

    def _tensor(self, node: dict[str, Any], where: str) -> torch.Tensor:
        key, dtype, shape = node.get("$tensor"), node.get("dtype"), node.get("shape")
        if set(node) != {"$tensor", "dtype", "shape"} or not isinstance(key, str):
            raise Damaged(f"{where} is a malformed tensor reference")
        if key not in self.tensors:
            raise Damaged(f"{where} names tensor {show(key)}, which the tensor file does not hold")
        tensor = self.tensors[key]
        if dtype != dtype_name(tensor.dtype) or shape != list(tensor.shape):
            raise Damaged(f"{where} expects a {show(dtype)} tensor of shape {show(shape)}, but the tensor file "
                           f"holds {dtype_name(tensor.dtype)} {list(tensor.shape)}")
        self.used.add(key)
        return tensor

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise Damaged(f"the tensor file holds {len(unused)} tensors the manifest does not mention "
                           f"({show(unused[0])})")

