"""Gradient-noise models for :class:`~sde_optim.HomogenizedSGD` (THEORY §2).

A noise model draws ``xi`` with the covariance that the minibatch gradient of SGD with
batch size ``B`` has around its mean, *minus* what the drift already carries: when the
drift is the gradient of a minibatch of ``M`` samples, only ``Sigma (1/B - 1/M)`` is added,
so that drift plus noise has SGD's covariance ``Sigma / B`` (THEORY §2, ``c^2 = 1/B - 1/M``).

* :class:`StructuredNoise`: the exact homogenized noise of a
  :class:`~sde_optim.DiagonalLinearNetwork` on a :class:`~sde_optim.TeacherProblem` (E3):
  the beta-gradient noise is ``N(0, 2 R diag(h) / B)`` (``h`` the feature variances, the
  rank-one part dropped), shared by both parameters of a coordinate through the chain rule.
* :class:`EmpiricalNoise`: any model; the per-sample gradient covariance of a batch of
  ``M`` samples, drawn without ever forming per-sample gradients or a covariance matrix.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_int
from ._dist import all_reduce_mean_, world_size
from . import functional
from .functional import NoiseTerm
from .increments import INCREMENTS, draw_increments_
from ..models import DiagonalLinearNetwork
from ..teacher import TeacherProblem

__all__ = ["GradientNoise", "StructuredNoise", "EmpiricalNoise", "missing_variance"]


def missing_variance(batch_size: int, drift_batch_size: int | None) -> float:
    """``c^2 = 1/B - 1/M`` (THEORY §2); ``M = None`` means an exact (population) drift, ``c^2 = 1/B``."""
    if drift_batch_size is None:
        return 1.0 / batch_size
    if drift_batch_size < batch_size:
        raise ValueError(
            f"the drift's batch size M must be >= batch_size B (M >= {batch_size}); got M={drift_batch_size}: "
            "a smaller drift batch already has more noise than SGD with batch B"
        )
    return 1.0 / batch_size - 1.0 / drift_batch_size


class GradientNoise:
    """Base class: noise for the parameters listed in ``params``.

    Subclasses implement :meth:`sample` (one noise tensor, or ``None`` for no noise, per entry of
    ``params``). The optimizer calls :meth:`draw`, which by default wraps :meth:`sample`; the
    built-in models override it to return the noise unevaluated (:class:`NoiseTerm`) in
    reused buffers, so that the optimizer forms drift plus noise in one pass.
    """

    params: Sequence[Tensor]

    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor | None]:
        """Noise for each of ``self.params`` with covariance ``c^2 Sigma`` (``c^2`` as above);
        ``None`` where it is exactly zero (nothing to add, nothing allocated). New tensors."""
        raise NotImplementedError

    def draw(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[NoiseTerm | None]:
        """What :meth:`sample` draws (the same random numbers), for the optimizer: the terms may
        live in buffers that the next draw overwrites."""
        return [None if n is None else NoiseTerm(n) for n in self.sample(batch_size, generator, loss)]

    def check_params(self, optimizer_params: Sequence[Tensor]) -> None:
        """Every covered parameter must be optimized (or the noise would go nowhere)."""
        ids = {id(p) for p in optimizer_params}
        if not all(id(p) in ids for p in self.params):
            raise ValueError(f"{type(self).__name__}: all of the model's parameters must be in the optimizer's params")


class _Constants(NamedTuple):
    """What a structured step needs besides the parameters, on their device and dtype: ``beta*``;
    ``sqrt(h)`` (a number for an isotropic spectrum); ``f`` and ``h_left`` with ``2 R = f^2 (h_left
    sum r^2 + offset)`` for an isotropic spectrum (``f = sqrt(h)``, ``h_left = 1`` in float32/64;
    ``f = 1``, ``h_left = h`` in a half dtype, where ``sigma^2 / h`` could overflow); the 0-d offset
    (``sigma^2``, or ``sigma^2 / h`` when folded; ``None`` for 0); a 0-d buffer for the risk; and
    whether they are on a CPU (where the risk is read on the host, see ``functional.CPU_READS_ON_HOST``)."""

    beta_star: Tensor
    sqrt_h: Tensor | float
    f: float
    h_left: float
    offset: Tensor | None
    risk: Tensor
    on_cpu: bool


class StructuredNoise(GradientNoise):
    """Homogenized SGD noise of a diagonal linear network on a Gaussian teacher (THEORY E3).

    For SGD with batch ``B`` the minibatch gradient with respect to ``beta`` has covariance
    ``2 R diag(h) / B`` (``h = lambda / d`` the feature variances; the rank-one part
    ``2 K r r^T K / d^2`` is O(1/d) per coordinate and dropped, THEORY §2). The noise on each
    parameter is that beta-noise times ``d beta_i / d theta_i``, with one standard normal
    ``z_i`` per coordinate shared by its two parameters::

        u: v_i sqrt(c^2 2 R h_i) z_i     v: u_i sqrt(c^2 2 R h_i) z_i        ("uv")
        w+-: +-depth w+-^(depth-1) sqrt(c^2 2 R h_i) z_i                      ("pm")

    With an exact population-gradient drift (``problem.population_risk(model.beta).backward()``)
    one optimizer step is one Euler-Maruyama step of E3 with ``dt = 1/d``: one SGD step.

    Args:
        problem: the teacher; only ``feature_variance`` and ``noise_std`` are used.
        model: the :class:`~sde_optim.DiagonalLinearNetwork` being trained.
        drift_batch_size: ``M``, the number of samples behind the drift gradient, or ``None``
            for the exact population gradient (default).
        risk: where the current risk ``R`` comes from: ``"exact"`` (E1 from the model's beta,
            default) or ``"loss"`` (the loss returned by the optimizer's closure, an unbiased
            minibatch estimate of R; under DDP averaged over ranks, one all-reduce per step, so
            that every replica draws the same noise from the global-batch estimate).
        increments: the law of ``z``: ``"gaussian"`` (default, E3's Brownian increment) or
            ``"rademacher"`` (``z_i = +-1``: the simplified weak Euler scheme, the same risk and
            curvature laws at weak order 1, ~14x cheaper to draw on a CPU; see
            :mod:`sde_optim.optim.increments`).
    """

    def __init__(
        self,
        problem: TeacherProblem,
        model: DiagonalLinearNetwork,
        *,
        drift_batch_size: int | None = None,
        risk: str = "exact",
        increments: str = "gaussian",
    ) -> None:
        if not isinstance(problem, TeacherProblem):
            raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
        if not isinstance(model, DiagonalLinearNetwork):
            raise TypeError(
                f"StructuredNoise needs a DiagonalLinearNetwork model, got {type(model).__name__}; "
                "use EmpiricalNoise for other models"
            )
        if model.dim != problem.dim:
            raise ValueError(f"model.dim ({model.dim}) must equal problem.dim ({problem.dim})")
        self.problem = problem
        self.model = model
        self.drift_batch_size = None if drift_batch_size is None else check_int("drift_batch_size", drift_batch_size, minimum=1)
        self.risk = check_choice("risk", risk, ("exact", "loss"))
        self.increments = check_choice("increments", increments, INCREMENTS)
        self.params = list(model._pair())
        self._consts: _Constants | None = None  # on the params' device and dtype
        self._buffer: Tensor | None = None  # the beta-noise, reused every step; never saved
        self._draw_scratch: dict[str, Any] = {}  # the increments' buffers and views; never saved

    def __getstate__(self) -> dict:
        """Pickles (and deep copies) leave out the cached constants and buffers; they are rebuilt."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_consts", "_buffer", "_draw_scratch")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("increments", "gaussian")  # pickled before the option existed
        self._consts = None
        self._buffer = None
        self._draw_scratch = {}

    def _constants(self, like: Tensor) -> _Constants:
        """The step's constants on ``like``'s device and dtype, made once (not per step; the
        problem's own tensors when they are already there, so the step shares them with the drift).

        For an isotropic spectrum ``sqrt(h)`` is one number (a Python float): then it scales the
        risk and the noise as a scalar and saves two passes over ``d`` entries per step.
        """
        c = self._consts
        if c is None or c.beta_star.device != like.device or c.beta_star.dtype != like.dtype:
            p = self.problem.to(like.device, like.dtype)
            fv = self.problem.feature_variance
            isotropic = bool((fv == fv[0]).all())
            sqrt_h = math.sqrt(float(fv[0])) if isotropic else p.feature_variance.sqrt()
            # isotropic: 2R = h (sum r^2 + sigma^2 / h), h in the coefficient; in a half dtype sigma^2 / h can
            # overflow (65504 in float16: sigma = 1 at d = 7e4), so there 2R = h sum r^2 + sigma^2 as it stands
            fold = isotropic and like.dtype in (torch.float32, torch.float64)
            h_left = float(fv[0]) if isotropic and not fold else 1.0  # multiplies the sum when not folded
            s2 = self.problem.noise_std ** 2 / (float(fv[0]) if fold else 1.0)
            offset = torch.full((), s2, dtype=like.dtype, device=like.device) if s2 else None
            self._consts = c = _Constants(p.beta_star, sqrt_h, sqrt_h if fold else 1.0, h_left, offset,
                                          torch.empty((), dtype=like.dtype, device=like.device), like.device.type == "cpu")
        return c

    def _twice_risk(self, loss: Tensor | None, scratch: Tensor, k: _Constants) -> tuple[Tensor, float]:
        """``(s, f)`` with ``2 R = f^2 s``: ``s`` a 0-d tensor (reused across steps), ``f`` a number.

        ``2 R`` is E1, ``sum_i h_i r_i^2 + sigma^2``, or twice the closure's loss. With an isotropic
        spectrum ``2 R = h (sum_i r_i^2 + sigma^2 / h)``, so ``f = sqrt(h)`` and ``h`` costs no
        operation (float32/64; see :class:`_Constants` for half dtypes). ``scratch`` (shape ``(d,)``) is overwritten; ``k``: :meth:`_constants`."""
        if self.risk == "loss":
            if loss is None:
                raise ValueError("StructuredNoise(risk='loss') needs the loss: pass a closure to step() that returns it")
            risk = loss.detach().to(scratch.dtype).clone()
            all_reduce_mean_([risk])
            return risk.mul_(2.0), 1.0
        a, b = self.params
        if self.model.parametrization == "uv":  # scratch = -r = beta* - beta (the sign squares away)
            torch.addcmul(k.beta_star, a, b, value=-1.0, out=scratch)
        elif self.model.depth == 2:
            torch.addcmul(k.beta_star, a, a, value=-1.0, out=scratch).addcmul_(b, b)
        else:
            torch.sub(b.pow(self.model.depth), a.pow(self.model.depth), out=scratch).add_(k.beta_star)
        if isinstance(k.sqrt_h, Tensor):
            torch.dot(scratch.mul_(k.sqrt_h), scratch, out=k.risk)
        else:
            torch.dot(scratch, scratch, out=k.risk)
            if k.h_left != 1.0:
                k.risk.mul_(k.h_left)
        if k.offset is not None:
            k.risk.add_(k.offset)
        return k.risk, k.f

    def draw(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[NoiseTerm]:
        """The noise of :meth:`sample` as chain-rule products with one shared beta-noise buffer.

        ``t = sqrt(2 R) sqrt(h) z`` (shape ``(d,)``, reused across steps) and, with ``c^2`` the missing
        variance, u-noise ``= c v t``, v-noise ``= c u t`` (``"uv"``); ``+-c k w+-^(k-1) t`` (``"pm"``).
        Passes over ``d`` entries: 3 for the risk, 1 for the draw (on an accelerator 2: scaled by
        ``sqrt(2 R)`` on the device; on a CPU that number goes into the coefficient), 1 for ``sqrt(h)``
        (isotropic spectrum: 2 for the risk, none for ``sqrt(h)``, a number in the coefficient); no
        temporaries for ``"uv"`` and depth-2 ``"pm"``.
        """
        if torch.is_grad_enabled():  # the optimizer calls it under no_grad already
            with torch.no_grad():
                return self._terms(batch_size, generator, loss, self._scratch())
        return self._terms(batch_size, generator, loss, self._scratch())

    @torch.no_grad()
    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor]:
        return [t.materialize() for t in self._terms(batch_size, generator, loss, torch.empty_like(self.params[0]))]

    def _scratch(self) -> Tensor:
        a = self.params[0]
        buf = self._buffer
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype or buf.device != a.device:
            self._buffer = buf = torch.empty_like(a, memory_format=torch.contiguous_format)
        return buf

    def _terms(self, batch_size: int, generator: torch.Generator, loss: Tensor | None, t: Tensor) -> list[NoiseTerm]:
        a, b = self.params
        k = self._constants(a)
        twice, f = self._twice_risk(loss, t, k)  # 2 R = f^2 twice
        c = f * math.sqrt(missing_variance(batch_size, self.drift_batch_size))
        if k.on_cpu and functional.CPU_READS_ON_HOST:  # sqrt(2 R) into the coefficient as a number, no pass
            r2 = float(twice)
            c *= math.sqrt(r2) if r2 >= 0 else math.nan  # a negative loss gives NaN noise, as torch.sqrt
            draw_increments_(t, generator, self.increments, self._draw_scratch)
        else:  # on an accelerator a read would synchronize: scale t on the device
            draw_increments_(t, generator, self.increments, self._draw_scratch, scale=twice.sqrt_())
        sqrt_h = k.sqrt_h
        if isinstance(sqrt_h, Tensor):
            t.mul_(sqrt_h)
        else:
            c *= sqrt_h  # a scalar: into the coefficient, no pass
        if self.model.parametrization == "uv":
            return [NoiseTerm(b, t, c), NoiseTerm(a, t, c)]
        k = self.model.depth
        fa, fb = (a, b) if k == 2 else (a.pow(k - 1), b.pow(k - 1))
        return [NoiseTerm(fa, t, k * c), NoiseTerm(fb, t, -k * c)]


def _half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (output - target).pow(2).reshape(output.shape[0], -1).sum(1)


class EmpiricalNoise(GradientNoise):
    """Noise with the empirical per-sample gradient covariance of any model (THEORY §2).

    With per-sample losses ``l_1..l_M`` on the batch given to :meth:`set_batch`, per-sample
    gradients ``g_m`` and mean ``g_bar``, the noise is ``c / sqrt(M - 1) sum_m z_m (g_m - g_bar)``,
    ``z_m`` independent standardized increments (``N(0, 1)``, or ``+-1`` with ``increments=
    "rademacher"``: either way ``E (z - z_bar)(z - z_bar)^T = I - 1 1^T / M``), whose covariance
    is ``c^2`` times the sample covariance of the ``g_m``.
    Because ``sum_m z_m (g_m - g_bar) = grad sum_m (z_m - z_bar) l_m``, it is computed with
    **one** extra backward pass of a reweighted loss: no per-sample gradient, no covariance
    matrix, memory as for an ordinary backward.

    Args:
        model: any ``nn.Module``; BatchNorm layers in training mode couple the samples of a
            batch, so the per-sample losses are not those of single samples: refused with a
            ``ValueError`` (put them in eval mode or use another normalization). Dropout is
            allowed: the noise pass draws its own masks, so dropout's randomness is part of
            the per-sample covariance it sees.
        per_sample_loss: ``(output, target) -> (M,)`` per-sample losses; default
            ``0.5 * ||output - target||^2`` per sample.
        increments: the law of ``z``: ``"gaussian"`` (default) or ``"rademacher"`` (see
            :mod:`sde_optim.optim.increments`).

    Before each optimizer step call ``set_batch(inputs, targets)`` with the ``M >= B``
    samples whose mean gradient is the drift (usually the training batch).

    Under DDP with ``W`` ranks each rank holds ``M`` different samples and the drift is the
    mean over ``W M`` of them (DDP's all-reduce). Every rank draws its noise from its own
    samples with ``c^2 = W (1/B - 1/(W M))`` (``B`` the global batch) and the noises are
    averaged over ranks (one all-reduce per parameter): the ranks' samples are independent,
    so the average has covariance ``(1/B - 1/(W M)) Sigma``, and it is the same on every rank.
    """

    def __init__(self, model: nn.Module, per_sample_loss: Callable[[Tensor, Tensor], Tensor] | None = None, *,
                 increments: str = "gaussian") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.per_sample_loss = per_sample_loss or _half_squared_error
        self.increments = check_choice("increments", increments, INCREMENTS)
        self._batch: tuple[Tensor, Tensor] | None = None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("increments", "gaussian")  # pickled before the option existed

    @property
    def params(self) -> list[Tensor]:  # type: ignore[override]
        """The model's parameters that require grad *now*: a layer frozen after the optimizer was
        built gets no noise (and is not differentiated), as it gets no gradient."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """The ``M`` samples behind the next step's drift (leading dimension ``M >= 2``)."""
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must have the same number of samples; got {inputs.shape[0]} and {targets.shape[0]}")
        if inputs.shape[0] < 2:
            raise ValueError(f"EmpiricalNoise needs M >= 2 samples to estimate a covariance; got M={inputs.shape[0]}")
        self._batch = (inputs, targets)

    def _check_model(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    "EmpiricalNoise: BatchNorm in training mode couples the samples of a batch, so per-sample "
                    "gradients are undefined; put BatchNorm layers in eval mode or use LayerNorm/GroupNorm"
                )

    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor]:
        if self._batch is None:
            raise ValueError("EmpiricalNoise: call optimizer.set_batch(inputs, targets) before each step")
        self._check_model()
        inputs, targets = self._batch
        self._batch = None
        params = self.params
        m = inputs.shape[0]
        ranks = world_size()
        c2 = ranks * missing_variance(batch_size, ranks * m)
        if c2 == 0.0 or not params:  # M = B: the drift already has SGD's noise; or nothing is trained
            return [None] * len(params)
        ref = params[0]
        z = draw_increments_(torch.empty(m, dtype=ref.dtype, device=ref.device), generator, self.increments)
        weights = (z - z.mean()) * math.sqrt(c2 / (m - 1))
        with torch.enable_grad():
            losses = self.per_sample_loss(self.model(inputs), targets)
            if losses.shape != (m,):
                raise ValueError(f"per_sample_loss must return shape ({m},), got {tuple(losses.shape)}")
            grads = torch.autograd.grad((weights.to(losses.dtype) * losses).sum(), params, allow_unused=True)
        noise = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        all_reduce_mean_(noise)
        return noise
