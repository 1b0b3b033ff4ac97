"""The states of every random generator training draws from, saved and restored with a checkpoint.

Continuing a run bit for bit needs torch's generator, CUDA's, NumPy's global one,
Python's ``random`` and the trainer's own named ``torch.Generator``s (a loader's) to go
on from where they were. The states travel in the checkpoint's JSON manifest, their
tensors in its safetensors file (``tltk.train.state_json``). Restoring checks every
state on a throwaway generator first, so that setting the real ones cannot fail halfway.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from tltk.errors import printable
from tltk.train.state_json import Damaged, Decoder, Mismatch, TensorTable, is_kind

_NUMPY_KEYS = 624
_PYTHON_WORDS = 625
_UINT32 = 1 << 32


def rng_record(table: TensorTable, generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Every generator training draws from. CUDA's are saved only once CUDA is in use:
    asking for them would start CUDA on every GPU of a CPU run."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [table.encode(s, f"rng/cuda/{i}") for i, s in enumerate(torch.cuda.get_rng_state_all())]
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": table.encode(torch.get_rng_state(), "rng/torch"),
        "cuda": cuda,
        "numpy": {
            "keys": table.encode(torch.from_numpy(np.asarray(keys, dtype=np.int64)), "rng/numpy"),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version,
            "internal": table.encode(torch.tensor(internal, dtype=torch.int64), "rng/python"),
            "gauss_next": gauss_next,
        },
        "generators": {name: table.encode(g.get_state(), f"rng/generators/{name}") for name, g in generators.items()},
    }


@dataclass
class RngStates:
    """The generator states from the manifest, checked by setting them on throwaway
    generators first, so that restoring the real ones cannot fail halfway."""

    torch_state: torch.Tensor
    cuda_states: list[torch.Tensor]
    numpy_state: tuple[str, np.ndarray, int, int, float]
    python_state: tuple[int, tuple[int, ...], float | None]
    generator_states: dict[str, torch.Tensor]

    @classmethod
    def decode(cls, node: Any, decoder: Decoder) -> "RngStates":
        if not isinstance(node, dict) or set(node) != {"torch", "cuda", "numpy", "python", "generators"}:
            raise Damaged("rng does not list the torch, cuda, numpy, python and generators states")
        torch_state = _byte_state(decoder.decode(node["torch"], "rng.torch"), "rng.torch")
        cuda = node["cuda"]
        if not isinstance(cuda, list):
            raise Damaged("rng.cuda is not a list")
        cuda_states = [_byte_state(decoder.decode(s, f"rng.cuda[{i}]"), f"rng.cuda[{i}]") for i, s in enumerate(cuda)]
        generators = node["generators"]
        if not isinstance(generators, dict):
            raise Damaged("rng.generators is not an object")
        generator_states = {name: _byte_state(decoder.decode(s, f"rng.generators.{name}"), f"rng.generators.{name}")
                            for name, s in generators.items()}
        numpy_state = _numpy_state(node["numpy"], decoder)
        python_state = _python_state(node["python"], decoder)
        return cls(torch_state, cuda_states, numpy_state, python_state, generator_states)

    def check(self, generators: Mapping[str, torch.Generator]) -> None:
        _try_state("the torch generator state", lambda: torch.Generator().set_state(self.torch_state))
        _try_state("the NumPy generator state", lambda: np.random.RandomState().set_state(self.numpy_state))
        _try_state("the Python random state", lambda: random.Random().setstate(self.python_state))
        for name, generator in generators.items():
            if name not in self.generator_states:
                raise Mismatch(f"it has no state for the generator '{printable(name)}'")
            state = self.generator_states[name]
            if state.numel() != generator.get_state().numel():
                raise Mismatch(f"its state for the generator '{printable(name)}' is for another kind of generator")
            if generator.device.type == "cpu":
                _try_state(f"the state of generator '{printable(name)}'",
                           lambda s=state: torch.Generator().set_state(s))
        if self.cuda_states and torch.cuda.is_available():
            expected = torch.cuda.get_rng_state(0).numel()
            if any(s.numel() != expected for s in self.cuda_states):
                raise Mismatch("its CUDA generator states are not those of this CUDA build")

    def apply(self, generators: Mapping[str, torch.Generator]) -> None:
        """CUDA states go to the devices this machine has; on a machine without CUDA they are
        dropped, since a run moved to another device cannot be bit-identical anyway."""
        torch.set_rng_state(self.torch_state)
        if self.cuda_states and torch.cuda.is_available():
            for device in range(min(len(self.cuda_states), torch.cuda.device_count())):
                torch.cuda.set_rng_state(self.cuda_states[device], device)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)
        for name, generator in generators.items():
            generator.set_state(self.generator_states[name])


def _byte_state(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise Damaged(f"{where} is not a generator state (a 1-d uint8 tensor)")
    return value


def _numpy_state(node: Any, decoder: Decoder) -> tuple[str, np.ndarray, int, int, float]:
    if not isinstance(node, dict) or set(node) != {"keys", "pos", "has_gauss", "cached_gaussian"}:
        raise Damaged("rng.numpy is not a NumPy generator state")
    keys = decoder.decode(node["keys"], "rng.numpy.keys")
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.shape == (_NUMPY_KEYS,)
            and bool(((keys >= 0) & (keys < _UINT32)).all())):
        raise Damaged(f"rng.numpy.keys is not {_NUMPY_KEYS} 32-bit words")
    pos, has_gauss, cached = node["pos"], node["has_gauss"], node["cached_gaussian"]
    if not (is_kind(pos, "count") and pos <= _NUMPY_KEYS and has_gauss in (0, 1) and not isinstance(has_gauss, bool)
            and is_kind(cached, "number")):
        raise Damaged("rng.numpy has a position, has_gauss or cached_gaussian out of range")
    return "MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, float(cached)


def _python_state(node: Any, decoder: Decoder) -> tuple[int, tuple[int, ...], float | None]:
    if not isinstance(node, dict) or set(node) != {"version", "internal", "gauss_next"}:
        raise Damaged("rng.python is not a Python random state")
    internal = decoder.decode(node["internal"], "rng.python.internal")
    if not (isinstance(internal, torch.Tensor) and internal.dtype == torch.int64 and internal.shape == (_PYTHON_WORDS,)
            and bool(((internal >= 0) & (internal < _UINT32)).all())):
        raise Damaged(f"rng.python.internal is not {_PYTHON_WORDS} 32-bit words")
    version, gauss_next = node["version"], node["gauss_next"]
    if not is_kind(version, "count") or not is_kind(gauss_next, "number?"):
        raise Damaged("rng.python has a version or gauss_next of the wrong kind")
    return version, tuple(internal.tolist()), None if gauss_next is None else float(gauss_next)


def _try_state(what: str, set_state: Any) -> None:
    try:
        set_state()
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise Mismatch(f"{what} is not one this machine's generator accepts ({printable(str(exc))[:80]})") from exc
