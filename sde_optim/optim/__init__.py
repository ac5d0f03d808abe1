"""SDE-approximating optimizers (THEORY §2): HomogenizedSGD with its noise models, and SVAG."""

from .functional import NonFiniteUpdateError
from .homogenized import HomogenizedSGD
from .noise import EmpiricalNoise, GradientNoise, StructuredNoise
from .svag import SVAG, svag_weights

__all__ = [
    "HomogenizedSGD",
    "SVAG",
    "svag_weights",
    "GradientNoise",
    "StructuredNoise",
    "EmpiricalNoise",
    "NonFiniteUpdateError",
]
