"""Pure training: the train state, optimizers, pure steps, the run directory and the fit loop.

Layers, each over the ones before it:

    state.py   TrainState          optim.py  optimizers and schedules
    step.py    pure train/eval steps, ensembles (vmap), compilation
    config.py  FitConfig and the settings that change the maths
    rundir.py  the run directory: files, lock, resume checks, finite checkpoints
    build.py   what a config means as functions (contract, optimizer, loss, steps)
    evaluation.py (prepared splits), full_res.py (original images and masks), log.py, loop.py (fit)

The names below are imported on first use (PEP 562): ``import functional_seg.train.step`` loads
the step and what it needs, not the loop, the data readers or PIL.
"""

from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    "config": ("SWEEPABLE", "FitConfig"),
    "evaluation": ("evaluate", "evaluate_ensemble", "evaluate_checkpoint"),
    "full_res": ("evaluate_full_res",),
    "log": ("ConsoleLog",),
    "loop": ("fit", "plan_run", "FitResult"),
    "build": ("build_steps", "preprocess_for", "Steps"),
    "optim": ("OPTIMIZERS", "SCHEDULES", "Optimizer", "OptimizerConfig", "make_optimizer", "make_schedule"),
    "rundir": ("RunDir", "RunDirError", "TrainingDiverged"),
    "state": ("TrainState", "ensemble_size", "init_ensemble", "init_train_state"),
    "step": ("compile_report", "compile_step", "ensemble_step", "make_eval_step", "make_train_step"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
