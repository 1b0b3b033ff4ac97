"""Writes docs/cli.md from the commands' own help, so the reference cannot drift.

Run ``python docs/make_cli_reference.py`` after changing an option; a test fails while
docs/cli.md differs from what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tltk.cli import main

PYTHON_API = {
    "list": "tltk.catalog.catalog(kind)",
    "summary": "tltk.summary.summarize(tltk.build_model(ModelSpec(...)), input_size)",
    "finetune": "tltk.finetune(backbone, data=..., out=..., **settings) -> Run",
    "evaluate": "tltk.load_run(run).evaluate(split, data)",
    "predict": "tltk.load_run(run).predict(data) (a .onnx file: tltk.deploy.predict_onnx(file, data)) then "
               "tltk.export.export(predictions, out, fmt)",
    "export": "tltk.deploy.export_model(run, format, out)",
    "plugins": "tltk.catalog.plugin_rows(...)",
    "plot": "tltk.viz.curves.write_curves(run)",
    "visualize": "tltk.viz.filters.visualize_filters / activations.image_activations / misclassified.visualize_misclassified"
                 " / gradcam.visualize_gradcam (maps alone: tltk.load_run(run).explain(images))",
    "compare": "tltk.viz.compare.write_comparison(runs, out)",
    "sweep": "tltk.sweep.sweep(base_config, param, values, out_root)",
    "tensorboard": "tltk.viz.tensorboard.launch_tensorboard(argv)",
    "layers": "tltk.layers.list_layers(backbone)",
    "extract": "tltk.features.extract.extract(load_source(...), layer, out, data, shard=(i, n))",
    "index": "tltk.features.store.FeatureStore(path); tltk.features.extract.add_images(...); "
             "tltk.features.merge_parts(parts, out)",
    "neighbors": "tltk.features.neighbors.neighbours_of_images / neighbours_of_rows",
    "evaluate-retrieval": "tltk.features.retrieval.evaluate_retrieval(store)",
    "tsne": "tltk.viz.tsne.write_tsne(FeatureStore(path), out)",
    "lr-find": "tltk.train.finetune.find_learning_rate(FinetuneConfig(...), LrFinderSettings(...), out)",
    "report": "tltk.report(runs, out, pdf=None)",
}

HEADER = """# tltk command reference

Every command prints for people by default and takes `--json` where it prints figures.
Errors are one sentence on stderr with exit code 2; `tltk --debug COMMAND` keeps the traceback.
An option given twice is refused, except those that take a list (`--query`, `--query-index`,
`--backbone-opt`, `visualize gradcam --image`), rather than silently keeping the last value.
Each command is a thin wrapper over a Python function, named under its heading.
"""


def reference() -> str:
    settings = {"terminal_width": 88, "max_content_width": 88, "help_option_names": ["-h", "--help"]}
    root = click.Context(main, info_name="tltk", **settings)
    parts = [HEADER]
    for name, command in sorted(main.commands.items()):
        ctx = click.Context(command, info_name=name, parent=root, **settings)
        python = PYTHON_API.get(name, "")
        parts.append(f"## tltk {name}\n\nPython: `{python}`\n\n```\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    target = Path(__file__).with_name("cli.md")
    target.write_text(reference())
    sys.stdout.write(f"wrote {target}\n")
