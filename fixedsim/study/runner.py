"""Run a study: local worker processes or a Dask cluster, atomic per-run records, resume.

Layout of the output folder ``OUT``::

    OUT/study.json           the study last run into OUT (name, seed, axes, run ids)
    OUT/results/RUN_ID.json  one record per finished run (ok or failed), written atomically:
                             the authoritative results; a killed sweep leaves whole files only
    OUT/results.csv          one row per record, rebuilt from results/ (temporary file + rename)
    OUT/histories.csv        run_id + the per-epoch history columns of every recorded run
    OUT/runs/RUN_ID/         the train() run directory: run.json, history.csv, counters.csv,
                             checkpoint.npz, curves.png
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import shutil
import sys
import time

from .. import counters as _counters
from .spec import RunSpec, Study, StudyError, _load_dataset

__all__ = ["run_study", "execute_run", "SweepResult", "load_records", "write_tables",
           "RESULT_COLUMNS"]

#: The leading columns of results.csv (then the axes, the derived policy columns, the
#: metrics, the provenance and the full config as JSON).
RESULT_COLUMNS = ("run_id", "status")
_DERIVED = ("policy_name", "model", "data", "replicate", "format", "word_length",
            "frac_length", "rounding")
_METRICS = ("final_test_acc", "best_test_acc", "final_test_loss", "final_train_acc",
            "final_train_loss", "best_epoch", "epochs_done", "seconds", "compile_seconds",
            "wall_seconds", "resumed_from_epoch", "warnings")
_TAIL = ("error_type", "error", "seed", "study_seed", "study", "index", "fixedsim_version",
         "git_commit", "python", "numpy", "numba", "numba_threads", "blas_threads", "machine",
         "platform", "pid", "executor", "started", "finished", "config")

_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_study` returns.

    Attributes
    ----------
    out : pathlib.Path
        The output folder.
    records : list of dict
        The record of every run of the study, in grid order (as in ``results/RUN_ID.json``).
    ran, skipped, failed : list of str
        Run ids run now, skipped as already recorded ok (``resume=True``), and failed (run now).
    """

    out: pathlib.Path
    records: list
    ran: list
    skipped: list
    failed: list

    @property
    def ok(self) -> bool:
        """Did every run of the study finish ok?"""
        return all(r["status"] == "ok" for r in self.records)


# -- the worker side ----------------------------------------------------------------------------
_PROVENANCE: dict = {}


def _static_provenance() -> dict:
    if not _PROVENANCE:
        import platform

        import numba
        import numpy as np

        from .. import __version__
        try:
            from ..nn.train import provenance
            commit = provenance().get("git_commit")
        except Exception:  # pragma: no cover - provenance is best effort
            commit = None
        _PROVENANCE.update({"fixedsim_version": __version__, "git_commit": commit,
                            "python": platform.python_version(), "numpy": np.__version__,
                            "numba": numba.__version__, "machine": platform.node(),
                            "platform": platform.platform()})
    return dict(_PROVENANCE)


def _set_numba_threads(n) -> int:
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return numba.get_num_threads()


def _blas_limits(n):
    """A context manager limiting BLAS/OpenMP thread pools (threadpoolctl, when installed)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(n))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _policy_columns(policy: dict) -> dict:
    """format / word_length / frac_length / rounding of the policy's weights role."""
    from ..formats import FixedFormat, parse_format

    w = policy.get("weights") or {}
    out = {"format": None, "word_length": None, "frac_length": None, "rounding": None}
    if w.get("format"):
        fmt = parse_format(w["format"])
        out["format"] = repr(fmt)
        out["rounding"] = w.get("rounding", "nearest_even")
        if isinstance(fmt, FixedFormat):
            out["word_length"], out["frac_length"] = fmt.word_length, fmt.frac_length
    return out


def _partial_history(run_dir: pathlib.Path) -> list:
    """The history of the last good epoch of a stopped run (from its checkpoint)."""
    import numpy as np

    try:
        with np.load(run_dir / "checkpoint.npz") as z:
            return json.loads(bytes(z["meta"]).decode())["history"]
    except Exception:
        return []


def execute_run(task: dict, data=None) -> dict:
    """Train one run and return its record; never raises for a failed run.

    This is the function the workers call (in a process pool, in-process or on Dask).

    Parameters
    ----------
    task : dict
        ``run_id``, ``train`` and ``policy`` dicts, ``axes``, ``replicate``, ``study_seed``,
        ``study``, ``index``, ``run_dir`` (str or None), ``resume`` (continue from the run
        directory's checkpoint), ``numba_threads``, ``blas_threads``, ``executor``,
        ``count_steps`` (optional: per-step events counted, see :func:`fixedsim.counters.record`).
    data : fixedsim.data.Dataset, optional
        The data set, when the caller has it (otherwise loaded once per process).

    Returns
    -------
    dict
        The run's record (see docs/sweeps.md): ``status`` "ok" or "failed" (``error``,
        ``error_type``), the metrics, the history, the provenance and the full config.
    """
    from ..compiling import CompileWatch
    from ..nn import Policy
    from ..nn.train import TrainConfig, train

    t0 = time.perf_counter()
    started = _now()
    threads = _set_numba_threads(task.get("numba_threads") or 1)
    blas = task.get("blas_threads") or 1
    run_dir = pathlib.Path(task["run_dir"]) if task.get("run_dir") else None
    record = {"run_id": task["run_id"], "status": "ok", "axes": task["axes"],
              "replicate": task["replicate"], "policy_name": task["policy"].get("name"),
              "model": task["train"]["model"], "data": task["train"]["data"]}
    record.update(_policy_columns(task["policy"]))
    history, error, error_type, resumed_from = [], None, None, None
    compile_seconds, warnings = 0.0, []
    try:
        config = TrainConfig.from_dict(task["train"], f"run {task['run_id']} train")
        policy = Policy.from_dict(task["policy"], f"run {task['run_id']} policy")
        ds = data if data is not None else _load_dataset(config.data)
        if task.get("resume") and run_dir is not None:
            before = _partial_history(run_dir)
            resumed_from = len(before) if before else None
        with _blas_limits(blas), _counters.record(steps=bool(task.get("count_steps"))), \
                CompileWatch() as watch:
            try:
                res = train(config, policy, run_dir, resume=bool(task.get("resume")),
                            progress=False, data=ds, log=lambda line: None)
            finally:
                compile_seconds = watch.seconds
        history, warnings = res.history, res.warnings
    except Exception as err:  # a failed run is a record, never a crash of the sweep
        error_type = type(err).__name__
        error = str(err) or repr(err)
        if run_dir is not None:
            history = _partial_history(run_dir)
    history = [_jsonable(r) for r in history]
    if error is not None:
        record["status"] = "failed"
    if history and error is None:
        last = history[-1]
        best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
        record.update(final_test_acc=last["test_acc"], best_test_acc=history[best]["test_acc"],
                      best_epoch=history[best]["epoch"], final_test_loss=last["test_loss"],
                      final_train_acc=last["train_acc"], final_train_loss=last["train_loss"])
    record.update(epochs_done=len(history),
                  seconds=float(sum(r.get("seconds", 0.0) for r in history)),
                  compile_seconds=compile_seconds, warnings=warnings or None,
                  wall_seconds=time.perf_counter() - t0, resumed_from_epoch=resumed_from,
                  error_type=error_type, error=error, seed=task["train"]["seed"],
                  study_seed=task["study_seed"], study=task.get("study"),
                  index=task.get("index"))
    record.update(_static_provenance())
    record.update(numba_threads=threads, blas_threads=blas, pid=os.getpid(),
                  executor=task.get("executor"), started=started, finished=_now(),
                  config={"train": task["train"], "policy": task["policy"],
                          "replicate": task["replicate"], "study_seed": task["study_seed"]},
                  history=history)
    return record


def _jsonable(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _init_pool_worker(numba_threads):  # pragma: no cover - runs in the worker processes
    _die_with_parent()
    _set_numba_threads(numba_threads)


def _die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when the sweep that spawned it dies,
    however it dies (SIGKILL included). Without it a worker of a killed sweep went on with
    the runs queued to it, writing into the study folder beside a resumed sweep, and then
    waited forever. Elsewhere nothing (the sweep's SIGTERM handler still stops its workers)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return
    if os.getppid() == 1:  # the parent died before the call: nothing will signal us
        os._exit(1)


class SweepTerminated(SystemExit):
    """SIGTERM reached a sweep that runs its runs in worker processes: the workers are
    stopped, the finished runs are on disk (``--resume`` goes on), exit status 143."""


def _on_sigterm(signum, frame):
    print("\nfixedsim sweep: terminated (SIGTERM): the workers are stopped; the runs finished "
          "so far are recorded, and the sweep goes on with --resume", file=sys.stderr)
    raise SweepTerminated(128 + signum)


# -- records and tables -------------------------------------------------------------------------
def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_records(out) -> dict:
    """The records in ``OUT/results/``: run id -> record (unreadable files are skipped)."""
    folder = pathlib.Path(out) / "results"
    records = {}
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):  # pragma: no cover - only whole files are written
                continue
            if isinstance(rec, dict) and rec.get("run_id") == p.stem:
                records[p.stem] = rec
    return records


def _adopt_table(out, records) -> dict:
    """The runs of ``OUT/results.csv`` that have no record in ``OUT/results/`` (a folder kept
    as its table and histories, as the studies commit them), as records written there: a
    resumed sweep then skips them and rewrites the table with them, so raising ``replicates``
    and resuming adds seeds to such a folder."""
    out = pathlib.Path(out)
    if not (out / "results.csv").is_file():
        return {}
    from .report import _records_from_csv

    adopted = {r["run_id"]: r for r in _records_from_csv(out) if r["run_id"] not in records}
    if adopted:
        (out / "results").mkdir(parents=True, exist_ok=True)
    for rec in adopted.values():
        if isinstance(rec.get("config"), str):
            try:
                rec["config"] = json.loads(rec["config"])
            except ValueError:
                pass
        _atomic_write_text(out / "results" / f"{rec['run_id']}.json",
                           json.dumps(rec, indent=1, default=str) + "\n")
    return adopted


def _ordered(records) -> list:
    return sorted(records, key=lambda r: (r.get("index") if r.get("index") is not None
                                          else 1 << 60, r["run_id"]))


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return v


def result_rows(records) -> tuple[list, list]:
    """Flat rows (and the column order) of results.csv from records."""
    axes = []
    for r in records:  # "replicate" has its own column
        axes += [k for k in r.get("axes", {}) if k not in axes and k != "replicate"]
    cols = list(RESULT_COLUMNS) + axes + list(_DERIVED + _METRICS + _TAIL)
    rows = []
    for r in records:
        row = {c: _cell(r.get(c)) for c in cols}
        row.update({a: _cell(r["axes"].get(a)) for a in axes})
        rows.append(row)
    return cols, rows


def _csv_text(cols, rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out, records=None) -> None:
    """(Re)write ``OUT/results.csv`` and ``OUT/histories.csv`` atomically from the records."""
    out = pathlib.Path(out)
    recs = _ordered((records if records is not None else load_records(out)).values())
    cols, rows = result_rows(recs)
    _atomic_write_text(out / "results.csv", _csv_text(cols, rows))
    hcols = ["run_id"]
    hrows = []
    for r in recs:
        for h in r.get("history") or []:
            hcols += [k for k in h if k not in hcols]
            hrows.append({"run_id": r["run_id"], **{k: _cell(v) for k, v in h.items()}})
    _atomic_write_text(out / "histories.csv", _csv_text(hcols, hrows))


# -- the driver ---------------------------------------------------------------------------------
def _task(run: RunSpec, study: Study, out: pathlib.Path, resume: bool, numba_threads: int,
          executor: str) -> dict:
    run_dir = out / "runs" / run.run_id
    return {"run_id": run.run_id, "train": run.train, "policy": run.policy, "axes": run.axes,
            "replicate": run.replicate, "study_seed": run.study_seed, "study": study.name,
            "index": run.index, "run_dir": str(run_dir),
            "resume": resume and (run_dir / "checkpoint.npz").is_file(),
            "numba_threads": numba_threads, "blas_threads": 1, "executor": executor,
            "count_steps": study.count_steps}


def _headline(rec: dict, done: int, total: int) -> str:
    label = ", ".join(f"{k}={v}" for k, v in rec.get("axes", {}).items()) or "(single run)"
    head = f"[{done}/{total}] {rec['run_id']} {label}: "
    if rec["status"] == "ok":
        acc = rec.get("final_test_acc")
        best = rec.get("best_test_acc")
        txt = (f"final test acc {100 * acc:.2f}% (best {100 * best:.2f}%)"
               if acc is not None else "ok, no epoch")
        comp = rec.get("compile_seconds") or 0.0
        warn = "".join(f"; warning: {w}" for w in rec.get("warnings") or [])
        return (head + f"{txt}, {rec['wall_seconds']:.1f} s"
                + (f" ({comp:.1f} s of it compiling kernels)" if comp >= 0.05 else "") + warn)
    return head + f"FAILED after {rec['wall_seconds']:.1f} s: {rec['error_type']}: {rec['error']}"


def run_study(study: Study, out=None, *, workers: int | None = None, scheduler=None,
              resume: bool = False, progress: bool = True, numba_threads: int | None = None,
              log=None, compile_notice=None) -> SweepResult:
    """Run every run of a study and record the results in ``out``.

    Parameters
    ----------
    study : Study
        From :func:`load_study`.
    out : path, optional
        The output folder (default :meth:`Study.default_out`).
    workers : int, optional
        Local worker processes (default ``[study] workers``, else the number of CPUs; never
        more than the runs to do). 1 runs in this process. Ignored with ``scheduler``.
    scheduler : str or distributed.Client, optional
        A Dask scheduler address (``"tcp://host:port"``) or a connected ``Client``: submit the
        runs to that cluster instead (``pip install "fixedsim[dist]"``).
    resume : bool
        Continue a sweep in ``out``: runs recorded ok are skipped; failed runs start over;
        unfinished runs continue from their last checkpoint. Without it, an ``out`` that
        already holds results is an error.
    progress : bool
        A tqdm bar over the runs (on stderr).
    numba_threads : int, optional
        Numba threads per run (default ``[study] numba_threads``, else 1). BLAS thread pools
        are limited to 1 thread per run.
    log : callable, optional
        Called with one line per finished run (default: ``tqdm.write`` to stdout with the
        bar, else ``print``).
    compile_notice : str or callable, optional
        Printed to stderr (or called) once, when a kernel starts compiling in this process
        (runs in this process: ``workers=1``). With local worker processes, the kernels the
        runs need are compiled first, here and in one more process side by side
        (:func:`fixedsim.warmup.warm_study`: one step of each distinct configuration), so
        that the workers load them from Numba's cache instead of all compiling them at once.

    Returns
    -------
    SweepResult

    Raises
    ------
    StudyError
        ``out`` holds results and ``resume`` is False, a data set does not load, or the
        scheduler cannot be reached. Nothing has run then.
    """
    from tqdm import tqdm

    if log is None:
        log = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else print
    out = pathlib.Path(out) if out is not None else study.default_out()
    threads = numba_threads or study.numba_threads or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise StudyError(f"numba_threads must be an integer >= 1, got {threads!r}")
    if workers is None:
        workers = study.workers or os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"workers must be an integer >= 1, got {workers!r}")
    records = load_records(out)
    if resume:
        records.update(_adopt_table(out, records))
    runs_dir = out / "runs"
    started_runs = [p.name for p in runs_dir.iterdir()] if runs_dir.is_dir() else []
    if (records or started_runs) and not resume:
        raise StudyError(f"{out} already holds a sweep ({len(records)} run(s) recorded, "
                         f"{len(started_runs)} run folder(s)); use --resume (resume=True) to "
                         f"continue it, or choose another --out")
    if not study.data_checked:
        study.check_data()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "study.json", json.dumps({
        "name": study.name, "path": str(study.path) if study.path else None,
        "description": study.description, "seed": study.seed, "seeds": study.seeds,
        "axes": study.axes,
        "runs": [r.run_id for r in study.runs]}, indent=2) + "\n")
    (out / "results").mkdir(exist_ok=True)

    skipped = [r.run_id for r in study.runs
               if records.get(r.run_id, {}).get("status") == "ok"] if resume else []
    done = set(skipped)
    todo = [r for r in study.runs if r.run_id not in done]
    for r in todo:  # a failed run starts over
        if records.get(r.run_id, {}).get("status") == "failed":
            shutil.rmtree(runs_dir / r.run_id, ignore_errors=True)
    if skipped:
        log(f"resume: {len(skipped)} run(s) already recorded ok are skipped; "
            f"{len(todo)} to run")
    workers = min(workers, max(len(todo), 1))
    if todo and scheduler is None and workers > 1:
        from ..warmup import warm_study

        watch = warm_study(todo, notice=compile_notice, processes=min(workers, 2))
        if watch.kernels:
            log(f"compiled {watch.kernels} kernel signature(s) in {watch.seconds:.1f} s "
                f"(once per install); starting {workers} workers")

    ran, failed = [], []
    last_write = [0.0]

    def finished(rec, bar):
        _atomic_write_text(out / "results" / f"{rec['run_id']}.json",
                           json.dumps(rec, indent=1, default=str) + "\n")
        records[rec["run_id"]] = rec
        ran.append(rec["run_id"])
        if rec["status"] != "ok":
            failed.append(rec["run_id"])
        if time.monotonic() - last_write[0] > 2.0 or len(ran) == len(todo):
            write_tables(out, records)
            last_write[0] = time.monotonic()
        bar.update()
        log(_headline(rec, len(ran), len(todo)))

    with tqdm(total=len(todo), desc=f"sweep {study.name}", unit="run", file=sys.stderr,
              disable=not progress or not todo) as bar:
        if not todo:
            pass
        elif scheduler is not None:
            _run_dask(study, todo, out, resume, threads, scheduler, lambda r: finished(r, bar))
        elif workers == 1:
            from ..compiling import CompileWatch

            with CompileWatch(notice=compile_notice):
                _run_inprocess(study, todo, out, resume, threads, lambda r: finished(r, bar))
        else:
            _run_pool(study, todo, out, resume, threads, workers, lambda r: finished(r, bar))
    write_tables(out, records)
    recs = [records[r.run_id] for r in study.runs if r.run_id in records]
    return SweepResult(out=out, records=recs, ran=ran, skipped=skipped, failed=failed)


def _run_inprocess(study, todo, out, resume, threads, finished):
    import numba

    before = numba.get_num_threads()
    try:
        for run in todo:
            task = _task(run, study, out, resume, threads, "in-process")
            finished(execute_run(task, data=_load_dataset(run.train["data"])))
    finally:
        numba.set_num_threads(before)


def _failed_record(task: dict, err: BaseException) -> dict:
    """The record of a run whose worker died (no result came back)."""
    rec = {"run_id": task["run_id"], "status": "failed", "axes": task["axes"],
           "replicate": task["replicate"], "policy_name": task["policy"].get("name"),
           "model": task["train"]["model"], "data": task["train"]["data"],
           **_policy_columns(task["policy"]), "epochs_done": 0, "seconds": 0.0,
           "wall_seconds": 0.0, "error_type": type(err).__name__,
           "error": f"the worker running it died or the result was lost: {err}",
           "seed": task["train"]["seed"], "study_seed": task["study_seed"],
           "study": task["study"], "index": task["index"], "executor": task["executor"],
           "finished": _now(),
           "config": {"train": task["train"], "policy": task["policy"],
                      "replicate": task["replicate"], "study_seed": task["study_seed"]},
           "history": []}
    rec.update(_static_provenance())
    return rec


def _sigterm_handler(handler):
    """Install ``handler`` for SIGTERM (main thread only; None leaves it); the previous one."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _run_pool(study, todo, out, resume, threads, workers, finished):
    import concurrent.futures as cf
    import multiprocessing

    saved = {k: os.environ.get(k) for k in _BLAS_ENV}
    for k in _BLAS_ENV:  # read by the spawned workers when they load OpenBLAS / OpenMP
        os.environ[k] = "1"
    pool = cf.ProcessPoolExecutor(max_workers=workers,
                                  mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_pool_worker, initargs=(threads,))
    previous = _sigterm_handler(_on_sigterm)
    try:
        futures = {}
        for run in todo:
            task = _task(run, study, out, resume, threads, "process-pool")
            futures[pool.submit(execute_run, task)] = task
        for fut in cf.as_completed(futures):
            try:
                rec = fut.result()
            except Exception as err:  # BrokenProcessPool and the like
                rec = _failed_record(futures[fut], err)
            finished(rec)
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers now; finished runs are on disk
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        _sigterm_handler(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_dask(study, todo, out, resume, threads, scheduler, finished):
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise StudyError("--scheduler needs dask.distributed: pip install "
                         "\"dask[distributed]\" (or the extra fixedsim[dist])") from None
    own = not isinstance(scheduler, Client)
    if own:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as err:
            raise StudyError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
    else:
        client = scheduler
    addr = scheduler if own else getattr(client.scheduler, "address", "client")
    futures = {}
    try:
        for run in todo:
            task = _task(run, study, out, resume, threads, f"dask:{addr}")
            fut = client.submit(execute_run, task, pure=False, retries=0,
                                key=f"fixedsim-run-{run.run_id}-{os.urandom(4).hex()}")
            futures[fut] = task
        for fut in as_completed(list(futures)):
            try:
                rec = fut.result()
            except Exception as err:  # KilledWorker, lost connections
                rec = _failed_record(futures[fut], err)
            finished(rec)
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        if own:
            client.close()
