"""HomogenizedSGD and SVAG against streaming torch.optim.SGD, measured (THEORY §2, §6).

The statistic: for two sets of independent runs (fixed seeds), z(t) = |mean_a(t) - mean_b(t)|
/ sqrt(var_a(t)/n_a + var_b(t)/n_b) on a grid of SGD times. For curves with the same law z(t) is
Welch's |t| with about 2 (n - 1) degrees of freedom at each grid point (14 for the n = 8 runs per
arm here: P(|t| > 4) = 0.0013), so max_t z over ~48 correlated points stays below 4 with
probability > 0.93 even if the points were independent; we accept < 4. Gradient descent on the drift
(noise_scale=0) must be clearly separated from SGD (max z > 4) where label noise makes SGD's noise
a large effect, which shows the injected noise matters. (With 5 runs per arm, 8 degrees of freedom,
P(|t| > 4) = 0.004: a flakiness audit found the same-law maximum at 3.05-3.67 and the separation at
3.62 for other seed bases.)
The issue-size version (d = 2048, 8 seeds, 5 % on the mean curves) is the slow test below
and benchmarks/sgd_reproduction.py.
"""

from __future__ import annotations

import pytest
import torch

from sde_optim import TeacherProblem
from sde_optim.simulation import train_homogenized, train_sgd, train_svag


def _runs(fn, seeds, **kw):
    return torch.stack([fn(seed=1000 + s, **kw)["risk"] for s in range(seeds)])


def _max_z(a, b):
    se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    z = (a.mean(0) - b.mean(0)).abs() / se
    return float(z[1:].max())  # t = 0 is identical by construction


def _max_rel(a, b):
    return float(((a.mean(0) - b.mean(0)).abs() / b.mean(0)).max())


def _setting(dim, noise_std, horizon):
    problem = TeacherProblem.sparse(dim, 0.1, noise_std=noise_std, seed=0)
    return problem, dict(lr=0.5, batch_size=1, steps=int(horizon * dim), record_every=dim // 8)


@pytest.mark.parametrize("noise_std", [0.0, 0.2])
def test_homogenized_sgd_reproduces_sgd_small(noise_std):
    problem, kw = _setting(384, noise_std, 6.0)
    sgd = _runs(train_sgd, 8, problem=problem, **kw)
    hom = _runs(train_homogenized, 8, problem=problem, **kw)
    assert _max_z(hom, sgd) < 4
    if noise_std > 0:
        # Without label noise SGD's own noise moves the mean curve at lr 0.5 by only ~3-4 of these standard errors
        # at d = 384 (3.85 with these seeds; above and below 4 for other seed bases): no reliable separation at this
        # size, which the slow issue-size test below checks at d = 2048. With noise 0.2: 5.6.
        gd = _runs(train_homogenized, 8, problem=problem, noise_scale=0.0, **kw)
        assert _max_z(gd, sgd) > 4


def test_homogenized_sgd_with_rademacher_increments_reproduces_sgd():
    """The simplified weak Euler scheme (z = +-1, sde_optim.optim.increments) has SGD's risk law too:
    same statistic and acceptance as above, on the noisy setting where the noise is a large effect."""
    problem, kw = _setting(384, 0.2, 6.0)
    sgd = _runs(train_sgd, 8, problem=problem, **kw)
    hom = _runs(train_homogenized, 8, problem=problem, increments="rademacher", **kw)
    assert _max_z(hom, sgd) < 4


def test_svag_follows_sgd_in_sgd_time():
    problem, kw = _setting(192, 0.0, 5.0)
    sgd = _runs(train_sgd, 8, problem=problem, **kw)
    assert _max_z(_runs(train_svag, 8, problem=problem, l=4, **kw), sgd) < 4


@pytest.mark.slow
@pytest.mark.parametrize("noise_std", [0.0, 0.2])
def test_homogenized_sgd_reproduces_sgd_issue_size(noise_std):
    """d = 2048, 8 seeds each: mean curves within 5 % through the descent (excess risk of SGD
    >= 10 % of its start), statistically consistent (max z < 4) everywhere."""
    problem, kw = _setting(2048, noise_std, 8.0)
    sgd = _runs(train_sgd, 8, problem=problem, **kw)
    hom = _runs(train_homogenized, 8, problem=problem, **kw)
    gd = _runs(train_homogenized, 8, problem=problem, noise_scale=0.0, **kw)
    excess = sgd.mean(0) - 0.5 * noise_std**2
    end = int((excess < 0.1 * excess[0]).nonzero()[0]) if bool((excess < 0.1 * excess[0]).any()) else len(excess)
    assert _max_rel(hom[:, :end], sgd[:, :end]) < 0.05
    assert _max_z(hom, sgd) < 4
    assert _max_z(gd, sgd) > 4


@pytest.mark.slow
def test_svag_follows_sgd_issue_size():
    problem, kw = _setting(512, 0.0, 6.0)
    sgd = _runs(train_sgd, 8, problem=problem, **kw)
    for l in (1, 4, 16):
        assert _max_z(_runs(train_svag, 8, problem=problem, l=l, **kw), sgd) < 4
