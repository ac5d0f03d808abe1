"""Problems the tests share."""

from __future__ import annotations

import torch

from sde_optim import DiagonalLinearNetwork, TeacherProblem


def section6(d: int = 1000, noise_std: float = 0.0, alpha: float = 0.1, init: str = "unbalanced"):
    """THEORY §6 in float64: isotropic, 10 % support +-1 (seed 0), u0 = sqrt(2) alpha, v0 = 0 (unbalanced)."""
    problem = TeacherProblem.sparse(d, 0.1, noise_std=noise_std, seed=0)
    model = DiagonalLinearNetwork(d, alpha=alpha, init=init, dtype=torch.float64)
    return problem, model
