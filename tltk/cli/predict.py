"""``tltk predict``: a run's (or an exported ONNX model's) predictions, to a file; ``tltk export``:
the run's model itself, as an ONNX or TorchScript file."""

from __future__ import annotations

import click

from tltk.cli.app import main, out, print_json, tta_option


@main.command()
@click.argument("run")
@click.option("--data", "data_spec", default=None, help="A --data spec, or a folder of unlabelled images; default: the run's data.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", "out_file", required=True, help="File to write.")
@click.option("--format", "fmt", default="kaggle", show_default=True, help="kaggle, csv, jsonl, or a plugin's exporter.")
@click.option("--label-as", default=None, help="kaggle, multi-class: name or index of the class [name].")
@click.option("--multilabel-as", default=None, help="kaggle, multi-label: probs (a column per class) or labels [probs].")
@click.option("--threshold", type=float, default=None, help="Multi-label: probability at which a label is predicted [0.5].")
@click.option("--sample-submission", default=None, help="kaggle: match this file's header, id column and row order.")
@click.option("--id-from", default=None, help="Row ids from the image's stem, path or index [kaggle: stem, else path].")
@click.option("--image-root", default=None, help="Folder that csv: file names are relative to.")
@click.option("--image-column", default=None, help="hf: the column of images [the one Image column].")
@click.option("--label-column", default=None, help="hf: the column of labels [the one ClassLabel column].")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@tta_option
@click.option("--json", "as_json", is_flag=True, help="Print where the file went and how many rows, as JSON.")
def predict(run: str, data_spec: str | None, split: str, out_file: str, fmt: str, label_as: str | None,
            multilabel_as: str | None, threshold: float | None, sample_submission: str | None,
            id_from: str | None, image_root: str | None, image_column: str | None, label_column: str | None,
            device: str, batch_size: int, tta: str, as_json: bool) -> None:
    """Predict with RUN (a run directory, or a model.onnx from `tltk export`) and write one row per image,
    in the order of the input listing."""
    from tltk.deploy import export_predictions

    written = export_predictions(run, out_file, fmt, data_spec, split, device=device, batch_size=batch_size, tta=tta,
                                 exporter_options=dict(label_as=label_as, multilabel_as=multilabel_as,
                                                       threshold=threshold, sample_submission=sample_submission,
                                                       id_from=id_from),
                                 image_root=image_root, image_column=image_column, label_column=label_column)
    if as_json:
        print_json({"out": str(written.path), "rows": written.rows, "format": fmt, "task": written.task,
                    "tta": written.tta})
        return
    augmented = f", test-time augmentation {written.tta}" if written.tta != "none" else ""
    out.print(f"wrote {written.rows} predictions ({written.task}{augmented}) to {written.path} as {fmt}")



@main.command(name="export")
@click.argument("run")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]),
              help="onnx (runs in onnxruntime) or torchscript (runs in torch.jit.load).")
@click.option("--out", "out_file", required=True, help="Model file to write.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="The split of the run's data the parity check feeds both models.")
@click.option("--check-images", type=int, default=256, show_default=True, help="Images in the parity check.")
@click.option("--data", "data_spec", default=None, help="Where the run's data is now, if it has moved.")
@click.option("--json", "as_json", is_flag=True, help="Print the file and the parity check as JSON.")
def export_command(run: str, fmt: str, out_file: str, split: str, check_images: int, data_spec: str | None,
                   as_json: bool) -> None:
    """The whole model of RUN (backbone, head, softmax) as one file, with its classes and preprocessing
    inside; written only after it matches the run's probabilities within 1e-4 on its own images."""
    from tltk.deploy import export_model

    result = export_model(run, fmt, out_file, split=split, data=data_spec, check_images=check_images)
    if as_json:
        print_json(result.to_dict())
        return
    parity = result.parity
    out.print(f"wrote {result.out} ({fmt}); parity on {parity.images} {split} images: max probability difference "
              f"{parity.max_difference:.2g} (allowed {result.tolerance:g}), same top class on {parity.same_labels} of "
              f"{parity.images}")
