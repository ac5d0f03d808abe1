"""Lightning callbacks that watch training."""

from .curvature_monitor import CurvatureMonitor

__all__ = ["CurvatureMonitor"]
