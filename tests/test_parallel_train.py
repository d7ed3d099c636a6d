"""Emulated data-parallel training: shards, the all-reduce in the step, counters, resume."""

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.cli import main
from fixedsim.nn import Context, Policy, SoftmaxCrossEntropy
from fixedsim.nn.parallel import AllReduce, data_parallel_pass, ring_allreduce
from fixedsim.nn.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny():
    return fdata.synthetic(n_train=96, n_test=48, shape=(1, 8, 8), classes=4, seed=3)


def _config(**kw):
    base = dict(model="mlp", model_options={"hidden": [12]}, epochs=2, batch_size=32, lr=0.1,
                seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _params(result):
    return {k: p.value.copy() for k, p in result.model.named_parameters().items()}


def _same_params(a, b):
    pa, pb = _params(a), _params(b)
    return all(pa[k].dtype == pb[k].dtype and pa[k].tobytes() == pb[k].tobytes() for k in pa)


def _history(h):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]


def test_default_is_the_run_of_old(tiny):
    """workers=1 without a communication format takes the single-process step; through the
    all-reduce path with one worker and float64 sums (deterministic policy) every bit is the
    same too: shard = batch, loss gradient over the same B, a one-worker ring is a copy."""
    pol = Policy.float32()
    old = train(_config(), pol, progress=False, data=tiny)
    assert TrainConfig().workers == 1 and TrainConfig().allreduce == ""
    one = train(_config(allreduce="float64"), pol, progress=False, data=tiny)
    assert _same_params(old, one)
    assert [r["train_loss"] for r in old.history] == [r["train_loss"] for r in one.history]
    assert "allreduce.bytes_per_worker" not in old.history[0]
    assert one.history[0]["allreduce.bytes_per_worker"] == 0


def test_gradient_is_the_global_mean(tiny):
    """The sum of the workers' shard gradients (each over the global B) is the batch's
    gradient: equal to one worker's up to float32 rounding (a missing 1/N would double it)."""
    pol = Policy.float32()
    x, y = tiny.x_train[:32], tiny.y_train[:32]
    grads = []
    for workers in (1, 4):
        model = fs.nn.build("mlp", seed=1, in_shape=x.shape[1:], classes=4, hidden=[12])
        ctx = Context(pol, seed=0, step=0)
        data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, workers, AllReduce())
        grads.append({k: p.grad for k, p in model.named_parameters().items()})
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
        assert np.abs(grads[0][k]).max() > 1e-3


def test_step_gradient_is_the_ring_of_the_shard_gradients(tiny):
    """The parameter's grad after the pass is ring_allreduce of what each worker computed
    alone on its shard, in the communication format, seeded by the step's key."""
    pol = Policy.float32()
    x, y = tiny.x_train[:32], tiny.y_train[:32]
    ar = AllReduce(fs.BF16, fs.Rounding.STOCHASTIC)
    model = fs.nn.build("mlp", seed=1, in_shape=x.shape[1:], classes=4, hidden=[12])
    ctx = Context(pol, seed=4, step=7)
    data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, 2, ar)
    got = {k: p.grad for k, p in model.named_parameters().items()}
    shard = []
    for w in range(2):
        m = fs.nn.build("mlp", seed=1, in_shape=x.shape[1:], classes=4, hidden=[12])
        lf = SoftmaxCrossEntropy()
        wctx = fs.nn.parallel.WorkerContext(pol, seed=4, step=7, worker=w)
        lf(m.forward(x[16 * w:16 * (w + 1)], wctx), y[16 * w:16 * (w + 1)], wctx)
        m.backward(lf.backward(wctx, 1.0, batch=32), wctx)
        shard.append({k: p.grad for k, p in m.named_parameters().items()})
    for k in got:
        want, _ = ring_allreduce([s[k] for s in shard], fs.BF16, "stochastic",
                                 seed=ctx.key(k, "allreduce"))
        assert got[k].tobytes() == want.tobytes(), k
    roles = ctx.counters["1.linear"].roles  # 2 casts and 1 addition per element
    assert roles["allreduce"].roundings == 3 * model.layers[1].weight.value.size + 3 * 12


def _worker_in_process(args):
    """A worker's gradients, computed in another process (spawned: a fresh interpreter)."""
    from fixedsim.nn.parallel import worker_pass

    model, x, y, policy, w, b = args
    grads, _, _, _ = worker_pass(model, SoftmaxCrossEntropy(), x, y, policy, seed=4, step=7,
                                 worker=w, batch=b)
    return grads


def test_workers_in_other_processes_give_the_same_bits(tiny):
    """The workers' passes run in a spawned process pool (two processes for four workers),
    then the ring: every gradient bit for bit as in the one-process step (stochastic policy
    and stochastic all-reduce)."""
    import concurrent.futures as cf
    import multiprocessing
    import pickle

    pol = Policy.fixed(16, 12, "stochastic")
    x, y = tiny.x_train[:32], tiny.y_train[:32]
    model = fs.nn.build("mlp", seed=1, in_shape=x.shape[1:], classes=4, hidden=[12])
    frozen = pickle.dumps(model)
    ar = AllReduce(fs.FixedFormat(16, 12), fs.Rounding.STOCHASTIC)
    ctx = Context(pol, seed=4, step=7)
    data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, 4, ar)
    jobs = [(pickle.loads(frozen), x[8 * w:8 * (w + 1)], y[8 * w:8 * (w + 1)], pol, w, 32)
            for w in range(4)]
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        shards = list(pool.map(_worker_in_process, jobs))
    for name, p in model.named_parameters().items():
        want, _ = ar.reduce([g[name] for g in shards], seed=ctx.key(name, "allreduce"))
        assert p.grad.tobytes() == want.tobytes(), name


def test_batchnorm_statistics_per_shard():
    """Each worker normalises by its shard's statistics; the running statistics kept are
    worker 0's."""
    pol = Policy.float32()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 4, 4)) * np.array([1, 5, 9]).reshape(1, 3, 1, 1) + 3
    y = rng.integers(0, 4, 8)
    kw = dict(in_shape=(3, 4, 4), classes=4, channels=[2], hidden=6)
    model = fs.nn.build("cifarnet", seed=2, **kw)
    logits, _, _ = data_parallel_pass(model, SoftmaxCrossEntropy(), x, y,
                                      Context(pol, seed=0, step=0), 2, AllReduce())
    alone = []
    for w in range(2):
        m = fs.nn.build("cifarnet", seed=2, **kw)
        alone.append(np.asarray(m.forward(x[4 * w:4 * (w + 1)],
                                          fs.nn.parallel.WorkerContext(pol, worker=w))))
        if w == 0:
            first = {k: v.copy() for k, v in m.buffers().items()}
    assert logits.tobytes() == np.concatenate(alone).tobytes()
    for k, v in model.buffers().items():
        assert v.tobytes() == first[k].tobytes(), k


def test_counters_in_the_history(tiny):
    res = train(_config(workers=4, allreduce="fp8_e4m3", epochs=1), Policy.float32(),
                progress=False, data=tiny)
    row = res.history[0]
    sizes = [p.value.size for p in res.model.named_parameters().values()]
    assert row["allreduce.roundings"] == 3 * (4 + 3) * sum(sizes)  # 3 steps, casts + adds
    per_step = sum(ring_allreduce([np.zeros(s)] * 4, fs.FP8_E4M3)[1].bytes_per_worker
                   for s in sizes)
    assert row["allreduce.bytes_per_worker"] == 3 * per_step
    assert row["allreduce.inexact"] > 0


def test_saturations_are_counted_and_warned(tiny):
    """Gradients fit Q<8,7> ([-1, 1)); scaled by 64 they do not: the saturations are counted
    and the summary warns. FP16 overflows to infinity: those steps are skipped."""
    def run(allreduce):
        return train(_config(workers=2, allreduce=allreduce, epochs=1), Policy.float32(),
                     progress=False, data=tiny)

    fits, scaled, inf = run("Q<8,7>"), run("Q<8,7>:scale=64"), run("fp16:scale=1099511627776")
    assert fits.history[0]["allreduce.overflow"] == 0 and not fits.warnings
    assert scaled.history[0]["allreduce.overflow"] > 0.1 * scaled.history[0][
        "allreduce.roundings"]
    assert any("saturation dominates allreduce" in w for w in scaled.warnings)
    assert inf.history[0]["allreduce.overflow"] > 0 and inf.history[0]["skipped_steps"] == 3


def test_resume_bit_for_bit(tiny, tmp_path):
    cfg = _config(epochs=2, workers=2, allreduce="Q<16,12>:stochastic")
    pol = Policy.fixed(16, 12, "stochastic")
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny)
    part = train(cfg, pol, tmp_path / "split", progress=False, data=tiny, stop_after_epoch=1)
    assert len(part.history) == 1
    rest = train(cfg, pol, tmp_path / "split", resume=True, progress=False, data=tiny)
    assert _history(whole.history) == _history(rest.history)
    assert _same_params(whole, rest)
    other = train(_config(epochs=1, workers=4, allreduce="Q<16,12>:stochastic"), pol,
                  progress=False, data=tiny)
    assert not _same_params(part, other)


@pytest.mark.parametrize("kw, match", [
    (dict(workers=0), "workers must be an int >= 1"),
    (dict(workers=3), "workers must divide batch_size"),
    (dict(workers=2, allreduce="bf17"), "TrainConfig allreduce 'bf17'"),
    (dict(workers=2, allreduce="bf16:scale=0"), "scale must be"),
    (dict(workers=2, reuse="L=4,H=4"), "workers > 1 cannot be combined with reuse"),
    (dict(workers=2, grad_approx="topk:0.5"), "grad_approx"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_cli_workers(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--model-options", '{"hidden": [8]}',
                 "--data", "synthetic", "--train-size", "64", "--test-size", "32",
                 "--epochs", "1", "--batch-size", "32", "--workers", "4", "--allreduce",
                 "bf16", "--out", str(out), "--quiet"]) == 0
    cfg, _ = fs.nn.train.load_run(out)
    assert (cfg.workers, cfg.allreduce) == (4, "bf16")
    assert "allreduce.bytes_per_worker" in (out / "history.csv").read_text()
    assert main(["train", "--workers", "3", "--quiet"]) == 2
    assert "workers must divide batch_size" in capsys.readouterr().err


def test_study_keys_and_run_ids():
    """workers and allreduce are study keys (grid axes too); at their defaults they leave a
    run's id as it was, set they change it."""
    from fixedsim.study import parse_study

    base = {"train": {"model": "mlp", "epochs": 1, "batch_size": 32}}
    plain = parse_study(base).runs[0]
    same = parse_study({"train": {**base["train"], "workers": 1, "allreduce": ""}}).runs[0]
    grid = parse_study({**base, "grid": {"train": {"workers": [2, 4],
                                                   "allreduce": ["bf16", "fp8_e5m2:scale=1024"]}}})
    assert plain.run_id == same.run_id
    ids = {r.run_id for r in grid.runs}
    assert len(ids) == 4 and plain.run_id not in ids
    assert {(r.config().workers, r.config().allreduce) for r in grid.runs} == {
        (w, a) for w in (2, 4) for a in ("bf16", "fp8_e5m2:scale=1024")}


def test_last_batch_shorter_than_the_workers(tiny):
    """98 images in batches of 32: the last batch of 2 leaves workers 2 and 3 without images
    (they send zeros); 100 images: a last batch of 4, one image each. Under a loss-scaled
    policy the gradients are all-reduced scaled, as mixed-precision training sends them."""
    short = fdata.synthetic(n_train=98, n_test=16, shape=(1, 8, 8), classes=4, seed=3)
    r = train(_config(workers=4, allreduce="bf16", epochs=1), Policy.float32(),
              progress=False, data=short)
    assert r.history[0]["steps"] == 4 and np.isfinite(r.history[0]["train_loss"])
    hundred = fdata.synthetic(n_train=100, n_test=16, shape=(1, 8, 8), classes=4, seed=3)
    plain, scaled = (train(_config(workers=4, allreduce="fp8_e5m2", epochs=1), pol,
                           progress=False, data=hundred).history[0]
                     for pol in (Policy.float32(), Policy.fp16_mixed()))
    assert plain["steps"] == scaled["steps"] == 4
    n = sum(p.value.size for p in r.model.named_parameters().values())
    assert plain["allreduce.roundings"] == scaled["allreduce.roundings"] == 4 * 7 * n
    # the policy's loss scale (65536) travels with the gradients: nothing underflows FP8
    assert plain["allreduce.underflow"] > 0 == scaled["allreduce.underflow"]
