"""Training FeRA adapters. The step (MSE + FECL in the model's own prediction space) is written once, in
step.py, for every trainer: ComfyUI's Train FeRA node and `python -m fera_core train` (cli.py: a
diffusers pipeline, on accelerate) both call it."""
from .step import (EPSILON, FLOW, PREDICTIONS, SAMPLE, V_PREDICTION, Objective, StepLoss, fera_loss, noise_draws,
                   prediction_from_x0, regression_target, sample_noise_levels, training_step)

__all__ = ["EPSILON", "FLOW", "PREDICTIONS", "SAMPLE", "V_PREDICTION", "Objective", "StepLoss", "fera_loss",
           "noise_draws", "prediction_from_x0", "regression_target", "sample_noise_levels", "training_step"]
