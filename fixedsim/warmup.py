"""Compile ahead the Numba kernels that training, sweeps and the default product paths use.

fixedsim's kernels are compiled on first use and kept in Numba's on-disk cache, so only the
first run after an install (or after any source of ``fixedsim/jit`` changes: see
``fixedsim.jit.options``) pays for compiling them.
:func:`warmup` (``fixedsim warmup``) pays it at a time of the user's choosing, with progress:
it runs a few tiny jobs (one training step and one evaluation per preset policy and model,
matrix products and roundings under the usual specs) and reports what each compiled.

:func:`warm_study` does the same for the runs of one study, once, before a sweep's worker
processes start (they would otherwise all compile the same kernels at once, silently).
"""

from __future__ import annotations

import dataclasses
import time

from .compiling import CompileWatch

__all__ = ["JOBS", "warmup", "warm_study", "WarmupResult"]


@dataclasses.dataclass
class WarmupResult:
    """What :func:`warmup` did.

    Attributes
    ----------
    jobs : list of dict
        Per job: ``name``, ``seconds`` (wall time), ``compile_seconds``, ``kernels``
        (signatures compiled).
    """

    jobs: list

    @property
    def compile_seconds(self) -> float:
        return sum(j["compile_seconds"] for j in self.jobs)

    @property
    def kernels(self) -> int:
        return sum(j["kernels"] for j in self.jobs)


def _train_job(policy: str, model: str, reuse: str = ""):
    def run():
        from .data import load
        from .nn import Policy
        from .nn.train import TrainConfig, train

        opts = {"hidden": [32]} if model == "mlp" else {}
        config = TrainConfig(model=model, model_options=opts, epochs=1, batch_size=32,
                             train_size=32, test_size=64, eval_batch_size=64, seed=0,
                             reuse=reuse)
        train(config, Policy.parse(policy), progress=False, data=load("embedded"))
    return run


def _products_job():
    import numpy as np

    from . import BF16, FP16, FP32, Accumulator, FixedFormat, MatmulSpec, conv2d, matmul

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((48, 40)), rng.standard_normal((40, 24))
    specs = [MatmulSpec(), MatmulSpec(output=FP32), MatmulSpec(input=FP16, output=FP16),
             MatmulSpec(input=FP16, accumulator=FP32), MatmulSpec(input=BF16, output=FP32),
             MatmulSpec(input=FP16, accumulator=FP16),
             MatmulSpec(input=FixedFormat(16, 8), accumulator=Accumulator(FixedFormat(32, 16)),
                        output=FixedFormat(16, 8))]

    def run():
        for spec in specs:
            matmul(a, b, spec)
            matmul(a.astype(np.float32), b.astype(np.float32), spec)
        x, w = rng.random((2, 1, 12, 12)), rng.standard_normal((4, 1, 5, 5))
        for spec in specs[:3]:
            conv2d(x, w, spec)
    return run


def _rounding_job():
    import numpy as np

    from . import (
        BF16,
        FP8_E4M3,
        FP8_E5M2,
        FP16,
        FP32,
        FixedFormat,
        Rounding,
        add,
        fma,
        mul,
        quantize,
        sub,
    )

    rng = np.random.default_rng(0)
    x64 = rng.standard_normal(1000)
    formats = [FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FixedFormat(16, 8), FixedFormat(16, 14)]

    def run():
        for fmt in formats:
            for r in (Rounding.NEAREST_EVEN, Rounding.STOCHASTIC):
                for x in (x64, x64.astype(np.float32)):
                    quantize(x, fmt, r, seed=1)
                    quantize(x, fmt, r, seed=1, stats=True)
            add(x64, x64[::-1], fmt)
            sub(x64, x64[::-1], fmt, Rounding.STOCHASTIC, seed=1)
            mul(x64, x64[::-1], fmt)
            fma(x64, x64[::-1], x64, fmt)
    return run


#: The jobs of :func:`warmup`, in order: (name, what it runs). The training jobs cover the
#: preset policies of ``fixedsim train --policy`` on the two models of the studies.
JOBS = [
    ("roundings: quantize, add, sub, mul, fma into the preset formats", _rounding_job),
    ("products: matmul and conv2d under the usual specs", _products_job),
    *[(f"train {model} under {policy}", (lambda p=policy, m=model: _train_job(p, m)))
      for policy in ("float32", "fixed:16:8:stochastic", "fixed:16:8:nearest_even", "fp16",
                     "bf16", "fp8", "float32:fma_chain", "exact")
      for model in ("mlp", "lenet")],
    ("train lenet under float32 with Adaptive Deep Reuse",
     lambda: _train_job("float32", "lenet", reuse="L=25,H=8")),
]


def warmup(log=print, jobs=None) -> WarmupResult:
    """Compile the kernels of :data:`JOBS` (those already in Numba's cache only load).

    Parameters
    ----------
    log : callable
        Called with one line per job (name, wall time, compile time, kernels compiled).
    jobs : list of str, optional
        Run only the jobs whose name contains one of these strings.

    Returns
    -------
    WarmupResult
    """
    todo = [(n, make) for n, make in JOBS if jobs is None or any(j in n for j in jobs)]
    done = []
    for i, (name, make) in enumerate(todo, 1):
        run = make()
        t0 = time.perf_counter()
        with CompileWatch() as watch:
            run()
        row = {"name": name, "seconds": time.perf_counter() - t0,
               "compile_seconds": watch.seconds, "kernels": watch.kernels}
        done.append(row)
        log(f"[{i}/{len(todo)}] {name}: {row['seconds']:.1f} s"
            + (f", compiled {watch.kernels} kernel signature(s) in {watch.seconds:.1f} s"
               if watch.kernels else ", all cached"))
    return WarmupResult(jobs=done)


def _optimizer_step():
    """One step of the one-pass SGD kernel (:func:`fixedsim.jit.optim.sgd_step`, a single
    signature that every SGD run uses) on one float32 weight."""
    import numpy as np

    from .nn import Context, Parameter, Policy
    from .nn.optim import SGD

    policy = Policy.float32()
    p = Parameter("w", np.ones(1, np.float32))
    p.grad = np.ones(1, np.float32)
    SGD({"w": p}, lr=0.5, momentum=0.9).step(Context(policy, seed=0, step=0))


def _distinct(runs) -> list:
    """The runs of ``runs`` with distinct (training settings but the seed, policy), in order."""
    import json

    seen, out = set(), []
    for run in runs:
        key = json.dumps([{k: v for k, v in run.train.items() if k != "seed"}, run.policy],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def _warm_runs(runs, first=None):
    """One training step and one evaluation batch of each run of ``runs`` (after ``first()``
    when given); returns ``(kernels, seconds)`` compiled."""
    from .nn.train import train
    from .study.spec import _load_dataset

    with CompileWatch() as watch:
        if first is not None:
            first()
        for run in runs:
            config = run.config()
            # one training step, and one evaluation batch of the run's size (products of
            # another shape can take another path)
            small = dataclasses.replace(config, epochs=1, train_size=config.batch_size,
                                        test_size=config.eval_batch_size)
            train(small, run.make_policy(), progress=False, data=_load_dataset(config.data),
                  log=lambda line: None)
    return watch.kernels, watch.seconds


def _warm_helper(runs):
    """The second process of :func:`warm_study`: the optimizer step first, then the runs
    from the last."""
    return _warm_runs(list(reversed(runs)), first=_optimizer_step)


def warm_study(runs, notice=None, processes: int = 1) -> CompileWatch:
    """Run one training step and one evaluation batch of every distinct (training settings,
    policy) of a study's ``runs`` (:class:`~fixedsim.study.RunSpec`) on a slice of its data,
    so that a sweep's workers find the kernels compiled.

    With ``processes >= 2`` a second (spawned) process compiles beside this one: first the
    optimizer step, the largest kernel every run needs (this process reaches it only after
    the products of its first run, so finds it compiled), then the runs from the last while
    this process goes from the first. Numba's cache is shared through the disk: each process
    loads what the other has finished, so a kernel compiles twice only when both reach it at
    once, and the pause before the sweep is about halved on two cores.

    Returns the :class:`~fixedsim.compiling.CompileWatch` of this process (``seconds``,
    ``kernels``; when the second process compiled, ``kernels`` adds its kernels and
    ``seconds`` is the wall time of the two); ``notice`` is printed (or called) when the first
    kernel starts compiling here.
    """
    runs = _distinct(runs)
    helper = None
    if processes >= 2 and runs:
        import concurrent.futures as cf
        import multiprocessing

        helper = cf.ProcessPoolExecutor(max_workers=1,
                                        mp_context=multiprocessing.get_context("spawn"))
    t0 = time.perf_counter()
    try:
        future = helper.submit(_warm_helper, runs) if helper is not None else None
        with CompileWatch(notice=notice) as watch:
            _warm_runs(runs)
        if future is not None:
            kernels, _ = future.result()
            if kernels:  # the two compiled side by side: the pause is the wall time
                watch.kernels += kernels
                watch.seconds = time.perf_counter() - t0
    finally:
        if helper is not None:
            helper.shutdown(wait=True)
    return watch
