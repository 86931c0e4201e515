"""The experiments: each module is a set of ``FitConfig`` s run through ``functional_seg.train.fit``.

Run them from the repository root as modules, e.g. ``python -m experiments.series_models --quick``
(see ``experiments/README.md``).
"""
