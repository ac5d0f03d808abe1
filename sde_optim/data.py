"""Deprecated location of :class:`TeacherDataModule`: use :mod:`sde_optim.lightning` (kept for one release)."""

import warnings

from .lightning.data import StreamRequest, TeacherDataModule, stream_seed

warnings.warn("sde_optim.data is deprecated; import TeacherDataModule from sde_optim.lightning",
              DeprecationWarning, stacklevel=2)

__all__ = ["TeacherDataModule", "StreamRequest", "stream_seed"]
