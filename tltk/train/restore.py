"""Fitting a checkpoint's saved states to the objects of the run that resumes from it.

The model, optimizer, scheduler, loss scaler and generators must be built as the run
built them. Every saved state is checked against the live object's own state first
(tensor names, shapes and dtypes, optimizer buffers, the structure of a scheduler's
state), and only once everything fits is anything restored: a checkpoint written by a
differently built run is one ``Mismatch`` and leaves the objects as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tltk.errors import printable
from tltk.train.rng_state import RngStates
from tltk.train.state_json import Decoder, Mismatch, dtype_name, show


@dataclass
class SavedStates:
    """The checkpoint's states, decoded from its manifest and tensor file."""

    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    rng: RngStates

    @classmethod
    def decode(cls, raw: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "SavedStates":
        """The states in the manifest ``raw``; ``Damaged`` when a tree or tensor reference is
        malformed, or the tensor file holds a tensor no reference names."""
        decoder = Decoder(tensors)
        decoded = {key: decoder.decode(raw[key], key) for key in ("model", "best_model", "optimizer", "scheduler",
                                                                  "scaler")}
        rng = RngStates.decode(raw["rng"], decoder)
        decoder.check_all_used()
        return cls(decoded["model"], decoded["best_model"], decoded["optimizer"], decoded["scheduler"],
                   decoded["scaler"], rng)

    def check_fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None,
                  scaler: torch.amp.GradScaler | None, generators: Mapping[str, torch.Generator]) -> None:
        """``Mismatch`` unless every state can be restored into these objects."""
        live_model = model.state_dict()
        _check_model_tensors(self.model, live_model, "model")
        if self.best_model is not None:
            _check_model_tensors(self.best_model, live_model, "best_model")
        _check_optimizer(self.optimizer, optimizer)
        _check_optional("scheduler", self.scheduler, scheduler)
        _check_optional("scaler", self.scaler, scaler)
        self.rng.check(generators)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None,
                scaler: torch.amp.GradScaler | None, generators: Mapping[str, torch.Generator]) -> None:
        """Load every state; call only after ``check_fit`` passed for the same objects."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        self.rng.apply(generators)


def _check_model_tensors(saved: Any, live: dict[str, torch.Tensor], what: str) -> None:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise Mismatch(f"its {what} is not a table of tensors")
    missing = [k for k in live if k not in saved]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Mismatch(f"its {what} has no tensor {printable(missing[0])}{more}, which this model has")
    extra = [k for k in saved if k not in live]
    if extra:
        raise Mismatch(f"its {what} has tensor {printable(str(extra[0]))}, which this model lacks")
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape or saved[key].dtype != tensor.dtype:
            raise Mismatch(f"{what} tensor {printable(key)} is {dtype_name(saved[key].dtype)} "
                            f"{list(saved[key].shape)} there and {dtype_name(tensor.dtype)} {list(tensor.shape)} here")


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise Mismatch("its optimizer state is not an optimizer state_dict")
    _same_structure(saved["param_groups"], live["param_groups"], "optimizer param_groups")
    parameters: dict[int, torch.Tensor] = {}
    for index, (saved_group, live_group, group) in enumerate(
        zip(saved["param_groups"], live["param_groups"], optimizer.param_groups)
    ):
        if saved_group["params"] != live_group["params"]:
            raise Mismatch(f"optimizer parameter group {index} holds other parameters there than here")
        parameters.update(zip(live_group["params"], group["params"]))
    if not isinstance(saved["state"], dict):
        raise Mismatch("its optimizer state is not a table per parameter")
    schema = _state_schema(optimizer)
    for index, entry in saved["state"].items():
        if index not in parameters or not isinstance(entry, dict):
            raise Mismatch(f"its optimizer has state for a parameter {show(index)} this optimizer does not have")
        _check_parameter_state(entry, parameters[index], schema, f"optimizer state of parameter {index}")


# The buffers torch's optimizers keep per parameter: "param" is a tensor of the parameter's
# shape, "scalar" a 0-d tensor; a trailing "?" allows None (or, for keys, absence).
_ADAM_STATE = {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param", "max_exp_avg_sq": "param??"}
_SGD_STATE = {"momentum_buffer": "param?"}


def _state_schema(optimizer: torch.optim.Optimizer) -> dict[str, str] | None:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return _ADAM_STATE
    if isinstance(optimizer, torch.optim.SGD):
        return _SGD_STATE
    return None  # another optimizer: tensors of the parameter's shape or 0-d, plain numbers


def _check_parameter_state(
    entry: dict[Any, Any], param: torch.Tensor, schema: dict[str, str] | None, where: str
) -> None:
    if schema is not None:
        required = {k for k, kind in schema.items() if not kind.endswith("??")}
        if not required <= set(entry) <= set(schema):
            raise Mismatch(f"{where} has buffers {printable(str(sorted(map(str, entry))))[:80]}, not those "
                            f"this optimizer keeps ({', '.join(sorted(schema))})")
    for key, value in entry.items():
        kind = schema[key].rstrip("?") if schema is not None else "any"
        nullable = schema is not None and schema[key].endswith("?")
        if value is None and nullable:
            continue
        if kind == "param" and not (isinstance(value, torch.Tensor) and value.shape == param.shape
                                    and value.is_floating_point()):
            raise Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, not a float tensor of shape "
                            f"{list(param.shape)}")
        if kind == "scalar" and not (isinstance(value, torch.Tensor) and value.dim() == 0
                                     and value.is_floating_point()):
            raise Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, not a 0-d float tensor")
        if kind == "any" and not _plausible_buffer(value, param):
            raise Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, which does not fit its parameter")


def _plausible_buffer(value: Any, param: torch.Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 or value.shape == param.shape
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {dtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    return show(value)


def _check_optional(what: str, saved: Any, live_object: Any | None) -> None:
    if live_object is None:
        if saved is not None:
            raise Mismatch(f"it holds {what} state and this run has no {what}")
        return
    if saved is None:
        raise Mismatch(f"it holds no {what} state and this run has a {what}")
    live = live_object.state_dict()
    if what == "scaler" and bool(saved) != bool(live):
        raise Mismatch("its loss scaling is " + ("on" if saved else "off") + " and this run's is " +
                        ("on" if live else "off") + " (a different --precision)")
    _same_structure(saved, live, what)


def _same_structure(saved: Any, live: Any, where: str) -> None:
    """``saved`` has the shape of ``live``: same keys, lengths and kinds of values throughout.

    Schedulers restore by ``__dict__.update``, so a value of the wrong kind would surface
    only later, in the middle of training; checking against the live object's own state
    catches it at load time for any scheduler."""
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != live.shape or saved.dtype != live.dtype:
            raise Mismatch(f"{where} is {_describe(saved)} there and {_describe(live)} here")
        return
    if isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise Mismatch(f"{where} has entries {_keys(saved)} there and {_keys(live)} here")
        for key in live:
            _same_structure(saved[key], live[key], f"{where}.{key}")
        return
    if isinstance(live, (list, tuple)):
        if type(saved) is not type(live) or len(saved) != len(live):
            raise Mismatch(f"{where} is {show(saved)} there and a {type(live).__name__} of {len(live)} here")
        for i, (a, b) in enumerate(zip(saved, live)):
            _same_structure(a, b, f"{where}[{i}]")
        return
    if _kind(saved) != _kind(live):
        raise Mismatch(f"{where} is {show(saved)} there and {show(live)} here")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _keys(value: Any) -> str:
    if not isinstance(value, dict):
        return show(value)
    return printable(str(sorted(map(str, value))))[:80]

