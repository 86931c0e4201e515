"""Pure training: the train state, optimizers, pure steps, the run directory and the fit loop.

Layers, each over the ones before it:

    state.py   TrainState          optim.py  optimizers and schedules
    step.py    pure train/eval steps, ensembles (vmap), compilation
    config.py  FitConfig and the settings that change the maths
    rundir.py  the run directory: files, lock, resume checks, finite checkpoints
    evaluate.py, log.py, loop.py (fit)
"""

from .config import SWEEPABLE, FitConfig
from .evaluate import evaluate, evaluate_ensemble
from .log import ConsoleLog
from .loop import fit, plan_run
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, OptimizerConfig, make_optimizer, make_schedule
from .rundir import RunDir, RunDirError, TrainingDiverged
from .state import TrainState, ensemble_size, init_ensemble, init_train_state
from .step import compile_report, compile_step, ensemble_step, make_eval_step, make_train_step

__all__ = [
    "fit", "plan_run", "FitConfig", "SWEEPABLE", "evaluate", "evaluate_ensemble", "ConsoleLog",
    "RunDir", "RunDirError", "TrainingDiverged",
    "OPTIMIZERS", "SCHEDULES", "Optimizer", "OptimizerConfig", "make_optimizer", "make_schedule",
    "TrainState", "init_train_state", "init_ensemble", "ensemble_size",
    "make_train_step", "make_eval_step", "ensemble_step", "compile_step", "compile_report",
]
