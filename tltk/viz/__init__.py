"""Pictures of runs: training curves, filters, activations, mistakes and comparisons.

Each module turns a run directory (or a model) into PNG files with matplotlib's Agg
renderer, so they work on machines with no display. Modules are imported on use:
``import tltk.viz`` does not import matplotlib.
"""
