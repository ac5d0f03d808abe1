"""Theory engine: the mean-field (high-dimensional) limit of SGD on depth-2 diagonal
linear networks (THEORY.md §3-§7).

Entry points: :func:`predict` (E7 curves, E8 local rate, divergence step) and
:func:`critical_lr` (:mod:`.stability`), :func:`predict_sweep` (many learning rates in one solve) and
:func:`best_lr` (:mod:`.tuning`), for the SGD described by :class:`SGDConfig`
(schedules, momentum, weight decay; :func:`describe_sgd` reads it off a live optimizer);
the methods behind them are the :data:`SOLVERS` (:mod:`.solvers`): the Fokker-Planck PDE
(:func:`solve_fokker_planck`, E6), particles (:func:`simulate_particles`, E4-E5), the ODE limits
(:func:`gradient_flow`, :func:`linear_least_squares`, E9); :func:`coordinate_types` and
:mod:`.quadrature` turn the coordinates into types.  The SGD these are checked against is
:func:`sde_optim.simulation.simulate_sgd`.
"""

import warnings

from .coords import phi_to_uv, uv_to_phi
from .describe import describe_sgd, named_sgd
from .dynamics import Coefficients, MeanFieldDynamics, SGDConfig, effective_step
from .fokker_planck import FokkerPlanckSolution, WorkLimitError, solve_fokker_planck
from .odes import gradient_flow, gradient_flow_closed_form, isotropic_linear_risk, linear_least_squares
from .particles import ParticleSolution, simulate_particles
from .predict import METHODS, FiniteDimensionWarning, Prediction, predict, predict_sweep
from .quadrature import coordinate_types
from .solvers import SOLVERS
from .stability import CriticalLR, critical_lr
from .tuning import BestLR, best_lr
from .types import CoordinateTypes

__all__ = [
    "predict", "predict_sweep", "Prediction", "critical_lr", "CriticalLR", "best_lr", "BestLR", "METHODS", "SOLVERS",
    "SGDConfig", "Coefficients", "describe_sgd", "named_sgd", "effective_step", "WorkLimitError", "FiniteDimensionWarning",
    "solve_fokker_planck", "FokkerPlanckSolution", "MeanFieldDynamics",
    "simulate_particles", "ParticleSolution",
    "gradient_flow", "gradient_flow_closed_form", "linear_least_squares", "isotropic_linear_risk",
    "coordinate_types", "CoordinateTypes",
    "uv_to_phi", "phi_to_uv",
]

_MOVED = {"simulate_sgd", "sgd_step", "SGDRun"}


def __getattr__(name: str):
    """``simulate_sgd``, ``sgd_step`` and ``SGDRun`` moved to :mod:`sde_optim.simulation` (kept here one release)."""
    if name in _MOVED:
        warnings.warn(f"sde_optim.theory.{name} moved to sde_optim.simulation.{name}", DeprecationWarning, stacklevel=2)
        from .. import simulation

        return getattr(simulation, name)
    raise AttributeError(f"module 'sde_optim.theory' has no attribute {name!r}")
