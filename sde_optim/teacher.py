"""The streaming Gaussian teacher-student problem (THEORY §1).

Features ``x ~ N(0, diag(feature_variance))``, labels ``y = <x, beta_star> + noise_std * xi``.
In THEORY's conventions ``feature_variance = lambda / d`` (``spectrum`` returns ``lambda``),
so that ``E||x||^2 = mean(lambda)``; any other scale is the same problem with
``lambda_i = d * feature_variance_i`` and the learning rate unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ._validation import check_choice, check_finite_tensor, check_float, check_int

__all__ = ["TeacherProblem", "TeacherSpec"]

Spectrum = Literal["isotropic", "two-level", "power-law"]
TeacherValues = Literal["sign", "gaussian"]
_SPECTRA = get_args(Spectrum)
_TEACHER_VALUES = get_args(TeacherValues)


def _check_sparse(dim, density, spectrum, values, exponent, ratio, seed) -> tuple[int, float, float, float, int]:
    """Checked ``(dim, density, exponent, ratio, seed)`` of :meth:`TeacherProblem.sparse` (choices checked too)."""
    dim = check_int("dim", dim, minimum=1)
    density = check_float("density", density, minimum=0.0, maximum=1.0)
    check_choice("spectrum", spectrum, _SPECTRA)
    check_choice("values", values, _TEACHER_VALUES)
    exponent = check_float("exponent", exponent, minimum=0.0)
    ratio = check_float("ratio", ratio, minimum=0.0, strict=True)
    return dim, density, exponent, ratio, check_int("seed", seed)


class TeacherProblem:
    """A linear teacher with Gaussian features and label noise (THEORY §1).

    Args:
        feature_variance: per-feature variances ``h``, shape ``(d,)``, entries > 0 and finite.
        beta_star: teacher coefficients, shape ``(d,)``, finite.
        noise_std: label noise standard deviation ``sigma`` (>= 0).
    """

    def __init__(self, feature_variance: Tensor, beta_star: Tensor, noise_std: float = 0.0) -> None:
        fv = check_finite_tensor("feature_variance", feature_variance, positive=True)
        bs = check_finite_tensor("beta_star", beta_star)
        if fv.ndim != 1 or fv.shape[0] < 1:
            raise ValueError(f"feature_variance must be a 1-d tensor of shape (d,) with d >= 1, got shape {tuple(fv.shape)}")
        if bs.shape != fv.shape:
            raise ValueError(f"beta_star must have the shape of feature_variance {tuple(fv.shape)}, got {tuple(bs.shape)}")
        self.feature_variance = fv
        self.beta_star = bs.to(dtype=fv.dtype, device=fv.device)
        self.noise_std = check_float("noise_std", noise_std, minimum=0.0)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def sparse(
        cls,
        dim: int,
        density: float,
        *,
        spectrum: Spectrum = "isotropic",
        values: TeacherValues = "sign",
        noise_std: float = 0.0,
        exponent: float = 1.0,
        ratio: float = 10.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> "TeacherProblem":
        """The standard sparse-teacher settings, with ``feature_variance = lambda / dim``.

        Args:
            dim: dimension ``d`` (>= 1).
            density: fraction of nonzero teacher coordinates, in [0, 1]; exactly
                ``round(density * dim)`` coordinates, at random positions, are nonzero (none when
                ``density * dim <= 0.5``: the zero teacher; :class:`TeacherSpec` refuses that
                unless ``density = 0``).
            spectrum: ``"isotropic"`` (``lambda_i = 1``); ``"two-level"`` (the first half of the
                coordinates ``ratio`` times the second half); ``"power-law"``
                (``lambda_i ∝ i^-exponent``). Spectra are normalized to ``mean(lambda) = 1``.
            values: nonzero teacher entries ``"sign"`` (+-1, random signs) or ``"gaussian"`` (N(0, 1)).
            noise_std: label noise ``sigma`` (>= 0).
            exponent: power-law exponent (>= 0), used by ``"power-law"``.
            ratio: level ratio (> 0), used by ``"two-level"``.
            seed: seed of the teacher's support and values.
        """
        dim, density, exponent, ratio, seed = _check_sparse(dim, density, spectrum, values, exponent, ratio, seed)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.arange(1, dim + 1, dtype=torch.float64)
        if spectrum == "isotropic":
            lam = torch.ones(dim, dtype=torch.float64)
        elif spectrum == "two-level":
            lam = torch.where(idx <= (dim + 1) // 2, ratio, 1.0).to(torch.float64)
        else:
            lam = idx.pow(-exponent)
        lam = lam / lam.mean()
        k = int(round(density * dim))
        support = torch.randperm(dim, generator=gen)[:k]
        if values == "sign":
            vals = torch.randint(0, 2, (k,), generator=gen).to(torch.float64) * 2 - 1
        else:
            vals = torch.randn(k, generator=gen, dtype=torch.float64)
        beta_star = torch.zeros(dim, dtype=torch.float64)
        beta_star[support] = vals
        return cls((lam / dim).to(dtype=dtype, device=device), beta_star.to(dtype=dtype, device=device), noise_std)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Dimension ``d``."""
        return self.feature_variance.shape[0]

    @property
    def spectrum(self) -> Tensor:
        """``lambda = d * feature_variance`` (THEORY §1), shape ``(d,)``."""
        return self.dim * self.feature_variance

    @property
    def device(self) -> torch.device:
        return self.feature_variance.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_variance.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TeacherProblem":
        """A copy on ``device`` with floating ``dtype`` (both optional)."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        fv = self.feature_variance.to(device=device, dtype=dtype)
        return TeacherProblem(fv, self.beta_star.to(device=device, dtype=dtype), self.noise_std)

    # ------------------------------------------------------------------ data
    def sample(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Fresh samples ``(x, y)`` of shapes ``(batch_size, d)`` and ``(batch_size,)`` on ``self.device``.

        ``generator`` must live on ``self.device``; without one, torch's global generator is used.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator must be on the problem's device ({self.device}), got one on {generator.device}")
        z = torch.randn(batch_size, self.dim + 1, generator=generator, dtype=self.dtype, device=self.device)
        x = z[:, :-1] * self.feature_variance.sqrt()
        y = x @ self.beta_star + self.noise_std * z[:, -1]
        return x, y

    # ------------------------------------------------------------------ risk (E1)
    def excess_risk(self, beta: Tensor) -> Tensor:
        """``R(beta) - sigma^2/2 = (1/(2d)) sum_i lambda_i (beta_i - beta*_i)^2`` (THEORY E1).

        ``beta`` has shape ``(..., d)``; the result has shape ``(...)``. Differentiable.
        """
        self._check_beta(beta)
        r = beta - self.beta_star.to(beta.dtype)
        return 0.5 * (r * r) @ self.feature_variance.to(beta.dtype)

    def population_risk(self, beta: Tensor) -> Tensor:
        """``R(beta) = E[(<x, beta> - y)^2] / 2`` exactly (THEORY E1); shapes as :meth:`excess_risk`."""
        return self.excess_risk(beta) + 0.5 * self.noise_std**2

    def _check_beta(self, beta: Tensor) -> None:
        if not isinstance(beta, Tensor):
            raise TypeError(f"beta must be a tensor, got {type(beta).__name__}")
        if beta.ndim == 0 or beta.shape[-1] != self.dim:
            raise ValueError(f"beta must have shape (..., {self.dim}), got {tuple(beta.shape)}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the problem (tensors and ``noise_std``)."""
        return {
            "feature_variance": self.feature_variance.clone(),
            "beta_star": self.beta_star.clone(),
            "noise_std": self.noise_std,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TeacherProblem":
        """Inverse of :meth:`state_dict`."""
        missing = {"feature_variance", "beta_star", "noise_std"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        return cls(state["feature_variance"], state["beta_star"], state["noise_std"])

    def __repr__(self) -> str:
        lam = self.spectrum
        return (
            f"TeacherProblem(dim={self.dim}, mean_lambda={float(lam.mean()):.4g}, "
            f"support={int((self.beta_star != 0).sum())}, noise_std={self.noise_std})"
        )


@dataclass(frozen=True)
class TeacherSpec:
    """A sparse teacher described by plain fields, for configuration files (LightningCLI, YAML).

    ``TeacherSpec(...).build()`` is ``TeacherProblem.sparse(...)`` with the same arguments
    (THEORY §1: ``x ~ N(0, diag(lambda) / dim)``, ``y = <x, beta*> + noise_std * xi``).
    :class:`~sde_optim.lightning.TeacherRegression`, :class:`~sde_optim.lightning.TeacherDataModule`
    and :class:`~sde_optim.lightning.TheoryMonitor` accept a spec wherever they accept a
    :class:`TeacherProblem`; the same fields and seed give the same teacher bit for bit.

    Attributes:
        dim: dimension ``d`` (>= 1).
        density: fraction of nonzero teacher coordinates, in [0, 1]; ``round(density * dim)``
            of them are nonzero. ``density = 0`` is the zero teacher ``beta* = 0``; any other
            density must give at least one nonzero coordinate (``density * dim > 0.5``):
            a teacher that was asked to be sparse but came out empty is refused.
        spectrum: ``"isotropic"``, ``"two-level"`` or ``"power-law"`` (see :meth:`TeacherProblem.sparse`).
        values: nonzero teacher entries ``"sign"`` (+-1) or ``"gaussian"`` (N(0, 1)).
        noise_std: label noise ``sigma`` (>= 0).
        exponent: power-law exponent (>= 0), used by ``"power-law"``.
        ratio: level ratio (> 0), used by ``"two-level"``.
        seed: seed of the teacher's support and values (an integer).

    Every field is checked at construction (``ValueError``/``TypeError`` naming it).
    """

    dim: int
    density: float = 0.1
    spectrum: Spectrum = "isotropic"
    values: TeacherValues = "sign"
    noise_std: float = 0.0
    exponent: float = 1.0
    ratio: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        dim, density, *_ = _check_sparse(self.dim, self.density, self.spectrum, self.values, self.exponent, self.ratio,
                                         self.seed)
        check_float("noise_std", self.noise_std, minimum=0.0)
        if density > 0 and round(density * dim) == 0:
            raise ValueError(
                f"density={density} with dim={dim} gives round(density * dim) = 0 nonzero teacher coordinates; "
                f"use density > 0.5 / dim = {0.5 / dim:.4g} (at least one nonzero coordinate), "
                "or density=0 for the zero teacher"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, dim: int = 1024) -> None:
        """Add ``--dim --density --spectrum --values --noise-std --exponent --ratio`` (every field but
        ``seed``, with help texts and these defaults) to an ``argparse`` parser."""
        parser.add_argument("--dim", type=int, default=dim, help="input dimension d")
        parser.add_argument("--density", type=float, default=cls.density,
                            help="fraction of nonzero teacher entries (density * dim must round to >= 1, or density 0)")
        parser.add_argument("--spectrum", default=cls.spectrum, choices=_SPECTRA, help="feature spectrum lambda (THEORY §1)")
        parser.add_argument("--values", default=cls.values, choices=_TEACHER_VALUES, help="nonzero teacher entries")
        parser.add_argument("--noise-std", type=float, default=cls.noise_std, help="label noise sigma")
        parser.add_argument("--exponent", type=float, default=cls.exponent, help="power-law spectrum exponent")
        parser.add_argument("--ratio", type=float, default=cls.ratio, help="two-level spectrum ratio")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, *, seed: int = 0) -> "TeacherSpec":
        """The spec of the flags :meth:`add_arguments` added (``ValueError``/``TypeError`` naming a bad one)."""
        return cls(args.dim, args.density, args.spectrum, args.values, args.noise_std, args.exponent, args.ratio, seed)

    def build(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> TeacherProblem:
        """The :class:`TeacherProblem` these fields describe (``TeacherProblem.sparse``)."""
        return TeacherProblem.sparse(self.dim, self.density, spectrum=self.spectrum, values=self.values,
                                     noise_std=self.noise_std, exponent=self.exponent, ratio=self.ratio,
                                     seed=self.seed, dtype=dtype, device=device)


def as_teacher_problem(problem: Any, name: str = "problem") -> TeacherProblem:
    """``problem`` itself if it is a :class:`TeacherProblem`, ``problem.build()`` if a :class:`TeacherSpec`;
    a mapping of :class:`TeacherSpec` fields (how checkpoints store a spec: plain data) is a spec."""
    if isinstance(problem, TeacherProblem):
        return problem
    if isinstance(problem, Mapping):
        unknown = set(problem) - {f.name for f in fields(TeacherSpec)}
        if unknown:
            raise TypeError(f"{name} as a mapping takes the fields of TeacherSpec; unknown: {sorted(unknown)}")
        problem = TeacherSpec(**problem)
    if isinstance(problem, TeacherSpec):
        return problem.build()
    raise TypeError(f"{name} must be a TeacherProblem or a TeacherSpec, got {type(problem).__name__}")
