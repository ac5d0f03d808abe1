"""HomogenizedSGD: one Euler-Maruyama step of the SGD SDE per call (THEORY §2, E3)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .._validation import check_float, check_generator, check_int
from ._base import _Batch, _SGDFamily
from ._dist import broadcast_generator
from .functional import NoiseTerm
from .noise import GradientNoise

__all__ = ["HomogenizedSGD"]


class HomogenizedSGD(_SGDFamily):
    r"""Homogenized SGD: the drift in ``.grad`` plus Gaussian noise of SGD's covariance.

    Each :meth:`step` is ``p <- p - lr * (grad + weight_decay * p + noise_scale * xi)``, with
    ``xi`` drawn by the noise model with the covariance that the minibatch gradient of SGD with
    batch size ``batch_size`` has (minus what the drift already carries, THEORY §2). With the
    exact population gradient as drift and :class:`~sde_optim.StructuredNoise` it is one
    Euler-Maruyama step of THEORY E3 with ``dt = 1/d`` — one SGD step, so step counts compare
    one to one with ``torch.optim.SGD``. With ``momentum`` the direction ``grad + weight_decay * p
    + noise_scale * xi`` feeds torch.optim.SGD's momentum buffer exactly as the minibatch gradient
    does in SGD, so it simulates SGD with momentum (THEORY §7, E11); with ``noise_scale=0`` it is
    ``torch.optim.SGD`` bitwise, for every momentum, dampening, nesterov, weight_decay and maximize.

    Args:
        params: iterable of parameters or param-group dicts (as ``torch.optim.SGD``).
        lr: step size (>= 0; a float or a 1-element tensor, as torch.optim.SGD); per group.
        batch_size: the SGD batch size ``B`` whose noise is reproduced (>= 1).
        noise: a :class:`~sde_optim.optim.noise.GradientNoise` (``StructuredNoise`` or
            ``EmpiricalNoise``) covering some or all of the parameters; parameters it does not
            cover get no noise.
        noise_scale: multiplies the noise (>= 0): 0 is gradient descent on the drift (no
            random numbers are drawn), 1 is SGD-equivalent, > 1 amplified; per group.
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (momentum >= 0; nesterov needs
            momentum > 0 and dampening 0); the buffers are ``state[p]["momentum_buffer"]``; per group.
        weight_decay: L2 penalty (>= 0) added to the drift, as in ``torch.optim.SGD``; per group.
        maximize: ascend the drift (its gradient is negated before weight decay and noise), as
            ``torch.optim.SGD``; per group.
        generator: a ``torch.Generator`` on the parameters' device. Default: a new one seeded
            with ``seed``. Its state is saved in :meth:`state_dict`.
        seed: seed of the default generator (an integer >= 0; not with ``generator``). Default:
            drawn from torch's global generator at construction, so ``torch.manual_seed`` /
            ``seed_everything`` right before building the optimizer makes runs reproducible; an
            explicit seed makes the noise stream independent of whatever else used the global
            generator before (two fits in one process, a different number of data loaders, ...).
        foreach: use the multi-tensor path; default (None) as torch.optim.SGD: on devices with
            foreach kernels (CUDA), not on CPU.
        nonfinite: ``"skip"`` or ``"raise"`` (see :class:`_SGDFamily`).

    Distributed data parallel (DDP). Replicas stay identical because every rank draws the
    *same* noise: at the first noisy step after construction or :meth:`load_state_dict`, rank
    zero's generator state is broadcast to all ranks (one collective, once), and from then on
    every rank advances identical generators by identical draws. Same noise, rather than noise
    drawn on one rank and broadcast every step, because it costs no communication per step and
    the drift is already identical on all ranks (DDP all-reduces the gradients), so drift plus
    noise is identical too. The seed is not trusted to agree by itself: it is drawn from each
    process's global generator, which agrees only if every rank seeded it the same way.
    ``batch_size`` is the *global* SGD batch the noise reproduces (per-rank batch times world
    size when emulating DDP-SGD). Noise models that depend on rank-local data average over
    ranks (see :class:`~sde_optim.StructuredNoise` with ``risk="loss"`` and
    :class:`~sde_optim.EmpiricalNoise`).

    Precision: any floating parameter dtype; the noise is drawn in the parameters' dtype
    (bf16/fp16 noise has the dtype's relative resolution, about 1e-2 / 1e-3).

    Example::

        noise = StructuredNoise(problem, model)
        opt = HomogenizedSGD(model.parameters(), lr=0.5, batch_size=1, noise=noise)
        for _ in range(steps):
            opt.zero_grad()
            problem.population_risk(model.beta).backward()   # exact drift
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor,
        *,
        batch_size: int,
        noise: GradientNoise,
        noise_scale: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        if not isinstance(noise, GradientNoise):
            raise ValueError(
                "noise must be a noise model: sde_optim.StructuredNoise(problem, model) or "
                f"sde_optim.EmpiricalNoise(model); got {noise!r}"
            )
        check_float("noise_scale", noise_scale, minimum=0.0)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if seed is not None:
            seed = check_int("seed", seed, minimum=0)
            if generator is not None:
                raise ValueError("pass either generator or seed, not both (seed seeds the default generator)")
        defaults = dict(lr=lr, noise_scale=noise_scale, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.noise = noise
        noise.check_params([p for g in self.param_groups for p in g["params"]])
        device = self.param_groups[0]["params"][0].device
        self._generator = check_generator(generator, device, "the parameters'")
        if generator is None and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = seed
        self._synced = False  # generator state not yet made identical across DDP ranks

    _pickled = _SGDFamily._pickled + ("batch_size", "noise", "_generator", "_seed")
    _group_keys = _SGDFamily._group_keys + ("noise_scale",)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._synced = False  # a copy in another process broadcasts rank zero's stream again

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "noise_scale" in param_group:
            check_float("noise_scale", param_group["noise_scale"], minimum=0.0)
        super().add_param_group(param_group)

    @property
    def generator(self) -> torch.Generator:
        """The optimizer's random stream (created on the parameters' device at first use)."""
        if self._generator is None:
            device = self.param_groups[0]["params"][0].device
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def set_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Hand the drift's batch to an :class:`EmpiricalNoise` model (call before each step)."""
        set_batch = getattr(self.noise, "set_batch", None)
        if set_batch is None:
            raise TypeError(f"{type(self.noise).__name__} takes no batch; set_batch is for EmpiricalNoise")
        set_batch(inputs, targets)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One homogenized SGD step; ``closure`` (optional) re-evaluates the loss and its gradient."""
        loss = self._evaluate(closure)
        batches = self._batches()
        noise_of, rng = self._draw(batches, loss)
        self._update(batches, noise_of, rng=rng)
        return loss

    def _draw(self, batches: list[_Batch], loss: Tensor | None
              ) -> tuple[dict[int, NoiseTerm], tuple[torch.Generator, Tensor] | None]:
        """The step's noise by ``id(param)``, drawn only when a covered parameter is updated with a
        nonzero noise_scale; and the generator's prior state when ``"raise"`` may need it back."""
        noisy = {id(p) for b in batches if b.group["noise_scale"] != 0 for p in b.params}
        covered = self.noise.params
        if noisy.isdisjoint(map(id, covered)):
            return {}, None
        gen = self.generator
        if not self._synced:
            broadcast_generator(gen)  # once: identical noise on every DDP rank
            self._synced = True
        rng = (gen, gen.get_state()) if self.nonfinite == "raise" else None
        terms = self.noise.draw(self.batch_size, gen, loss)
        return dict(zip(map(id, covered), terms)), rng  # a None term: no noise, as an absent one

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["generator_state"] = self.generator.get_state()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        if "generator_state" in extra:
            self.generator.set_state(extra["generator_state"].clone())
        self._synced = False
