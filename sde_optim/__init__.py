"""sde-optim: the SDE limit of SGD on diagonal linear networks, its deterministic
prediction (THEORY.md), and tools to watch real training follow it."""

from .models import DiagonalLinearNetwork
from .observables import OBSERVABLES, CoordinateState, Observable, measure
from .optim import SVAG, EmpiricalNoise, HomogenizedSGD, NonFiniteUpdateError, StructuredNoise, svag_weights
from .teacher import TeacherProblem, TeacherSpec
from .theory import BestLR, CriticalLR, Prediction, best_lr, critical_lr, predict, predict_sweep

__all__ = [
    "DiagonalLinearNetwork",
    "TeacherProblem",
    "TeacherSpec",
    "OBSERVABLES",
    "CoordinateState",
    "Observable",
    "measure",
    "HomogenizedSGD",
    "SVAG",
    "svag_weights",
    "StructuredNoise",
    "EmpiricalNoise",
    "NonFiniteUpdateError",
    "predict",
    "predict_sweep",
    "Prediction",
    "critical_lr",
    "CriticalLR",
    "best_lr",
    "BestLR",
]

__version__ = "0.1.0"
