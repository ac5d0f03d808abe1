"""The main example from a configuration file, through LightningCLI.

``lightning_examples/sparse_regression.yaml`` describes the job of ``sparse_regression.py``: a
DLN on the streaming sparse teacher (a :class:`~sde_optim.TeacherSpec`, plain fields), trained
with ``"sgd"``, ``"homogenized"`` or ``"svag"``, with :class:`~sde_optim.lightning.TheoryMonitor`
and :class:`~sde_optim.lightning.CurvatureMonitor`. The teacher is given once, under
``model.problem``; the data module and the TheoryMonitor get the same built teacher, and the
data module's batch follows ``model.sgd_batch_size`` and ``model.optimizer``. Needs the ``cli``
extra (``pip install -e ".[cli]"``: jsonargparse).

    python lightning_examples/cli_main.py fit --config lightning_examples/sparse_regression.yaml
    python lightning_examples/cli_main.py fit --config lightning_examples/sparse_regression.yaml \\
        --model.optimizer homogenized --model.problem.dim 4096 --trainer.max_steps 24576
    python lightning_examples/cli_main.py fit --help
"""

from __future__ import annotations

import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from sde_optim.lightning import CurvatureMonitor, TeacherDataModule, TeacherRegression, TheoryMonitor


class TeacherCLI(LightningCLI):
    """LightningCLI with the two monitors as configurable sections and the teacher given once."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TheoryMonitor, "theory_monitor")
        parser.add_lightning_class_args(CurvatureMonitor, "curvature_monitor")
        parser.link_arguments("model.problem", "data.problem", apply_on="instantiate")
        parser.link_arguments("model.problem", "theory_monitor.problem", apply_on="instantiate")
        parser.link_arguments(("model.sgd_batch_size", "model.optimizer"), "data.batch_size",
                              compute_fn=TeacherRegression.samples_per_step)


def main(args: list[str] | None = None, **kwargs) -> TeacherCLI:
    """Run the CLI (``args``: the command line without the program name; ``None`` reads ``sys.argv``)."""
    return TeacherCLI(TeacherRegression, TeacherDataModule, args=args, **kwargs)


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # Lightning does this for NCCL only; gloo can abort at exit
