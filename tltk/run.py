"""A finished run directory as one object: its model, classes, preprocessing and data.

Everything after training starts from a run directory (config.json, model.safetensors),
never from the command line that made it: evaluation, prediction, features and the
pictures of a run. So loading one, finding the images a split meant at training time and
lining their labels up with the run's classes are written here once. A ``Run`` evaluates
and predicts itself through the model-level modules below it (``tltk.evaluation``,
``tltk.predict``); what consumes a finished run (``tltk.features``, ``tltk.viz``) imports
this module, never the other way round.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tltk import distributed, rundir
from tltk.backbones.base import Preprocessing
from tltk.data import DataSplits, ImageDataset, Sample, load_data
from tltk.data.options import DATA_SETTINGS
from tltk.data.specs import parse_spec, same_data, spec_location
from tltk.errors import DataError, RunDirError
from tltk.evaluation import evaluate_model
from tltk.explain import Explanation, MapSettings, explain_images
from tltk.export import PredictionStream, export
from tltk.fileio import user_path
from tltk.layers import check_pool, resolve_layer, tap
from tltk.model import ModelSpec, TransferModel, build_model
from tltk.predict import Predictions, as_predictions, is_unlabelled_folder, probability_batches, unlabelled_samples
from tltk.registry import recorded_name
from tltk.runtime import Inference, check_batch_size, resolve_device, stream_outputs
from tltk.tta import check_tta


@dataclass(frozen=True)
class WrittenPredictions:
    """Where ``Run.export_predictions`` wrote, how many rows, and the run's task."""

    path: Path
    rows: int
    task: str
    tta: str = "none"  # the test-time augmentation the probabilities were averaged over


@dataclass
class Run:
    """A trained run: ``config`` is config.json as written; the properties read it typed."""

    path: Path
    model: TransferModel
    config: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.config["preprocessing"])

    @property
    def task(self) -> str:
        return str(self.config.get("train", {}).get("task", "multiclass"))

    @property
    def frozen(self) -> list[str]:
        """The modules training left frozen. Runs from before this was recorded froze the
        whole backbone exactly when their strategy was ``freeze``."""
        if "frozen" in self.config:
            return list(self.config["frozen"])
        return ["backbone"] if self.config.get("strategy", {}).get("name") == "freeze" else []

    def inference(self, device: str = "auto", batch_size: int | None = None, workers: int | None = None) -> Inference:
        """Run the model as training did: its precision and memory layout; its batch size and
        workers unless given."""
        train = self.config.get("train", {})
        return Inference(
            device=device,
            precision=str(train.get("precision", "auto")),
            channels_last=str(train.get("channels_last", "auto")),
            batch_size=batch_size if batch_size is not None else int(train.get("batch_size", 64)),
            workers=workers if workers is not None else train.get("workers"),
        )

    def data(self, spec: str | None = None, **overrides: Any) -> DataSplits:
        """The run's own data settings (so "test" is the images training held out), with
        another spec or explicit settings on top; another spec drops the run's class filter."""
        options = recorded_data_options(self.path, self.config["data"], spec, overrides)
        spec_to_load = options.pop("spec")
        if spec is None:
            spec_to_load = self._own_format(spec_to_load)
        splits = load_data(spec_to_load, **options)
        return splits.as_multilabel() if self.task == "multilabel" else splits

    def _own_format(self, spec: str) -> str:
        """The run's own data read by the plugin format that read it in training (``package:format:PATH``),
        whatever else provides the format's name by then; tltk's own formats stay as written."""
        record = self.config.get("components", {}).get("data format")
        format_name, location = parse_spec(spec)
        if not record or format_name != record.get("name"):
            return spec
        return f"{recorded_name('data format', record)}:{location}"

    def split(self, split: str = "test", spec: str | None = None, **overrides: Any) -> tuple[ImageDataset, DataSplits]:
        """One split as the model sees it: targets in the run's class order, the run's
        deterministic preprocessing; with the splits it came from (spec, arrays, skipped)."""
        splits = self.data(spec, **overrides)
        samples = align_to_run_classes(splits.split(split), splits.class_names, self.class_names, splits.spec)
        return ImageDataset(samples, self.preprocessing.eval_transform(), splits.arrays), splits


    @property
    def summary(self) -> dict[str, Any]:
        """The final figures training wrote (summary.json): test accuracy or mAP, best epoch, precision."""
        return rundir.read_summary(self.path)

    def evaluate(self, split: str = "test", data: str | None = None, *, device: str = "auto",
                 batch_size: int | None = None, tta: str = "none", **data_overrides: Any) -> dict[str, Any]:
        """Accuracy, top-5, per-class accuracy and confusion matrix (or per-class AP and both
        mAP definitions for multi-label runs) on one split.

        Without ``data`` the run's own dataset is used; either way the split settings
        (seed, fractions, class filter) default to the run's, so "test" means the same images
        training held out. Launched by torchrun or srun with several processes, each
        evaluates its shard of the split and every one returns the report of the whole split.
        ``tta``: none, flip or flip+crops, the probabilities averaged over those views of each
        image (``tltk.tta``); the report records it.
        """
        check_tta(tta)
        if batch_size is not None:
            check_batch_size(batch_size)
        dataset, splits = self.split(split, data, **data_overrides)
        with distributed.session(resolve_device(device).type) as context:
            report = evaluate_model(self.model, dataset, self.class_names, self.inference(device, batch_size),
                                    self.task, context, tta)
        report.update(run=str(self.path), data=splits.spec, split=split, skipped=len(splits.skipped), tta=tta)
        return report

    def predict(self, data: str | None = None, split: str = "test", *, device: str = "auto", batch_size: int = 64,
                workers: int | None = None, tta: str = "none", **data_overrides: Any) -> Predictions:
        """Every image's probabilities, in the order of the input listing: a split of a
        ``--data`` spec (the run's own by default), or a folder of unlabelled images;
        averaged over the views of ``tta`` (none, flip, flip+crops: ``tltk.tta``)."""
        dataset, chunks = self._probabilities(data, split, device, batch_size, workers, data_overrides, tta)
        probabilities = np.zeros((len(dataset), len(self.class_names)), np.float32)
        done = 0
        for chunk in chunks:
            probabilities[done:done + len(chunk)] = chunk
            done += len(chunk)
        return as_predictions(dataset.samples, probabilities, self.class_names, self.task, tta)

    def iter_predictions(self, data: str | None = None, split: str = "test", *, device: str = "auto",
                         batch_size: int = 64, workers: int | None = None, tta: str = "none",
                         **data_overrides: Any) -> Iterator[Predictions]:
        """The same predictions as ``predict``, one batch at a time, in the same order: memory
        holds one batch, however many images there are."""
        dataset, chunks = self._probabilities(data, split, device, batch_size, workers, data_overrides, tta)
        done = 0
        for chunk in chunks:
            yield as_predictions(dataset.samples[done:done + len(chunk)], chunk, self.class_names, self.task, tta)
            done += len(chunk)

    def export_predictions(self, out: str | Path, format: str = "kaggle", data: str | None = None,
                           split: str = "test", *, device: str = "auto", batch_size: int = 64,
                           workers: int | None = None, tta: str = "none",
                           exporter_options: dict[str, Any] | None = None,
                           **data_overrides: Any) -> WrittenPredictions:
        """Predict and write the file ``out`` with the exporter ``format`` (``tltk predict``).

        The predictions go to the exporter batch by batch (``iter_predictions``): tltk's
        exporters write each batch as it comes, so a file of any number of rows is written
        while memory holds one batch of probabilities."""
        stream = PredictionStream(self.iter_predictions(data, split, device=device, batch_size=batch_size,
                                                        workers=workers, tta=tta, **data_overrides),
                                  self.class_names, self.task, tta)
        path = export(stream, out, format, **(exporter_options or {}))
        return WrittenPredictions(path, stream.rows, self.task, tta)

    def _probabilities(self, data: str | None, split: str, device: str, batch_size: int, workers: int | None,
                       overrides: dict[str, Any], tta: str = "none") -> tuple[ImageDataset, Iterator[np.ndarray]]:
        """The images to predict and their probabilities batch by batch, as the run trained."""
        check_tta(tta)
        dataset = self._prediction_input(data, split, batch_size, overrides)
        return dataset, probability_batches(self.model, dataset, self.inference(device, batch_size, workers), self.task,
                                            tta)

    def features(self, layer: str, split: str = "test", data: str | None = None, *, pool: str = "avg",
                 device: str = "auto", batch_size: int | None = None, **data_overrides: Any) -> np.ndarray:
        """(N, D) features of one split at ``layer`` (conv1, pool5, fc7, logits, or any module
        path), in the split's order, pooled as ``tltk extract --pool`` pools them; fp32 and
        contiguous on every machine, like a store's rows. For a searchable store, use
        ``tltk extract``."""
        check_pool(pool)
        resolved = resolve_layer(self.model, layer)
        dataset, _ = self.split(split, data, **data_overrides)
        settings = replace(self.inference(device, batch_size), precision="fp32", channels_last="off")
        with tap(self.model, resolved.name, pool) as features_of:
            rows = [vectors.numpy() for vectors, _ in stream_outputs(self.model, dataset, settings,
                                                                      forward=features_of)]
        return np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)

    def explain(self, images: Sequence[str | Path | Any], *, layer: str | None = None, class_name: str | None = None,
                method: str = "gradcam", device: str = "auto", threshold: float = 0.5) -> list[Explanation]:
        """Class activation maps of image files (or PIL images): where in each image the model
        found the evidence for its predicted class (each predicted label of a multi-label run,
        or ``class_name``), at the last convolutional layer or ``layer``; see ``tltk.explain``."""
        return explain_images(self.model, images, self.class_names, self.preprocessing, self.task,
                              maps=MapSettings(layer, class_name, method, threshold), device=device)

    def _prediction_input(self, data: str | None, split: str, batch_size: int,
                          overrides: dict[str, Any]) -> ImageDataset:
        check_batch_size(batch_size)
        return prediction_images(data, split, self.preprocessing.eval_transform(),
                                 lambda: self.data(data, **overrides))

    def _repr_html_(self) -> str:
        """A notebook shows a run as a small table: what it is and its test figures."""
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self.describe().items())
        return f"<table>{rows}</table>"

    def __str__(self) -> str:
        return "\n".join(f"{key}: {value}" for key, value in self.describe().items())

    def describe(self) -> dict[str, Any]:
        """What a person wants to see first: where, what model, which data, how it did."""
        model = self.config.get("model", {})
        shown: dict[str, Any] = {"run": str(self.path), "backbone": model.get("backbone"), "head": model.get("head"),
                                 "strategy": self.config.get("strategy", {}).get("name"),
                                 "classes": len(self.class_names), "task": self.task,
                                 "data": self.config.get("data", {}).get("spec")}
        test = self.summary.get("test", {})
        shown.update({f"test {key}": round(value, 4) if isinstance(value, float) else value
                      for key, value in test.items()})
        return shown


def evaluate(run: str | Path | Run, data: str | None = None, split: str = "test", **options: Any) -> dict[str, Any]:
    """``Run.evaluate`` for a run directory or a loaded run (what ``tltk evaluate`` prints)."""
    return as_run(run).evaluate(split, data, **options)


def predict(run: str | Path | Run, data: str | None = None, split: str = "test", **options: Any) -> Predictions:
    """``Run.predict`` for a run directory or a loaded run (what ``tltk predict`` writes)."""
    return as_run(run).predict(data, split, **options)


def export_predictions(run: str | Path | Run, out: str | Path, format: str = "kaggle", data: str | None = None,
                       split: str = "test", **options: Any) -> WrittenPredictions:
    """``Run.export_predictions`` for a run directory or a loaded run (what ``tltk predict`` does)."""
    return as_run(run).export_predictions(out, format, data, split, **options)


def iter_predictions(run: str | Path | Run, data: str | None = None, split: str = "test",
                     **options: Any) -> Iterator[Predictions]:
    """``Run.iter_predictions`` for a run directory or a loaded run."""
    return as_run(run).iter_predictions(data, split, **options)


def prediction_images(data: str | None, split: str, transform: Callable[..., Any],
                      splits: Callable[[], DataSplits]) -> ImageDataset:
    """What a prediction reads: a folder of unlabelled images in path order, or ``split`` of the
    data ``splits()`` loads (a run's recorded settings, or those an exported model carries)."""
    if data is not None and is_unlabelled_folder(Path(data).expanduser()):
        return ImageDataset(unlabelled_samples(Path(data).expanduser()), transform)
    loaded = splits()
    return ImageDataset(loaded.split(split), transform, loaded.arrays)


def load_run(path: str | Path) -> Run:
    """Rebuild a run's model from config.json and model.safetensors alone, frozen where
    training left it frozen, in eval mode."""
    path = Path(path).expanduser()
    config = rundir.read_config(path)
    model = build_model(recorded_spec(config), load_weights=False)
    missing, unexpected = model.load_state_dict(rundir.load_weights(path), strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise RunDirError(f"{path / rundir.WEIGHTS} does not match the model in its config.json (first odd tensor: '{first}').")
    run = Run(path, model, config)
    model.freeze_modules(run.frozen)
    model.eval()
    return run


def recorded_data_options(run: Path, record: dict[str, Any], spec: str | None,
                          overrides: dict[str, Any]) -> dict[str, Any]:
    """``load_data``'s arguments (``spec`` among them) for a run's data: the recorded settings,
    with another spec or explicit settings on top. Another spec drops the class filter; the
    recorded spec (given again, however its path is spelled) keeps it, and must still be
    where training found it."""
    options = {key: value for key, value in record.items() if key in DATA_SETTINGS}
    if spec is not None and not same_data(spec, options["spec"]):
        options.update(spec=spec, classes=None, train_per_class=None)
    elif overrides.get("image_root") is None:
        check_recorded_data(run, record)
    else:
        check_recorded_data(run, {**record, "image_root": None})
    options.update({key: value for key, value in overrides.items() if value is not None})
    return options


def check_recorded_data(run: Path, record: dict[str, Any]) -> None:
    """Say in one sentence where a run's data was and how to give its new place, when the
    recorded path (absolute since tltk records it so; relative in older runs) is gone."""
    spec = str(record["spec"])
    location = spec_location(spec)
    if location is not None and not location.exists():
        raise DataError(moved_data_message(run, spec, location, record))
    image_root = record.get("image_root")
    if image_root is not None and not user_path(image_root).exists():
        raise DataError(f"Run {run} read its images under --image-root {image_root}, which is not there any more; "
                        f"if the images have moved, give their new place with --image-root NEW_PATH.")


def moved_data_message(run: Path, spec: str, location: Path, record: dict[str, Any]) -> str:
    format_name, _ = parse_spec(spec)
    new_place = f"{format_name or record.get('format') or 'folder'}:NEW_PATH"
    classes = record.get("classes")
    advice = f"--data {new_place}" + (f" --classes {','.join(classes)}" if classes else "")
    if not location.is_absolute():
        return (f"Run {run} records its data as {spec}, a path relative to the folder it was trained in, which is "
                f"not found from {Path.cwd()}; run the command from that folder, or give the data's place with {advice}.")
    typed = record.get("spec_as_typed")
    return (f"Run {run} was trained on data at {location}" + (f" (--data {typed})" if typed and typed != spec else "")
            + f", which is not there any more; if the data has moved, give its new place with {advice}.")


def recorded_spec(config: dict[str, Any]) -> ModelSpec:
    """The run's model, its backbone and head taken from the packages that built it (config.json's
    "components"; runs from before it was recorded name them plainly)."""
    spec = ModelSpec(**config["model"])
    components = config.get("components", {})
    return replace(spec, **{part: recorded_name(part, components[part]) for part in ("backbone", "head")
                            if part in components})


def as_run(run: str | Path | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def align_to_run_classes(samples: Sequence[Sample], data_classes: list[str], run_classes: list[str],
                         where: str) -> list[Sample]:
    """Re-index targets from the data's class list to the run's.

    Multi-class: a sample of a class the run never saw is an error. Multi-label: the
    run's classes must all be in the data (columns are matched by name; extra data
    classes are dropped).
    """
    index = {name: i for i, name in enumerate(run_classes)}
    if samples and isinstance(samples[0].target, tuple):
        missing = [name for name in run_classes if name not in data_classes]
        if missing:
            raise DataError(f"{where} lacks the run's classes {', '.join(missing[:5])}; evaluate on data labelled with them.")
        columns = [data_classes.index(name) for name in run_classes]
        return [Sample(s.source, tuple(s.target[c] for c in columns), s.id) for s in samples]
    unknown = sorted({data_classes[s.target] for s in samples} - set(index))
    if unknown:
        raise DataError(
            f"{where} has classes the run was not trained on ({', '.join(unknown[:5])}); "
            f"pass --classes with the run's classes ({', '.join(run_classes[:10])})."
        )
    return [Sample(s.source, index[data_classes[s.target]], s.id) for s in samples]


__all__ = ["DATA_SETTINGS", "Run", "WrittenPredictions", "align_to_run_classes", "as_run", "check_recorded_data",
           "evaluate", "export_predictions", "iter_predictions", "load_run", "predict", "recorded_data_options"]
