"""Every shell example of README.md and docs/*.md runs and prints what the page says.

The ``>>>`` examples are doctests (tests/test_docs.py). Here each documented command line is
run through :func:`fixedsim.cli.main`, made cheap by appended options that the command line
has (``--train-size``, ``--test-size``, ``--epochs``, ``--sample``, ``--only``; a later option
wins over the documented one) or, for sweeps, on a copy of the study file with 1 epoch, a few
hundred images and one replicate; its printed output is checked. ``test_every_example_is_run``
fails when a page gains a command line that no scenario here runs.
"""

import pathlib
import re
import shlex

import pytest

from fixedsim.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"`(fixedsim [^`]*)`")
#: A synopsis, not an example: a placeholder (STUDY.toml, DIR, RUN_DIR, ...), [optional]
#: parts or an ellipsis.
SYNOPSIS = re.compile(r"\b[A-Z][A-Z_]+\b|\[|\.\.\.")

#: Command lines of the pages that the suite does not run, and why.
NOT_RUN = {
    "pytest": "the test suite itself",
    "fixedsim verify cpu": "the check of this CPU's matrix units against their models "
                           "(docs/hardware_cpu.md), tested with those models",
    # Pending: pages whose commands are tested with their own features; a scenario here
    # should replace each entry.
    "fixedsim verify hardware": "needs the measured tensor-core vectors (docs/hardware.md)",
    "fixedsim cost ": "the cost model's commands (docs/cost.md), new: no scenario yet",
}


def _norm(cmd: str) -> str:
    return " ".join(cmd.split("#", 1)[0].split())


def documented_commands() -> dict:
    """Command line -> the pages showing it: every ``fixedsim ...`` line (or ``&&`` part) of
    a fenced block, and every inline ``fixedsim ...`` with arguments; synopses left out."""
    found: dict = {}
    for page in PAGES:
        text = page.read_text()
        cmds = []
        for lang, body in FENCE.findall(text):
            if lang in ("python", "toml") or ">>>" in body:
                continue
            for line in body.replace("\\\n", " ").splitlines():  # join continued lines
                for part in line.split("&&"):
                    part = _norm(part)
                    if part.startswith(("fixedsim ", "pytest")) or part == "pytest":
                        cmds.append(part)
        for span in INLINE.findall(text):
            cmd = _norm(span)
            if len(cmd.split()) > 2:  # `fixedsim train` alone names the command
                cmds.append(cmd)
        for cmd in cmds:
            if not SYNOPSIS.search(cmd):
                found.setdefault(cmd, set()).add(page.name)
    return found


def _run(capsys, cmd: str, *extra) -> tuple:
    """Run a documented command line (with ``extra`` options appended); (status, out, err)."""
    args = shlex.split(cmd)[1:] + list(extra)  # as a shell splits it (quoted JSON options)
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


SMALL_TRAIN = ("--train-size", "256", "--test-size", "200", "--epochs", "1", "--quiet")

#: Scenario name -> the documented command lines it runs.
COVERS = {}


def covers(*cmds):
    def deco(fn):
        COVERS[fn.__name__] = set(cmds)
        return fn
    return deco


LENET_Q8 = ("fixedsim train --model lenet --policy fixed:16:8:stochastic --epochs 3 "
            "--batch-size 32 --lr 0.05 --schedule constant --out runs/lenet")
LENET_RESUME = "fixedsim train --resume runs/lenet --epochs 5"
LENET_Q14 = ("fixedsim train --model lenet --policy fixed:16:14:stochastic --epochs 3 "
             "--batch-size 32 --lr 0.05 --schedule constant")


@covers(LENET_Q8, LENET_RESUME)
def test_lenet_in_q16_8_learns_and_resumes(capsys, monkeypatch, tmp_path):
    """README / training.md: one run in Q<16,8> (256 images, 1 epoch instead of 10,000 and 3)
    learns without a warning; --resume with more epochs continues it (2 instead of 5)."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, LENET_Q8, *SMALL_TRAIN)
    assert rc == 0, err
    assert "done: final test accuracy 31.50%" in out and "run written to runs/lenet" in out
    assert "warning:" not in out
    rc, out, err = _run(capsys, LENET_RESUME, "--epochs", "2", "--quiet")
    assert rc == 0, err
    assert "--epochs 2 applied to the resumed run (it had 1)" in err
    assert "resuming runs/lenet after epoch 1" in out and "epoch 2/2:" in out


@covers(LENET_Q14)
def test_lenet_in_q16_14_saturates_and_says_so(capsys):
    """README / training.md: Q<16,14> holds [-2, 2); the run stays at chance and warns."""
    rc, out, err = _run(capsys, LENET_Q14, *SMALL_TRAIN)
    assert rc == 0, err
    assert "done: final test accuracy 11.50%" in out
    assert ("warning: test accuracy stayed at chance: best 11.50% over 1 epoch(s), chance is "
            "10.00% (1 of 10 classes)") in out


@covers("fixedsim warmup")
def test_warmup(capsys):
    """README: fixedsim warmup (one of its jobs, --only)."""
    rc, out, _ = _run(capsys, "fixedsim warmup", "--only",
                      "train mlp under fixed:16:8:stochastic")
    assert rc == 0
    assert out.startswith("fixedsim warmup: 1 job(s)")
    assert "[1/1] train mlp under fixed:16:8:stochastic: " in out and "done: compiled" in out


@covers("fixedsim verify --sample 20000000")
def test_verify_sample(capsys):
    """README: fixedsim verify --sample (100,000 inputs instead of 20 million)."""
    pytest.importorskip("ml_dtypes")
    rc, out, _ = _run(capsys, "fixedsim verify --sample 20000000", "--sample", "100000",
                      "--quiet")
    assert rc == 0
    assert "a seeded sample of 100,000 float32 inputs" in out
    assert "OK: every input agrees bit for bit" in out


def _small_study(src: pathlib.Path, dst: pathlib.Path, text=None) -> pathlib.Path:
    """A copy of a study file with 1 epoch, 256 images and one replicate."""
    text = src.read_text() if text is None else text
    text = re.sub(r"(?m)^epochs = \d+", "epochs = 1\ntrain_size = 256\ntest_size = 256", text)
    text = re.sub(r"(?m)^replicates = \d+", "replicates = 1", text)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return dst


@covers("fixedsim sweep studies/gupta2015/quick.toml --workers 2",
        "fixedsim report studies/gupta2015/results/quick")
def test_main_job(capsys, monkeypatch, tmp_path):
    """README's main job: the study file validates all 27 runs (--dry-run); a copy with one
    epoch of 256 images and one replicate (9 runs, in this process: --workers 1) runs, and
    the report prints its table."""
    study = ROOT / "studies/gupta2015/quick.toml"
    rc, out, _ = _run(capsys, f"fixedsim sweep {study}", "--dry-run")
    assert rc == 0 and "dry run: 27 run(s) validated" in out
    monkeypatch.chdir(tmp_path)
    _small_study(study, tmp_path / "studies/gupta2015/quick.toml")
    rc, out, err = _run(capsys, "fixedsim sweep studies/gupta2015/quick.toml --workers 2",
                        "--workers", "1", "--quiet")
    assert rc == 0, err
    assert "[9/9]" in out and "done: 9 run(s) now (0 failed)" in out
    rc, out, err = _run(capsys, "fixedsim report studies/gupta2015/results/quick",
                        "--no-figures")
    assert rc == 0
    assert out.startswith("# Sweep results: studies/gupta2015/results/quick")
    assert "| fixed:16:14:stochastic | 1/1 |" in out
    assert "wrote studies/gupta2015/results/quick/report.md" in err


def _sweeps_page_study(tmp_path) -> pathlib.Path:
    """The full example of docs/sweeps.md, made small: 1 epoch of 256 images, 16 hidden
    units, one replicate, the first two policies (2 policies x 2 learning rates)."""
    page = (ROOT / "docs/sweeps.md").read_text()
    toml = next(b for lang, b in FENCE.findall(page)
                if lang == "toml" and b.startswith("# studies/example/study.toml"))
    toml = toml.replace("hidden = [1000, 1000]", "hidden = [16]")
    toml = re.sub(r"policy = \[.*?\]", 'policy = ["float32", "fixed:16:8:nearest_even"]',
                  toml, count=1, flags=re.S)
    return _small_study(pathlib.Path(), tmp_path / "studies/example/study.toml", toml)


@covers("fixedsim sweep studies/example/study.toml --workers 2 --out out/example",
        "fixedsim sweep studies/example/study.toml --out out/example --resume",
        "fixedsim report out/example")
def test_sweeps_page_commands(capsys, monkeypatch, tmp_path):
    """docs/sweeps.md: run (in this process), resume (nothing left to do), report."""
    _sweeps_page_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "fixedsim sweep studies/example/study.toml --workers 2 --out "
                        "out/example", "--workers", "1", "--quiet")
    assert rc == 0, err
    assert out.startswith("study 'gupta-mlp': 4 run(s), study seed 2015")
    assert "done: 4 run(s) now (0 failed)" in out
    rc, out, _ = _run(capsys, "fixedsim sweep studies/example/study.toml --out out/example "
                      "--resume", "--quiet")
    assert rc == 0 and "0 run(s) now (0 failed), 4 skipped as already done" in out
    rc, out, _ = _run(capsys, "fixedsim report out/example", "--no-figures")
    assert rc == 0 and "| policy | train.lr | runs ok |" in out


def test_sweeps_page_python(capsys, monkeypatch, tmp_path):
    """docs/sweeps.md's Python example (workers=1 instead of 2: in this process)."""
    _sweeps_page_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs/sweeps.md").read_text()
    code = next(b for lang, b in FENCE.findall(page)
                if lang == "python" and "run_study(" in b and ">>>" not in b)
    assert "workers=2" in code
    exec(compile(code.replace("workers=2", "workers=1"), "docs/sweeps.md", "exec"), {})
    out = capsys.readouterr().out
    assert "study 'gupta-mlp': 4 run(s)" in out
    assert "True []" in out  # result.ok, result.failed
    assert "# Sweep results: out/example" in out


@covers("fixedsim sweep --dry-run")
def test_dry_run(capsys):
    """docs/sweeps.md: --dry-run validates and lists the runs of a study."""
    rc, out, _ = _run(capsys, f"fixedsim sweep {ROOT / 'studies/gupta2015/embedded.toml'}",
                      "--dry-run")
    assert rc == 0 and "no run was trained" in out


FLOAT32_DEFAULTS = "fixedsim train --model lenet --policy float32 --epochs 3"
FLOAT32_FULL = "fixedsim train --model lenet --policy float32 --data fashion-mnist --epochs 3"
CHAIN_RUN = ("fixedsim train --model lenet --policy float32:fma_chain --epochs 5 --batch-size 32 "
             "--lr 0.02 --schedule cosine:5")
CHAIN_FULL = ("fixedsim train --model lenet --policy float32:fma_chain --data fashion-mnist "
              "--epochs 3 --batch-size 32 --lr 0.02 --schedule cosine:3")


@covers(FLOAT32_DEFAULTS, CHAIN_RUN)
def test_training_page_float32_runs(capsys):
    """docs/training.md's float32 LeNet with the defaults, and the FMA-chain run (256 images,
    1 epoch instead of 10,000 and 3 or 5): the defaults are batch 16, SGD 0.02, cosine."""
    rc, out, err = _run(capsys, FLOAT32_DEFAULTS, *SMALL_TRAIN)
    assert rc == 0, err
    assert "lenet on embedded, 1 epoch(s), batch 16, sgd lr 0.02 (cosine), seed 0" in out
    assert "done: final test accuracy" in out
    rc, out, err = _run(capsys, CHAIN_RUN, *SMALL_TRAIN)
    assert rc == 0, err
    assert "lenet on embedded, 1 epoch(s), batch 32, sgd lr 0.02 (cosine:5)" in out
    assert "Policy 'float32_fma_chain'" in out and "done: final test accuracy" in out


@covers(FLOAT32_FULL, CHAIN_FULL)
def test_training_page_full_fashion_mnist(capsys):
    """docs/training.md's runs on the full Fashion-MNIST (256 of its images), where installed."""
    from fixedsim import data

    try:
        data.fashion_mnist()
    except (OSError, ValueError) as err:
        pytest.skip(f"the full Fashion-MNIST is not installed here: {err}")
    for line in (FLOAT32_FULL, CHAIN_FULL):
        rc, out, err = _run(capsys, line, *SMALL_TRAIN)
        assert rc == 0, err
        assert "lenet on fashion-mnist" in out and "done: final test accuracy" in out


@covers("fixedsim train --model-options '{\"kernel\": 4}' --rescale 2:3",
        "fixedsim train --model lenet --model-options '{\"kernel\": 4}' --epochs 2 --seed 1 "
        "--rescale 2:1")
def test_approx_page_kernel_rescaling(capsys):
    """docs/approx.md's kernel-rescaling runs (on 64 images): the switch to full resolution is
    announced after the low-resolution epochs."""
    small = ("--train-size", "64", "--test-size", "64", "--quiet")
    rc, out, err = _run(capsys, "fixedsim train --model-options '{\"kernel\": 4}' "
                        "--rescale 2:3", *small, "--epochs", "4")
    assert rc == 0, err
    assert "epoch 4: kernels rescaled by 2" in out
    rc, out, err = _run(capsys, "fixedsim train --model lenet --model-options "
                        "'{\"kernel\": 4}' --epochs 2 --seed 1 --rescale 2:1", *small)
    assert rc == 0, err
    assert "epoch 2: kernels rescaled by 2" in out and "done: final test accuracy" in out


def _first_epoch(run_dir):
    """The first epoch's row of a run's ``history.csv``, as text by column."""
    head, row = (run_dir / "history.csv").read_text().splitlines()[:2]
    return dict(zip(head.split(","), row.split(","), strict=True))


PARALLEL = ("fixedsim train --model lenet --train-size 2048 --epochs 2 --batch-size 64 "
            "--lr 0.05 --schedule constant --workers 4 --allreduce bf16")


@covers(PARALLEL)
def test_parallel_page_run(capsys, monkeypatch, tmp_path):
    """docs/parallel.md: LeNet over 4 emulated workers with a BF16 all-reduce (256 images,
    1 epoch instead of 2,048 and 2): it learns and its history counts the all-reduce."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, PARALLEL, *SMALL_TRAIN, "--out", "run")
    assert rc == 0, err
    assert "done: final test accuracy 28.00%" in out and "warning:" not in out
    h = _first_epoch(tmp_path / "run")
    assert int(h["allreduce.roundings"]) == 4 * 7 * 80202  # 4 steps, 4 casts + 3 additions
    assert int(h["allreduce.overflow"]) == 0 and int(h["allreduce.bytes_per_worker"]) > 0


#: Entries of the LeNet's Kronecker factors, A and G of each layer (A with the bias column):
#: conv 1x5x5 -> 16, conv 16x5x5 -> 32, Linear 512 -> 128, Linear 128 -> 10.
LENET_FACTORS = ((26 ** 2 + 16 ** 2) + (401 ** 2 + 32 ** 2) + (513 ** 2 + 128 ** 2)
                 + (129 ** 2 + 10 ** 2))
#: Entries of their upper triangles (what the all-reduce sends: n (n + 1) / 2 of n x n).
LENET_TRIANGLES = sum(n * (n + 1) // 2 for n in (26, 16, 401, 32, 513, 128, 129, 10))
KFAC_RUN = ("fixedsim train --model lenet --optimizer kfac --lr 0.01 --schedule constant "
            "--damping 0.1 --inv-interval 10 --stat-interval 10 --batch-size 256 --epochs 2")


@covers(KFAC_RUN)
def test_kfac_page_run(capsys, monkeypatch, tmp_path):
    """docs/kfac.md: LeNet with K-FAC, statistics on refresh steps (256 images in batches of
    64, 1 epoch, instead of 10,000 in batches of 256 and 2): it learns, and its history
    counts the roundings into the curvature roles."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, KFAC_RUN, *SMALL_TRAIN, "--batch-size", "64", "--out", "run")
    assert rc == 0, err
    assert "done: final test accuracy 25.50%" in out and "warning:" not in out
    h = _first_epoch(tmp_path / "run")
    assert int(h["curvature.roundings"]) == LENET_FACTORS  # one refresh: step 1
    assert int(h["inverse.roundings"]) == LENET_FACTORS
    assert int(h["preconditioned.roundings"]) == 4 * 80202  # 4 steps, every parameter


KFAC_WORKERS = ("fixedsim train --model lenet --optimizer kfac --lr 0.01 --schedule constant "
                "--damping 0.1 --inv-interval 2 --stat-interval 2 --batch-size 64 --workers 2 "
                "--allreduce bf16 --train-size 256 --test-size 200 --epochs 1")


@covers(KFAC_WORKERS)
def test_kfac_workers_page_run(capsys, monkeypatch, tmp_path):
    """docs/kfac.md: K-FAC over 2 emulated workers with a BF16 all-reduce, as documented:
    the printed accuracy, and the all-reduce counting the factors on the 2 statistics
    steps of 4 besides the gradients."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, KFAC_WORKERS, *SMALL_TRAIN, "--out", "run")
    assert rc == 0, err
    assert "done: final test accuracy 25.50%" in out and "warning:" not in out
    h = _first_epoch(tmp_path / "run")
    assert int(h["allreduce.roundings"]) == 3 * (4 * 80202 + 2 * LENET_TRIANGLES) == 2343342
    assert int(h["allreduce.bytes_per_worker"]) == 2 * (4 * 80202 + 2 * LENET_TRIANGLES)
    assert int(h["allreduce.inexact"]) == 1595316 and int(h["allreduce.overflow"]) == 0


@covers("fixedsim train --reuse L=25,H=8", "fixedsim train --count-steps")
def test_training_options(capsys, tmp_path):
    """docs/training.md, matmul.md, sweeps.md: --reuse and --count-steps (on 64 images)."""
    rc, out, err = _run(capsys, "fixedsim train --reuse L=25,H=8", "--train-size", "64",
                        "--test-size", "64", "--epochs", "1", "--quiet")
    assert rc == 0, err
    assert "done: final test accuracy" in out
    rc, out, err = _run(capsys, "fixedsim train --count-steps", "--model", "mlp",
                        "--train-size", "64", "--test-size", "64", "--epochs", "1", "--quiet",
                        "--policy", "fp16", "--out", str(tmp_path / "r"))
    assert rc == 0, err
    assert "products.accumulator.inexact" in (tmp_path / "r" / "counters.csv").read_text()


def test_testing_page_template():
    """docs/testing.md's template test, with a cast that is right (fs.quantize)."""
    import numpy as np

    import fixedsim as fs

    page = (ROOT / "docs/testing.md").read_text()
    code = next(b for lang, b in FENCE.findall(page) if lang == "python" and "my_cast" in b)
    ns = {"my_cast": lambda x: float(fs.quantize(np.float64(x), fs.FP8_E4M3))}
    exec(compile(code, "docs/testing.md", "exec"), ns)
    ns["test_my_cast"]()


def test_every_example_is_run():
    """Every command line of the pages is run by a scenario above, or listed in NOT_RUN with
    the reason."""
    run = set().union(*COVERS.values())
    missing = {cmd: pages for cmd, pages in documented_commands().items()
               if cmd not in run and not any(cmd.startswith(k) for k in NOT_RUN)}
    assert not missing, f"examples no test runs: {missing}"


@pytest.mark.parametrize("cmd", sorted(set().union(*COVERS.values())))
def test_scenarios_cover_commands_that_are_documented(cmd):
    assert cmd in documented_commands(), f"{cmd!r} is no longer in the pages"

