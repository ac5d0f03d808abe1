"""Optimizer-step time and memory of HomogenizedSGD and SVAG relative to torch.optim.SGD.

Same model, same batch, measured side by side in one run (interleaved repetitions, median
of per-repetition times), so the ratios are robust to a shared, noisy machine:

* DLN, d = 10^5, structured noise (E3), exact drift; with and without momentum 0.9 (E11);
* MLP of ~1M parameters, empirical noise with M = B (no noise needed: c^2 = 0) and M = 4B
  (one extra reweighted backward over the M samples, THEORY §2).

Two floor rows bound what any Gaussian-noise optimizer can reach: ``randn(d)`` alone, and
SGD's own update plus ``randn(d)`` (the draw it cannot avoid, and the update it must do); the
"rademacher" rows draw ``z = +-1`` instead (``StructuredNoise(increments="rademacher")``, the
simplified weak Euler scheme: see ``sde_optim.optim.increments``), with their own floor.
``--compile-prototype`` adds a row where everything after the draw (risk, noise scaling,
chain rule, non-finite check and gate, update) is one ``torch.compile``d function: the
measurement behind not using torch.compile in the optimizer (see docs/benchmarks.md).

"step" is ``optimizer.step()`` alone (for EmpiricalNoise it includes the noise backward);
"train step" adds forward, backward and zero_grad. Memory: bytes allocated during one
``step()`` (torch profiler on CPU: the sum of all allocations, an upper bound on the step's
peak extra memory; on CUDA the peak allocated above the baseline).

    python benchmarks/optimizer_overhead.py [--device cuda] [--reps 30] [--threads 1] [--runs 5] [--compile-prototype]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _threads import pin_threads

pin_threads()

import torch  # noqa: E402 - after the thread environment
from torch import nn  # noqa: E402

from sde_optim import SVAG, DiagonalLinearNetwork, EmpiricalNoise, HomogenizedSGD, StructuredNoise, TeacherProblem  # noqa: E402
from sde_optim.optim.increments import draw_increments_  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _step_memory(step, device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())  # bytes allocated (upper bound on the peak)


def _case(name, make, device, reps, inner):
    """make(kind) -> (model, optimizer, backward_fn, before_step_fn); times kinds interleaved."""
    kinds = list(make)
    setups = {k: make[k]() for k in kinds}
    step_t = {k: [] for k in kinds}
    train_t = {k: [] for k in kinds}
    for rep in range(reps + 2):
        for k in kinds:
            model, opt, backward, before = setups[k]

            def prepare():
                opt.zero_grad(set_to_none=False)
                backward()
                before()

            def steps():
                for _ in range(inner):
                    prepare()
                    opt.step()

            def only_steps():
                for _ in range(inner):
                    before()
                    opt.step()

            prepare()
            ts = _timed(only_steps, device) / inner  # gradients stay: we time step() alone
            tt = _timed(steps, device) / inner
            if rep >= 2:  # warm-up
                step_t[k].append(ts)
                train_t[k].append(tt)
    mem = {}
    for k in kinds:
        model, opt, backward, before = setups[k]
        opt.zero_grad()
        backward()
        before()
        mem[k] = _step_memory(opt.step, device)
    base = "SGD"
    s0, t0 = statistics.median(step_t[base]), statistics.median(train_t[base])
    ratios = {}
    for k in kinds:
        s, t = statistics.median(step_t[k]), statistics.median(train_t[k])
        print(f"{name:<22} {k:<24} {s * 1e6:10.1f} {s / s0:8.2f}x {t * 1e6:12.1f} {t / t0:8.2f}x {mem[k] / 2**20:10.2f}")
        ratios[k] = t / t0
    return ratios


class _RandnFloor:
    """Not an optimizer: one draw of the parameters' size per step (Gaussian, or signs with
    ``increments="rademacher"``; ``with_update``: plus SGD's update), the least any optimizer with
    that noise must do (a lower bound on HomogenizedSGD's step)."""

    def __init__(self, params, with_update=False, increments="gaussian"):
        self.params = list(params)
        self.increments = increments
        self.gen = torch.Generator(device=self.params[0].device).manual_seed(0)
        self.z = torch.empty_like(self.params[0])
        self.scratch = {}
        self.sgd = torch.optim.SGD(self.params, lr=0.5) if with_update else None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def step(self):
        draw_increments_(self.z, self.gen, self.increments, self.scratch)
        if self.sgd is not None:
            self.sgd.step()


class _CompiledPrototype(_RandnFloor):
    """Not an optimizer: the structured step (uv, isotropic, skip policy) with everything after
    the draw fused by ``torch.compile`` into one function: risk, noise, chain rule, finite check,
    gate and update. Measures what compilation would buy on this machine."""

    def __init__(self, model, problem, lr):
        super().__init__(model.parameters())
        self.u, self.v = model.u, model.v
        self.neg_bs, self.h = -problem.beta_star, float(problem.feature_variance[0])
        self.neg_lr = torch.tensor(-lr, dtype=self.u.dtype, device=self.u.device)
        self.finite = torch.zeros((), dtype=torch.int64, device=self.u.device)
        self.fused = torch.compile(_fused_structured_step, dynamic=False, fullgraph=True)

    @torch.no_grad()
    def step(self):
        self.z.normal_(generator=self.gen)
        self.fused(self.u, self.v, self.u.grad, self.v.grad, self.z, self.neg_bs, self.neg_lr, self.finite, self.h)


def _fused_structured_step(u, v, gu, gv, z, neg_bs, neg_lr, finite, h: float):
    r = torch.addcmul(neg_bs, u, v)
    t = z * torch.sqrt(h * torch.dot(r, r)) * h ** 0.5
    du, dv = torch.addcmul(gu, v, t), torch.addcmul(gv, u, t)
    ok = torch.isfinite(du).all() & torch.isfinite(dv).all()
    scale = torch.where(ok, neg_lr, torch.zeros_like(neg_lr))
    u.addcmul_(torch.nan_to_num(du, 0.0, 0.0, 0.0), scale)
    v.addcmul_(torch.nan_to_num(dv, 0.0, 0.0, 0.0), scale)
    finite.add_(ok)


def dln_case(device, dtype, reps, inner, compile_prototype=False):
    d = 100_000
    problem = TeacherProblem.sparse(d, 0.1, seed=0, dtype=dtype, device=device)

    def build(kind):
        def f():
            torch.manual_seed(0)
            m = DiagonalLinearNetwork(d, dtype=dtype, device=device)
            momentum = 0.9 if "mom" in kind else 0.0
            if kind.startswith("SGD"):
                opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=momentum)
            elif kind == "SVAG l=4":
                opt = SVAG(m.parameters(), lr=0.5, l=4)
            elif kind.startswith("floor"):
                opt = _RandnFloor(m.parameters(), with_update="SGD" in kind,
                                  increments="rademacher" if "signs" in kind else "gaussian")
            elif kind.startswith("compiled"):
                opt = _CompiledPrototype(m, problem, lr=0.5)
            else:
                noise = StructuredNoise(problem, m, increments="rademacher" if "rademacher" in kind else "gaussian")
                opt = HomogenizedSGD(m.parameters(), lr=0.5, batch_size=1, noise=noise,
                                     momentum=momentum, nonfinite="raise" if "raise" in kind else "skip")
            return m, opt, lambda: problem.population_risk(m.beta).backward(), lambda: None
        return f

    kinds = ["SGD", "HomogenizedSGD (skip)", "HomogenizedSGD (raise)", "SGD mom 0.9", "Homogenized mom 0.9",
             "SVAG l=4", "floor: randn(d) only", "floor: SGD + randn(d)", "Homogenized rademacher", "H rademacher raise",
             "H rademacher mom 0.9", "floor: SGD + signs(d)"]
    if compile_prototype:
        kinds.append("compiled post-draw proto")
    return _case("DLN d=1e5 structured", {k: build(k) for k in kinds}, device, reps, inner)


def mlp_case(device, dtype, reps, inner, batch=32):
    torch.manual_seed(0)
    x4 = torch.randn(4 * batch, 512, device=device, dtype=dtype)
    y4 = torch.randn(4 * batch, 1, device=device, dtype=dtype)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 1)).to(device, dtype)

    def build(kind, m_factor):
        def f():
            m = net()
            x, y = x4[: m_factor * batch], y4[: m_factor * batch]
            backward = lambda: (0.5 * (m(x) - y).pow(2).mean()).backward()  # noqa: E731
            if kind == "SGD":
                return m, torch.optim.SGD(m.parameters(), lr=0.01), backward, lambda: None
            opt = HomogenizedSGD(m.parameters(), lr=0.01, batch_size=batch, noise=EmpiricalNoise(m))
            return m, opt, backward, lambda: opt.set_batch(x, y)
        return f

    nparams = sum(p.numel() for p in net().parameters())
    for m_factor in (1, 4):
        _case(f"MLP {nparams / 1e6:.2f}M M={m_factor}B", {"SGD": build("SGD", m_factor), f"Homogenized M={m_factor}B": build("H", m_factor)},
              device, reps, inner)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile-prototype", action="store_true",
                    help="add the torch.compile prototype row (compiles for tens of seconds first)")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the DLN case this many times (fresh models) and summarize its training-step ratios")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# device={device}, dtype={args.dtype}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"median of {args.reps} interleaved repetitions x {args.inner} steps")
    print(f"{'case':<22} {'optimizer':<24} {'step us':>10} {'ratio':>9} {'train us':>12} {'ratio':>9} {'alloc MiB':>10}")
    runs = [dln_case(device, dtype, args.reps, args.inner, args.compile_prototype) for _ in range(args.runs)]
    if args.runs > 1:  # the run-to-run spread on a shared machine: a ratio claim should hold over it
        print(f"# DLN training step vs SGD over {args.runs} runs: min / median / max")
        for k in runs[0]:
            xs = sorted(r[k] for r in runs)
            print(f"{'DLN d=1e5 structured':<22} {k:<24} {xs[0]:8.2f}x {statistics.median(xs):8.2f}x {xs[-1]:8.2f}x")
    mlp_case(device, dtype, args.reps, args.inner)


if __name__ == "__main__":
    main()
