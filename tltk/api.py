"""The Python API in the command line's words.

``tltk.finetune("resnet18", data="folder:~/photos", head="mlp", freeze=True, epochs=5,
out="runs/r18")`` trains like ``tltk finetune`` with the same names and returns the finished
``Run``, which evaluates and predicts itself (``run.evaluate()``, ``run.predict(images)``)
and shows as a table in a notebook. The settings are those of ``FinetuneConfig``,
``TrainConfig`` and ``DataOptions``, given flat, as the command line gives them; a
``FinetuneConfig`` built by hand is taken as it is.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from tltk.errors import TltkError
from tltk.run import Run, load_run
from tltk.train.callbacks import Callback, Reporter
from tltk.train.finetune import DataOptions, FinetuneConfig
from tltk.train.finetune import finetune as train_run
from tltk.train.resume import DEFAULT_CHECKPOINT_INTERVAL
from tltk.train.trainer import TrainConfig


def finetune(
    what: str | FinetuneConfig,
    out: str | Path | None = None,
    *,
    data: str | DataOptions | None = None,
    freeze: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    callbacks: Sequence[Callback | str | dict[str, Any]] = (),
    resume: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    **settings: Any,
) -> Run:
    """Train ``what`` (a backbone name, or a whole ``FinetuneConfig``) into the run directory
    ``out`` and return it as a ``Run``. ``freeze=True`` is ``strategy="freeze"``, as
    ``--freeze`` is on the command line; every other setting keeps its name. ``callbacks``
    holds callback objects and the names (or ``{"name", "options"}``) of plugin callbacks,
    which config.json records as ``--callback`` does."""
    if out is None:
        raise TltkError("finetune needs out, the run directory to write (e.g. out='runs/r18').")
    watching = [c for c in callbacks if isinstance(c, Callback)]
    named = [{"name": c, "options": {}} if isinstance(c, str) else dict(c) for c in callbacks
             if not isinstance(c, Callback)]
    if isinstance(what, FinetuneConfig):
        if data is not None or freeze or settings or named:
            raise TltkError("finetune takes a FinetuneConfig as it is; set data, freeze, named callbacks and the "
                            "other settings on it, or pass a backbone name instead.")
        config = what
    else:
        config = finetune_config(what, data, freeze=freeze, callbacks=named, **settings)
    train_run(config, out, overwrite=overwrite, reporter=reporter, callbacks=watching, resume=resume,
              checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval)
    return load_run(out)


def finetune_config(backbone: str, data: str | DataOptions | None, *, freeze: bool = False,
                    **settings: Any) -> FinetuneConfig:
    """A ``FinetuneConfig`` from flat settings, each sent to the dataclass that declares it;
    a name none declares is refused with the names there are."""
    if data is None:
        raise TltkError(f"finetune('{backbone}', ...) needs data, a --data spec such as data='folder:~/photos'.")
    groups = {"train": _names(TrainConfig) - {"task"}, "data": _names(DataOptions) - {"spec"},
              "finetune": _names(FinetuneConfig) - {"backbone", "data", "train"}}
    unknown = sorted(set(settings) - set().union(*groups.values()))
    if unknown:
        known = ", ".join(sorted(set().union(*groups.values())))
        raise TltkError(f"finetune takes no setting {', '.join(repr(name) for name in unknown)}; the settings are "
                        f"{known}.")
    given = {group: {k: v for k, v in settings.items() if k in names} for group, names in groups.items()}
    if freeze:
        given["finetune"]["strategy"] = "freeze"
    options = data if isinstance(data, DataOptions) else DataOptions(str(data), **given["data"])
    return FinetuneConfig(backbone=backbone, data=options, train=TrainConfig(**given["train"]), **given["finetune"])


def _names(config: type) -> set[str]:
    return {field.name for field in fields(config)}


__all__ = ["finetune", "finetune_config"]
