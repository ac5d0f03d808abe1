"""Deprecated location of :class:`TeacherRegression`: use :mod:`sde_optim.lightning` (kept for one release)."""

import warnings

from .lightning.module import OPTIMIZERS, TeacherRegression

warnings.warn("sde_optim.regression is deprecated; import TeacherRegression from sde_optim.lightning",
              DeprecationWarning, stacklevel=2)

__all__ = ["TeacherRegression", "OPTIMIZERS"]
