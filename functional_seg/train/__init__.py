"""Pure training: the train state, optimizers, compiled steps, the fit loop and ensembles."""

from .loop import SWEEPABLE, TrainingDiverged, evaluate, evaluate_ensemble, fit, make_loss
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, OptimizerConfig, make_optimizer, make_schedule
from .state import TrainState, ensemble_size, init_ensemble, init_train_state
from .step import compile_report, compile_step, ensemble_step, make_eval_step, make_train_step

__all__ = [
    "fit",
    "evaluate",
    "evaluate_ensemble",
    "make_loss",
    "TrainingDiverged",
    "SWEEPABLE",
    "OPTIMIZERS",
    "SCHEDULES",
    "Optimizer",
    "OptimizerConfig",
    "make_optimizer",
    "make_schedule",
    "TrainState",
    "init_train_state",
    "init_ensemble",
    "ensemble_size",
    "make_train_step",
    "make_eval_step",
    "ensemble_step",
    "compile_step",
    "compile_report",
]
