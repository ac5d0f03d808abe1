"""Theory engine: the mean-field (high-dimensional) limit of SGD on depth-2 diagonal
linear networks (THEORY.md §3-§5).

Entry points: :func:`predict` (E7 curves, E8 local rate, divergence step) and
:func:`critical_lr`; the solvers behind them: :func:`solve_fokker_planck` (E6),
:func:`simulate_particles` (E4-E5), :func:`gradient_flow` and :func:`linear_least_squares` (E9);
:func:`coordinate_types` (type quadrature) and :func:`simulate_sgd` (the plain-SGD reference).
"""

from .coords import phi_to_uv, uv_to_phi
from .fokker_planck import FokkerPlanckSolution, MeanFieldDynamics, solve_fokker_planck
from .odes import gradient_flow, gradient_flow_closed_form, isotropic_linear_risk, linear_least_squares
from .particles import ParticleSolution, simulate_particles
from .predict import METHODS, CriticalLR, Prediction, critical_lr, predict
from .sgd_reference import SGDRun, sgd_step, simulate_sgd
from .quadrature import coordinate_types
from .types import CoordinateTypes, effective_step

__all__ = [
    "predict", "Prediction", "critical_lr", "CriticalLR", "METHODS",
    "solve_fokker_planck", "FokkerPlanckSolution", "MeanFieldDynamics",
    "simulate_particles", "ParticleSolution",
    "gradient_flow", "gradient_flow_closed_form", "linear_least_squares", "isotropic_linear_risk",
    "coordinate_types", "CoordinateTypes", "effective_step",
    "simulate_sgd", "sgd_step", "SGDRun",
    "uv_to_phi", "phi_to_uv",
]
