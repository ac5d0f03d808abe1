"""Lightning integration: a DLN LightningModule on the streaming teacher, its data module, and the
callbacks that watch training against the theory.

* :class:`TeacherRegression` -- trains a :class:`~sde_optim.DiagonalLinearNetwork` with ``"sgd"``,
  ``"homogenized"`` or ``"svag"``;
* :class:`TeacherDataModule` -- fresh teacher samples every step, generated on the training device;
* :class:`TheoryMonitor` -- measured risk, curvature, ... against the PDE prediction;
* :class:`CurvatureMonitor` -- Hutchinson trace and top Hessian eigenvalue of the loss.
"""

from .curvature_monitor import CurvatureMonitor
from .data import StreamRequest, TeacherDataModule, stream_seed
from .module import OPTIMIZERS, TeacherRegression
from .theory_monitor import DEPARTURES, TheoryMonitor

__all__ = ["TeacherRegression", "OPTIMIZERS", "TeacherDataModule", "StreamRequest", "stream_seed", "TheoryMonitor",
           "CurvatureMonitor", "DEPARTURES"]
