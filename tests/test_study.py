"""Study files, the sweep runner (local processes, in-process, Dask), resume, and reports."""

import csv
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fixedsim.cli import main
from fixedsim.nn import Policy
from fixedsim.study import (
    StudyError,
    derive_seed,
    load_study,
    parse_study,
    report,
    run_id_of,
    run_study,
    shared_seed,
)

TRAIN = """
[train]
model = "mlp"
model_options = { hidden = [8] }
data = "synthetic"
train_size = 96
test_size = 48
epochs = 1
batch_size = 32
max_loss = 20
"""

POLICIES = ('["float32", "fixed:16:8:nearest_even", "fixed:16:10:nearest_even", '
            '"fixed:16:8:stochastic", "fixed:16:10:stochastic"]')


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def quiet(line):
    pass


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- validation -----------------------------------------------------------------------------
BAD = [
    ("[study]\nnme = 'x'\n" + TRAIN, ["study.nme", "unknown key"]),
    ("colour = 1\n" + TRAIN, ["'colour'", "top level"]),
    (TRAIN + "lr = 'fast'\n", ["train.lr", "expected a number", "'fast'"]),
    (TRAIN.replace("epochs = 1", "epochs = 1.5"), ["train.epochs", "expected an integer"]),
    (TRAIN + "lrr = 0.1\n", ["train.lrr", "unknown training setting"]),
    (TRAIN + "seed = 3\n", ["train.seed", "study.seed"]),
    (TRAIN + "optimizer = 'rmsprop'\n", ["optimizer", "rmsprop"]),
    (TRAIN + "[grid]\n", ["grid", "empty"]),
    (TRAIN + '[grid]\n"train.lr" = []\n', ["grid.train.lr", "empty list"]),
    (TRAIN + '[grid]\n"train.lr" = 0.1\n', ["grid.train.lr", "must be a list"]),
    (TRAIN + '[grid]\nmodel = ["mlp"]\n', ["grid.model", "unknown axis"]),
    (TRAIN + '[grid]\n"train.lr" = [0.1, 0.1]\n', ["grid.train.lr", "twice"]),
    ('policy = "fixed:99:2"\n' + TRAIN, ["policy", "fixed:99:2", "word_length"]),
    ('policy = "fp7"\n' + TRAIN, ["policy", "fp7"]),
    (TRAIN + '[policy.weights]\nformat = "Q<0,1>"\n', ["policy.weights", "Q<0,1>"]),
    (TRAIN + '[grid]\npolicy = ["float32", "fixed:99:2"]\n', ["grid.policy", "fixed:99:2"]),
    (TRAIN + '[policy_overrides]\n"weights.roundin" = "stochastic"\n',
     ["weights.roundin", "roundin"]),
    (TRAIN + '[grid]\n"policy.weights.rounding" = ["nearest_even", "sideways"]\n',
     ["grid.policy.weights.rounding", "sideways"]),
    (TRAIN + '[grid]\npolicy = ["fp32", "float32"]\n', ["same configuration"]),
    ("[study]\nseed = -1\n" + TRAIN, ["study.seed"]),
    ("[study]\nreplicates = 2\n" + TRAIN + "[grid]\nreplicate = [0, 1]\n",
     ["study.replicates", "not both"]),
]


@pytest.mark.parametrize("text,needles", BAD, ids=[n[0] for _, n in BAD])
def test_bad_study_is_rejected_naming_file_and_key(tmp_path, text, needles):
    path = write(tmp_path, text, "bad_study.toml")
    with pytest.raises(StudyError) as info:
        load_study(path)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(write(tmp_path, "[train\nlr = 1"))
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "nope.toml")


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    path = write(tmp_path, TRAIN.replace('"synthetic"', '"no/such/folder"'))
    with pytest.raises(StudyError) as info:
        load_study(path)
    msg = str(info.value)
    assert "train.data" in msg and str(tmp_path / "no" / "such" / "folder") in msg
    assert "train-images-idx3-ubyte" in msg
    import fixedsim.data.loaders as loaders

    monkeypatch.setattr(loaders, "FASHION_MNIST_DIR", tmp_path / "fmnist")
    with pytest.raises(StudyError, match="apt-get install dataset-fashion-mnist"):
        load_study(write(tmp_path, TRAIN.replace('"synthetic"', '"fashion-mnist"'), "f.toml"))


def test_bad_model_options_caught_before_running(tmp_path):
    path = write(tmp_path, TRAIN.replace("hidden = [8]", "hiden = [8]"))
    with pytest.raises(StudyError, match="model_options"):
        load_study(path)


def test_rescale_the_model_cannot_take_caught_before_running(tmp_path):
    """A kernel rescaling the model does not scale by (LeNet's 5x5 kernels by 2) is refused
    when the study loads, naming the grid point, not when its run starts; 4x4 kernels pass."""
    lenet = TRAIN.replace('model = "mlp"\nmodel_options = { hidden = [8] }',
                          'model = "lenet"')
    path = write(tmp_path, lenet + '[grid]\n"train.rescale" = ["", "2:1"]\n')
    with pytest.raises(StudyError) as info:
        load_study(path)
    msg = str(info.value)
    assert "train.rescale = '2:1'" in msg and "does not scale by 2" in msg, msg
    ok = lenet.replace('model = "lenet"', 'model = "lenet"\nmodel_options = { kernel = 4 }')
    assert len(load_study(write(tmp_path, ok + '[grid]\n"train.rescale" = ["", "2:1"]\n',
                                "ok.toml")).runs) == 2


def test_cli_rejects_bad_study_and_runs_nothing(tmp_path, capsys):
    path = write(tmp_path, TRAIN + '[grid]\npolicy = ["float32", "fixed:99:2"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fixedsim sweep: error:" in err and "fixed:99:2" in err and str(path) in err
    assert not out.exists()


# -- grid and run ids -----------------------------------------------------------------------
def test_grid_expansion_order_labels_and_seeds(tmp_path):
    text = ("[study]\nseed = 5\nreplicates = 2\n" + TRAIN
            + '[grid]\npolicy = ["float32", "fixed:16:8:stochastic"]\n'
              '"train.lr" = [0.01, 0.1]\n"train.model_options.hidden" = [[8], [4, 4]]\n')
    study = load_study(write(tmp_path, text), check_data=False)
    assert len(study.runs) == 2 * 2 * 2 * 2
    assert list(study.axes) == ["policy", "train.lr", "train.model_options.hidden", "replicate"]
    first, last = study.runs[0], study.runs[-1]
    assert first.axes == {"policy": "float32", "train.lr": 0.01,
                          "train.model_options.hidden": "[8]", "replicate": 0}
    assert last.axes["policy"] == "fixed:16:8:stochastic" and last.replicate == 1
    assert last.train["model_options"] == {"hidden": [4, 4]} and last.train["lr"] == 0.1
    assert last.policy == Policy.fixed(16, 8, "stochastic").to_dict()
    ids = [r.run_id for r in study.runs]
    assert len(set(ids)) == len(ids) and all(len(i) == 12 for i in ids)
    assert all(r.seed == derive_seed(5, r.run_id) == r.train["seed"] for r in study.runs)
    assert study.runs[0].seed != study.runs[1].seed  # replicates differ
    assert [r.index for r in study.runs] == list(range(16))
    # nested tables in [grid] mean the same as dotted keys
    text2 = text.replace('"train.lr" = [0.01, 0.1]', "").replace(
        '"train.model_options.hidden" = [[8], [4, 4]]\n', "") + \
        '[grid.train]\nlr = [0.01, 0.1]\nmodel_options.hidden = [[8], [4, 4]]\n'
    assert [r.run_id for r in load_study(write(tmp_path, text2, "b.toml"),
                                         check_data=False).runs] == ids


def test_shared_seeds_pair_the_grid_points_of_a_replicate(tmp_path):
    text = ("[study]\nseed = 5\nreplicates = 2\n" + TRAIN
            + '[grid]\npolicy = ["float32", "fixed:16:8:stochastic"]\n')
    per_run = load_study(write(tmp_path, text), check_data=False)
    shared = load_study(write(tmp_path, text.replace("seed = 5\n", 'seed = 5\nseeds = "shared"\n'),
                              "b.toml"), check_data=False)
    assert shared.seeds == "shared" and per_run.seeds == "per_run"
    by_rep = {}
    for r in shared.runs:
        assert r.seed == shared_seed(5, r.replicate) == r.train["seed"]
        by_rep.setdefault(r.replicate, set()).add(r.seed)
    assert [len(v) for v in by_rep.values()] == [1, 1]  # every policy of a replicate: one seed
    assert by_rep[0] != by_rep[1]  # replicates differ
    # the seeding is part of the identity: the same points get other ids (and seeds) ...
    assert not {r.run_id for r in shared.runs} & {r.run_id for r in per_run.runs}
    assert all(r.run_id == run_id_of(r.identity) for r in shared.runs + per_run.runs)
    assert all(r.identity["seeds"] == "shared" for r in shared.runs)
    # ... while a per-run study spelling the default keeps the ids it always had
    spelled = text.replace("seed = 5\n", 'seed = 5\nseeds = "per_run"\n')
    default = load_study(write(tmp_path, spelled, "c.toml"), check_data=False)
    assert [r.run_id for r in default.runs] == [r.run_id for r in per_run.runs]
    assert all("seeds" not in r.identity for r in per_run.runs)
    # a shared seed never coincides with a derived one (the run ids stay below 2**48)
    assert shared_seed(5, 0) != derive_seed(5, "0" * 12)
    with pytest.raises(StudyError, match=r"study.seeds: expected one of 'per_run', 'shared', "
                                         r"got 'paired'"):
        parse_study({"study": {"seeds": "paired"}})


def test_run_ids_are_stable_and_order_free(tmp_path):
    a = 'policy = "fixed:16:14:stochastic"\n[study]\nseed = 1\n' + TRAIN
    # same settings, keys reordered, the policy as the equivalent table, lr as an int-valued
    # float, a default value stated explicitly
    lines = TRAIN.strip().splitlines()
    b = ("[study]\nseed = 1\n\n" + "\n".join([lines[0]] + lines[:0:-1])
         + "\nmomentum = 0.9\n\n" + _toml_policy(Policy.fixed(16, 14, "stochastic")))
    ra = load_study(write(tmp_path, a, "a.toml"), check_data=False).runs
    rb = load_study(write(tmp_path, b, "b.toml"), check_data=False).runs
    assert ra[0].run_id == rb[0].run_id and ra[0].seed == rb[0].seed
    again = load_study(write(tmp_path, a, "c.toml"), check_data=False).runs
    assert again[0].run_id == ra[0].run_id
    other = load_study(write(tmp_path, a.replace("seed = 1", "seed = 2"), "d.toml"),
                       check_data=False).runs
    assert other[0].run_id != ra[0].run_id and other[0].seed != ra[0].seed
    lr = load_study(write(tmp_path, a + "lr = 0.06\n", "e.toml"), check_data=False).runs
    assert lr[0].run_id != ra[0].run_id


def test_committed_results_keep_their_run_ids():
    """A training option added to TrainConfig enters a run's identity only when set
    (IDENTITY_TRAIN_FIELDS): the committed results of a study keep the ids its TOML gives,
    so a rerun with --resume finds them."""
    root = pathlib.Path(__file__).resolve().parent.parent / "studies" / "tensor_cores"
    with open(root / "results-3seeds" / "results.csv", newline="") as f:
        committed = sorted(row["run_id"] for row in csv.DictReader(f))
    study = load_study(root / "study.toml", check_data=False)
    assert len(committed) == 36
    assert sorted(r.run_id for r in study.runs) == committed


def test_a_later_training_option_is_hashed_only_when_set(tmp_path):
    from fixedsim.nn.train import TrainConfig
    from fixedsim.study.spec import IDENTITY_TRAIN_FIELDS

    later = {f.name for f in dataclasses.fields(TrainConfig)} - IDENTITY_TRAIN_FIELDS - {"seed"}
    assert "approx" in later
    base = load_study(write(tmp_path, TRAIN, "a.toml"), check_data=False).runs[0]
    assert all(k not in base.identity["train"] for k in later)
    assert all(k in base.identity["train"] for k in IDENTITY_TRAIN_FIELDS)
    stated = load_study(write(tmp_path, TRAIN + 'approx = ""\n', "b.toml"),
                        check_data=False).runs[0]
    assert stated.run_id == base.run_id  # the default, stated
    sampled = load_study(write(tmp_path, TRAIN + 'approx = "crs:0.5:forward"\n', "c.toml"),
                         check_data=False).runs[0]
    assert sampled.run_id != base.run_id
    assert sampled.identity["train"]["approx"] == "crs:0.5:forward"


def _toml_policy(p):
    from fixedsim.nn.policy import _to_toml

    text = _to_toml(p.to_dict())
    out = []
    for line in text.splitlines():  # nest the policy's tables under [policy]
        out.append(line.replace("[", "[policy.", 1) if line.startswith("[") else line)
    return "[policy]\n" + "\n".join(out) + "\n"


def test_policy_overrides_and_policy_axes(tmp_path):
    text = ('policy = "float32"\n' + TRAIN
            + '[policy_overrides]\n"update.rounding" = "toward_zero"\n'
              '[grid]\n"policy.weights.rounding" = ["nearest_even", "stochastic"]\n')
    runs = load_study(write(tmp_path, text), check_data=False).runs
    assert [r.policy["weights"]["rounding"] for r in runs] == ["nearest_even", "stochastic"]
    assert all(r.policy["update"]["rounding"] == "toward_zero" for r in runs)
    assert runs[1].policy["name"].startswith("float32 +")
    assert "weights.rounding=stochastic" in runs[1].policy["name"]
    # an inline policy table as an axis value is labelled by its name
    text = (TRAIN + '[grid]\npolicy = ["float32", {name = "q8", weights = {format = '
            '"Q<8,6>", rounding = "stochastic"}}]\n')
    runs = load_study(write(tmp_path, text, "b.toml"), check_data=False).runs
    assert runs[1].axes["policy"] == "q8" and runs[1].policy["weights"]["format"] == "Q<8,6>"
    # a policy file relative to the study file
    (tmp_path / "pols").mkdir()
    Policy.fixed(12, 8, "nearest_even").save(tmp_path / "pols" / "p.toml")
    runs = load_study(write(tmp_path, 'policy = "pols/p.toml"\n' + TRAIN, "c.toml"),
                      check_data=False).runs
    assert runs[0].policy == Policy.fixed(12, 8, "nearest_even").to_dict()


# -- running --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    path = write(d, "[study]\nname = 'tiny'\nseed = 7\nreplicates = 2\n" + TRAIN
                 + f"[grid]\npolicy = {POLICIES}\n")
    study = load_study(path)
    t0 = time.perf_counter()
    res = run_study(study, d / "out2", workers=2, progress=False, log=quiet)
    return study, res, time.perf_counter() - t0


def test_local_sweep_two_workers(tiny):
    study, res, _ = tiny
    assert res.ok and not res.failed and not res.skipped
    assert sorted(res.ran) == sorted(r.run_id for r in study.runs)
    rows = read_csv(res.out / "results.csv")
    assert [r["run_id"] for r in rows] == [r.run_id for r in study.runs]
    by_id = {r.run_id: r for r in study.runs}
    for row in rows:
        run = by_id[row["run_id"]]
        assert row["status"] == "ok" and row["error"] == ""
        assert row["policy"] == run.axes["policy"] and row["replicate"] == str(run.replicate)
        assert 0 <= float(row["final_test_acc"]) <= float(row["best_test_acc"]) <= 1
        for col in ("final_test_loss", "seconds", "wall_seconds", "fixedsim_version",
                    "machine", "python", "numba", "started", "finished"):
            assert row[col] != "", col
        assert row["numba_threads"] == "1" and row["blas_threads"] == "1"
        assert row["executor"] == "process-pool" and row["seed"] == str(run.seed)
        config = json.loads(row["config"])
        assert config["train"] == run.train and config["policy"] == run.policy
        assert (res.out / "runs" / run.run_id / "history.csv").is_file()
        assert json.loads((res.out / "results" / f"{run.run_id}.json").read_text())[
            "run_id"] == run.run_id
    fixed = [r for r in rows if r["policy"].startswith("fixed")]
    assert {(r["word_length"], r["frac_length"]) for r in fixed} == {("16", "8"), ("16", "10")}
    hist = read_csv(res.out / "histories.csv")
    assert sorted(h["run_id"] for h in hist) == sorted(by_id)
    assert {"epoch", "test_acc", "train_loss"} <= set(hist[0])


def test_out_with_results_needs_resume(tiny):
    study, res, _ = tiny
    with pytest.raises(StudyError, match="--resume"):
        run_study(study, res.out, workers=1, progress=False, log=quiet)


def test_resume_adds_seeds_to_a_table_only_folder(tiny, tmp_path):
    """A folder kept as its results.csv and the runs' histories (as the studies commit them,
    without results/*.json): a resumed sweep of the study with more replicates adopts the
    table's runs, runs only the new replicates, and rewrites the table with every run, the
    adopted rows as they were."""
    import shutil

    study, res, _ = tiny
    old = [r for r in study.runs if r.replicate == 0]
    kept = tmp_path / "kept"
    (kept / "runs").mkdir(parents=True)
    rows = read_csv(res.out / "results.csv")
    header = (res.out / "results.csv").read_text().splitlines()[0]
    with open(kept / "results.csv", "w") as f:  # the replicate-0 rows only
        f.write(header + "\n")
        for line in (res.out / "results.csv").read_text().splitlines()[1:]:
            if line.split(",")[0] in {r.run_id for r in old}:
                f.write(line + "\n")
    for r in old:
        (kept / "runs" / r.run_id).mkdir()
        shutil.copy(res.out / "runs" / r.run_id / "history.csv", kept / "runs" / r.run_id)
    with pytest.raises(StudyError, match="--resume"):  # still refused without --resume
        run_study(study, kept, workers=1, progress=False, log=quiet)
    again = run_study(study, kept, workers=1, resume=True, progress=False, log=quiet)
    assert sorted(again.skipped) == sorted(r.run_id for r in old)
    assert sorted(again.ran) == sorted(r.run_id for r in study.runs if r.replicate == 1)
    assert (kept / "results.csv").read_text().splitlines()[0] == header
    new_rows = {r["run_id"]: r for r in read_csv(kept / "results.csv")}
    assert sorted(new_rows) == sorted(r.run_id for r in study.runs)
    for row in rows:  # every row as the first sweep wrote it, the new ones rerun the same
        assert new_rows[row["run_id"]]["final_test_acc"] == row["final_test_acc"]
        if row["run_id"] in {r.run_id for r in old}:
            assert new_rows[row["run_id"]] == row


def _subset(study, n):
    return dataclasses.replace(study, runs=study.runs[:n])


def test_results_do_not_depend_on_scheduling(tiny, tmp_path):
    study, res, _ = tiny
    sub = _subset(study, 4)
    one = run_study(sub, tmp_path / "one", workers=1, progress=False, log=quiet)
    ref = {r["run_id"]: r for r in res.records}
    assert [r["executor"] for r in one.records] == ["in-process"] * 4
    for r in one.records:
        assert r["final_test_acc"] == ref[r["run_id"]]["final_test_acc"]
        assert r["history"][-1]["test_loss"] == ref[r["run_id"]]["history"][-1]["test_loss"]


def test_dask_local_cluster_matches_local(tiny, tmp_path):
    distributed = pytest.importorskip("distributed")
    study, res, _ = tiny
    sub = _subset(study, 4)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        got = run_study(sub, tmp_path / "dask", scheduler=cluster.scheduler_address,
                        progress=False, log=quiet)
    ref = {r["run_id"]: r for r in res.records}
    assert got.ok and len(got.records) == 4
    for r in got.records:
        assert r["executor"].startswith("dask:")
        assert r["final_test_acc"] == ref[r["run_id"]]["final_test_acc"]
    assert len(read_csv(tmp_path / "dask" / "results.csv")) == 4


def test_failed_run_is_recorded_and_others_finish(tmp_path, capsys):
    path = write(tmp_path, TRAIN + '[grid]\n"train.lr" = [1e6, 0.05]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--workers", "1", "--out", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "FAILED" in text and "TrainingDiverged" in text and "final test acc" in text
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error_type"] == "TrainingDiverged" and "diverged" in rows[0]["error"]
    assert rows[0]["final_test_acc"] == "" and rows[1]["final_test_acc"] != ""
    assert rows[0]["train.lr"] == "1000000.0"
    # the report lists the failure
    rep = report(out, figures=False)
    assert "Failed runs" in rep.markdown and "TrainingDiverged" in rep.markdown


def test_resume_after_kill(tmp_path):
    n = 6
    path = write(tmp_path, TRAIN.replace("train_size = 96", "train_size = 320")
                 + '[grid]\n"train.lr" = [0.01, 0.02, 0.03]\nreplicate = [0, 1]\n')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fixedsim.cli", "sweep", str(path),
                             "--workers", "2", "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((out / "results").glob("*.json")) if (out / "results").is_dir() else False:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker processes
        proc.wait()
    done = sorted(p.stem for p in (out / "results").glob("*.json"))
    assert 1 <= len(done) < n, "the sweep was not killed partway through"
    for p in (out / "results").glob("*.json"):  # only whole records
        assert json.loads(p.read_text())["status"] == "ok"
    stamps = {rid: ((out / "results" / f"{rid}.json").stat().st_mtime_ns,
                    (out / "runs" / rid / "run.json").stat().st_mtime_ns) for rid in done}
    study = load_study(path)
    res = run_study(study, out, workers=1, resume=True, progress=False, log=quiet)
    assert sorted(res.skipped) == done
    assert sorted(res.ran) == sorted(set(r.run_id for r in study.runs) - set(done))
    for rid in done:  # not run again
        assert stamps[rid] == ((out / "results" / f"{rid}.json").stat().st_mtime_ns,
                               (out / "runs" / rid / "run.json").stat().st_mtime_ns)
    rows = read_csv(out / "results.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in study.runs)
    assert all(r["status"] == "ok" for r in rows)
    hist = read_csv(out / "histories.csv")
    assert sorted(h["run_id"] for h in hist) == sorted(r.run_id for r in study.runs)
    # a second resume has nothing to do
    again = run_study(study, out, workers=1, resume=True, progress=False, log=quiet)
    assert again.ran == [] and len(again.skipped) == n


def test_unfinished_run_continues_from_its_checkpoint(tmp_path):
    from fixedsim.nn.train import train

    path = write(tmp_path, TRAIN.replace("epochs = 1", "epochs = 2"))
    study = load_study(path)
    run = study.runs[0]
    fresh = run_study(study, tmp_path / "fresh", workers=1, progress=False, log=quiet)
    out = tmp_path / "out"
    train(run.config(), run.make_policy(), out / "runs" / run.run_id, progress=False,
          stop_after_epoch=1)  # as if killed after epoch 1
    res = run_study(study, out, workers=1, resume=True, progress=False, log=quiet)
    rec, ref = res.records[0], fresh.records[0]
    assert rec["resumed_from_epoch"] == 1 and ref["resumed_from_epoch"] is None
    assert rec["epochs_done"] == 2
    assert rec["final_test_acc"] == ref["final_test_acc"]
    assert rec["history"][-1]["test_loss"] == ref["history"][-1]["test_loss"]


def test_report_tables_and_figures(tiny, capsys):
    study, res, _ = tiny
    rep = report(res.out)
    assert (res.out / "report.md").read_text() == rep.markdown
    for pol in ("float32", "fixed:16:8:nearest_even", "fixed:16:10:stochastic"):
        assert f"| {pol} | 2/2 |" in rep.markdown
    assert " ± " in rep.markdown
    rows = read_csv(res.out / "summary.csv")
    assert len(rows) == 5 and all(r["n_ok"] == "2" for r in rows)
    assert rows[0]["final_test_acc_std"] != ""
    names = {p.name for p in rep.figures}
    for stem in ("test_error_vs_epoch", "final_test_error_vs_frac_length",
                 "final_test_acc_vs_policy"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for p in rep.figures:
        assert p.is_file() and p.stat().st_size > 1000
    assert main(["report", str(res.out), "--x", "frac_length", "--hue", "rounding",
                 "--metric", "final_test_error", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("policy,n_runs,n_ok,n_failed")
    assert (res.out / "figures" / "final_test_error_vs_frac_length.pdf").is_file()
    with pytest.raises(StudyError, match="--x 'nope'"):
        report(res.out, x="nope")
    with pytest.raises(StudyError, match="unknown metric"):
        report(res.out, metric="accuracy")


def test_dry_run_lists_runs(tiny, capsys):
    study, _, _ = tiny
    assert main(["sweep", str(study.path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(r.run_id in out for r in study.runs) and "no run was trained" in out


def test_parse_study_from_dict():
    study = parse_study({"train": {"model": "mlp", "epochs": 1},
                         "grid": {"train": {"lr": [0.1, 0.2]}}})
    assert [r.axes["train.lr"] for r in study.runs] == [0.1, 0.2]
    assert study.default_out().name == "study"


def test_docs_example_is_a_valid_study(tmp_path):
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "sweeps.md"
    toml = re.search(r"```toml\n(.*?)```", page.read_text(), re.S).group(1)
    study = load_study(write(tmp_path, toml), check_data=False)
    assert len(study.runs) == 9 * 2 * 3 and study.name == "gupta-mlp"
    assert study.runs[0].train["model_options"] == {"hidden": [1000, 1000]}
    assert all(r.policy["momentum"]["rounding"] == "nearest_even" for r in study.runs)


def test_count_steps_is_a_study_setting_outside_run_identity():
    base = {"train": {"model": "mlp", "epochs": 1}, "grid": {"train": {"lr": [0.1, 0.2]}}}
    plain = parse_study(base)
    counted = parse_study({**base, "study": {"count_steps": True}})
    assert not plain.count_steps and counted.count_steps
    assert [r.run_id for r in plain.runs] == [r.run_id for r in counted.runs]
    with pytest.raises(StudyError, match=r"study.count_steps: expected true or false, got 'yes'"):
        parse_study({**base, "study": {"count_steps": "yes"}})


def test_dry_run_estimates_each_run_and_the_sweep(tmp_path, capsys):
    """--dry-run --estimate: each run's expected seconds from fixedsim's cost model, the
    profiles measured once per model and policy (two runs of a replicate share them), the
    sweep's total and its wall time over the workers; --no-estimate leaves it out."""
    path = write(tmp_path, "[study]\nreplicates = 2\n" + TRAIN
                 + '[grid]\npolicy = ["float32", "fixed:16:8:nearest_even"]\n')
    study = load_study(path)
    assert main(["sweep", str(path), "--dry-run", "--estimate", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip().endswith("per epoch)")]
    assert len(lines) == len(study.runs) == 4
    secs = [float(ln.split()[1]) for ln in lines]
    assert all(s >= 0 for s in secs)
    assert "expected:" in out and "with 2 worker(s)" in out and "no run was trained" in out
    assert main(["sweep", str(path), "--dry-run", "--no-estimate"]) == 0
    assert "expected" not in capsys.readouterr().out


def test_expect_run_measures_once_per_model_and_policy():
    from fixedsim.cost.selfmodel import expect_run
    from fixedsim.data import load
    from fixedsim.nn.train import TrainConfig

    config = TrainConfig(model="mlp", model_options={"hidden": [8]}, data="synthetic",
                         train_size=96, test_size=48, epochs=3, batch_size=32)
    ds, cache = load("synthetic"), {}
    first = expect_run(config, Policy.float32(), ds, cache=cache)
    again = expect_run(config, Policy.float32(), ds, cache=cache, epochs=1)
    assert len(cache) == 1 and first["measure_s"] > 0 and again["measure_s"] == 0
    assert first["epoch_s"] == again["epoch_s"] > 0
    assert first["run_s"] == 3 * first["epoch_s"] and again["run_s"] == again["epoch_s"]
    expect_run(config, Policy.fixed(16, 8), ds, cache=cache)
    assert len(cache) == 2
