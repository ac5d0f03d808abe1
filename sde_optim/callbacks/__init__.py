"""Deprecated location of the Lightning callbacks: use :mod:`sde_optim.lightning` (kept for one release)."""

import warnings

from ..lightning import CurvatureMonitor, TheoryMonitor

warnings.warn("sde_optim.callbacks is deprecated; import CurvatureMonitor and TheoryMonitor from sde_optim.lightning",
              DeprecationWarning, stacklevel=2)

__all__ = ["CurvatureMonitor", "TheoryMonitor"]
