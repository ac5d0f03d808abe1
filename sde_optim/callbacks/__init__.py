"""Lightning callbacks: measured observables against the prediction, and Hessian curvature."""

from .curvature_monitor import CurvatureMonitor
from .theory_monitor import TheoryMonitor

__all__ = ["CurvatureMonitor", "TheoryMonitor"]
