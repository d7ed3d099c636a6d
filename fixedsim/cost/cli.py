"""``fixedsim cost ...``: predict, calibrate, validate, profiles, instructions (docs/cost.md)."""

from __future__ import annotations

import json
import sys

__all__ = ["add_parser"]


def _model_options(text):
    if not text:
        return {}
    try:
        d = json.loads(text)
    except ValueError as err:
        raise ValueError(f"--model-options is not JSON: {err}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--model-options must be a JSON object, got {text!r}")
    return d


def _machine(name):
    """``this`` without a calibrated profile: calibrate now (and say so)."""
    from .profiles import calibrate, this_profile_path

    if name.lower() == "this" and not this_profile_path().is_file():
        path = this_profile_path()
        print(f"no profile of this machine yet: calibrating (fixedsim cost calibrate), "
              f"written to {path}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        calibrate(log=lambda s: print("  " + s, file=sys.stderr)).save(path)
    return name


def _cmd_predict_self(args) -> int:
    from ..nn.policy import Policy
    from .model import resolve_model
    from .selfmodel import measure, predict_self

    pol = Policy.parse(args.policy)
    net, shape = resolve_model(args.model, None, 10, _model_options(args.model_options))
    print(f"fixedsim cost predict: {args.model} under {pol.name} on fixedsim itself (this "
          f"machine): measuring its layers at batches 8 and 32 ...")
    prof = measure(pol, net, shape)
    p = predict_self(net, pol, args.batch, args.images, shape, test_images=args.test_images,
                     eval_batch=args.eval_batch, optimizer=args.optimizer, profile=prof)
    print(f"{'phase':5} {'layer':12} {'pass':9} {'expected':>10}")
    for (phase, layer, pss), t in p["rows"].items():
        print(f"{phase:5} {layer:12} {pss:9} {t:>9.3f}s")
    print(f"expected epoch (fixedsim): {p['epoch_s']:.4g} s (training {p['train_s']:.4g} s, "
          f"evaluation {p['eval_s']:.4g} s)")
    return 0


def _cmd_predict(args) -> int:
    from .model import predict

    if args.machine.lower() == "fixedsim":
        return _cmd_predict_self(args)

    pred = predict(args.model, args.policy, _machine(args.machine), batch=args.batch,
                   images=args.images, test_images=args.test_images,
                   eval_batch=args.eval_batch, optimizer=args.optimizer,
                   model_options=_model_options(args.model_options))
    m = pred.machine
    print(f"fixedsim cost predict: {args.model} under {pred.meta['policy']} on {m.name} "
          f"({m.description}), batch {args.batch}, {args.images:,} training images"
          + (f", {args.test_images:,} test images" if args.test_images else ""))
    print(pred.table())
    print(f"expected epoch: {pred.epoch_s:.4g} s")
    if args.csv:
        pred.to_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def _cmd_calibrate(args) -> int:
    import os

    from .profiles import calibrate, this_profile_path

    out = args.out or this_profile_path()
    print(f"fixedsim cost calibrate: measuring this machine (load average "
          f"{os.getloadavg()[0]:.2f})")
    prof = calibrate(quick=args.quick, threads=args.threads, log=lambda s: print("  " + s))
    import pathlib

    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.save(out)
    print(f"wrote {out} (use it as --machine this"
          + ("" if out == this_profile_path() else f" with FIXEDSIM_PROFILE={out}, or "
             f"--machine {out}") + ")")
    return 0


def _cmd_validate(args) -> int:
    from .validate import validate

    v = validate(args.model, args.policy, _machine(args.machine), batch=args.batch,
                 images=args.images, test_images=args.test_images, eval_batch=args.eval_batch,
                 reps=args.reps, threads=args.threads,
                 model_options=_model_options(args.model_options))
    i = v.info
    print(f"fixedsim cost validate: {args.model} under {args.policy} (PyTorch {i['torch']}, "
          f"{i['dtype']}, {i['threads']} threads, {i['clock']}) against machine "
          f"{i['machine']}, batch "
          f"{args.batch}, {args.images:,} images; load average {i['load_before']:.2f} before, "
          f"{i['load_after']:.2f} after")
    print(v.table())
    if args.csv:
        v.prediction.to_csv(args.csv, extra={"measured_s": [
            "" if m is None else m for m in v.measured]})
        print(f"wrote {args.csv}")
    return 0


def _cmd_profiles(args) -> int:
    from .profiles import PUBLISHED, load_profile, this_profile_path

    names = list(PUBLISHED) + (["this"] if this_profile_path().is_file() else [])
    for n in names:
        p = load_profile(n)
        rates = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in p.rates.items())
        print(f"{n:15} {p.description}\n{'':15} TMAC/s: {rates}; memory "
              f"{p.bandwidth / 1e9:.4g} GB/s; per call {p.per_call_s * 1e6:.3g} us")
        if args.sources:
            for k, s in p.sources.items():
                print(f"{'':17}{k}: {s}")
    return 0


def _cmd_instructions(args) -> int:
    from .instructions import check

    return check(log=print, quick=args.quick, keep=args.out)


def _run(fn):
    def wrapped(args):
        from .counts import CountError
        from .profiles import ProfileError

        try:
            return fn(args)
        except (CountError, ProfileError, ValueError, OSError) as err:
            print(f"fixedsim cost {args.cost_command}: error: {err}", file=sys.stderr)
            return 2
    return wrapped


def add_parser(sub) -> None:
    """Add the ``cost`` subcommand to the ``fixedsim`` parser's subparsers."""
    c = sub.add_parser(
        "cost", help="the cost model: predict time per layer and epoch, calibrate, validate",
        description="Time per epoch as a function of the number formats: exact counts by "
        "shape, machine profiles (published GPUs and FPGA, or this machine calibrated) and a "
        "roofline per layer and product. See docs/cost.md.")
    cs = c.add_subparsers(dest="cost_command", required=True)

    def common(p, images_default):
        p.add_argument("--model", default="lenet", help="mlp, lenet or cifarnet (default lenet)")
        p.add_argument("--model-options", default=None, metavar="JSON")
        p.add_argument("--policy", default="float32",
                       help="a policy name or .toml/.json file (default float32)")
        p.add_argument("--machine", default="this",
                       help="v100, a100, h100, h200, gupta2015_fpga, this (calibrated), a "
                       ".toml profile (default this), or fixedsim (predict: fixedsim's own "
                       "time, its layers measured on this machine)")
        p.add_argument("--batch", type=int, default=64, help="default 64")
        p.add_argument("--images", type=int, default=images_default,
                       help=f"training images per epoch (default {images_default:,})")
        p.add_argument("--test-images", type=int, default=0,
                       help="test images evaluated after the epoch (default 0)")
        p.add_argument("--eval-batch", type=int, default=1000)
        p.add_argument("--csv", default=None, metavar="FILE",
                       help="write the rows (layer, product, macs, bytes, predicted_s, ...)")

    p = cs.add_parser("predict", help="predicted time per layer, product and epoch")
    common(p, 10_000)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.set_defaults(func=_run(_cmd_predict))

    k = cs.add_parser("calibrate", help="measure this machine and write its profile")
    k.add_argument("--out", default=None, metavar="FILE",
                   help="where to write it (default $FIXEDSIM_PROFILE or "
                   "~/.cache/fixedsim/this.toml)")
    k.add_argument("--quick", action="store_true", help="smaller, faster measurements")
    k.add_argument("--threads", type=int, default=None,
                   help="BLAS and PyTorch threads (default: the libraries' own); validate "
                   "runs with the same count")
    k.set_defaults(func=_run(_cmd_calibrate))

    v = cs.add_parser("validate", help="predicted against native PyTorch timings, per layer "
                      "and per epoch")
    common(v, 4096)
    v.add_argument("--reps", type=int, default=5,
                   help="timing rounds per layer (the least is kept; default 5)")
    v.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads (default: those the machine profile was measured "
                   "with)")
    v.set_defaults(func=_run(_cmd_validate))

    s = cs.add_parser("profiles", help="list the machine profiles")
    s.add_argument("--sources", action="store_true", help="print every number's source")
    s.set_defaults(func=_run(_cmd_profiles))

    i = cs.add_parser("instructions", help="fixedsim's instruction-count model of its kernels "
                      "against callgrind (or perf where the machine has a PMU)")
    i.add_argument("--quick", action="store_true", help="leave out the largest product")
    i.add_argument("--out", default=None, metavar="DIR",
                   help="keep the callgrind profiles and the fitted model here")
    i.set_defaults(func=_run(_cmd_instructions))
