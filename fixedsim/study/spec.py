"""Study files: parse, validate and expand a grid of training runs into :class:`RunSpec` s.

A study file (TOML) has up to five top-level parts::

    [study]             name, seed, seeds, description, replicates, numba_threads, workers,
                        out, count_steps
    [train]             TrainConfig fields (every one but ``seed``), values only
    policy = ...        the base policy: a preset string, a policy file, or a table
    [policy_overrides]  dotted keys into the policy table, values only
    [grid]              dotted keys -> lists of values: the axes of the sweep

The grid is the Cartesian product of the ``[grid]`` axes, in file order (the last axis varies
fastest). Everything is validated, and every grid point resolved to a full
:class:`~fixedsim.nn.train.TrainConfig` and :class:`~fixedsim.nn.Policy`, before anything
runs; an error names the file, the key and the reason. See docs/sweeps.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib

from ..quantize import seed_word

__all__ = ["StudyError", "RunSpec", "Study", "load_study", "parse_study", "run_id_of",
           "derive_seed", "shared_seed", "TOP_KEYS", "STUDY_KEYS", "SEEDINGS"]

#: The top-level keys of a study file.
TOP_KEYS = ("study", "train", "policy", "policy_overrides", "grid")
#: The keys of the ``[study]`` table.
STUDY_KEYS = ("name", "seed", "seeds", "description", "replicates", "numba_threads", "workers",
              "out", "count_steps")
#: The values of ``[study] seeds``: each run its own seed (from the run id), or one seed per
#: replicate shared by every grid point (paired comparisons).
SEEDINGS = ("per_run", "shared")
#: The first part of every ``[grid]`` key.
GRID_ROOTS = ("policy", "train", "replicate")


class StudyError(ValueError):
    """A study file (or a sweep's output folder) is not usable; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One grid point, fully resolved.

    Attributes
    ----------
    run_id : str
        12 hex digits: the start of the SHA-256 of the canonical JSON of :attr:`identity`
        (the training settings without the seed, the policy, the replicate index and the
        study seed). The same configuration always has the same id, whatever the order of
        keys or the way it was written (a preset name or the equivalent table).
    index : int
        Position in the grid (0-based, the order runs are submitted in).
    axes : dict
        Grid key -> the value of this point, as a label (numbers and strings as written; a
        policy table by its name; other tables and lists as compact JSON).
    train : dict
        The full ``TrainConfig.to_dict()`` of the run, ``seed`` included.
    policy : dict
        The full ``Policy.to_dict()`` of the run.
    replicate : int
    seed : int
        The run's training seed: ``SeedSequence([study_seed, int(run_id, 16)])``, its first
        32-bit word (:func:`derive_seed`); with ``seeds == "shared"``, the replicate's seed
        (:func:`shared_seed`), the same for every grid point. It depends on nothing but the
        configuration, never on scheduling.
    study_seed : int
    seeds : str
        ``"per_run"`` (default) or ``"shared"``: the study's ``[study] seeds``.
    """

    run_id: str
    index: int
    axes: dict
    train: dict
    policy: dict
    replicate: int
    seed: int
    study_seed: int
    seeds: str = "per_run"

    @property
    def identity(self) -> dict:
        """The configuration the run id is the hash of (:func:`_identity`)."""
        return _identity({k: v for k, v in self.train.items() if k != "seed"}, self.policy,
                         self.replicate, self.study_seed, self.seeds)

    @property
    def label(self) -> str:
        """``key=value`` of every axis, comma-separated (``"(single run)"`` without axes)."""
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or "(single run)"

    def config(self):
        """The :class:`~fixedsim.nn.train.TrainConfig` of the run."""
        from ..nn.train import TrainConfig

        return TrainConfig.from_dict(self.train, f"run {self.run_id} train")

    def make_policy(self):
        """The :class:`~fixedsim.nn.Policy` of the run."""
        from ..nn import Policy

        return Policy.from_dict(self.policy, f"run {self.run_id} policy")


@dataclasses.dataclass
class Study:
    """A validated study: its settings and the list of runs.

    Attributes
    ----------
    path : pathlib.Path or None
        The study file.
    name, description : str
    seed : int
        The study seed (every run seed derives from it and the run id).
    numba_threads : int or None
        Numba threads per run (None: 1).
    workers : int or None
        Default number of local worker processes (None: the number of CPUs).
    out : pathlib.Path or None
        Default output folder (``[study] out``, relative to the study file).
    axes : dict
        Grid key -> list of labels of its values, in file order.
    runs : list of RunSpec
        Every grid point, in grid order.
    count_steps : bool
        Count the per-step events of every product (the accumulator's inexact, overflowing,
        subnormal steps; :func:`fixedsim.counters.record` with ``steps=True``) in each run's
        counters; not part of a run's identity (False: they are left out, and cost nothing).
    seeds : str
        ``"per_run"``: every run trains from its own seed, derived from the run id;
        ``"shared"``: every run of one replicate trains from the same seed (same initial
        weights, data order and random draws), so that grid points are compared in pairs.
    """

    path: pathlib.Path | None
    name: str
    description: str
    seed: int
    numba_threads: int | None
    workers: int | None
    out: pathlib.Path | None
    axes: dict
    runs: list
    data_checked: bool = False
    count_steps: bool = False
    seeds: str = "per_run"

    def __len__(self) -> int:
        return len(self.runs)

    def default_out(self) -> pathlib.Path:
        """``[study] out`` if given, else ``results/STEM`` beside the study file."""
        if self.out is not None:
            return self.out
        if self.path is None:
            return pathlib.Path("results") / self.name
        return self.path.parent / "results" / self.path.stem

    def check_data(self) -> None:
        """Load every data set the runs use, and build each model once on it.

        Raises
        ------
        StudyError
            A data set is missing (the message says where it looked and how to install it)
            or a model cannot be built with its options on that data.
        """
        from ..approx.rescale import low_resolution_model, parse_rescale
        from ..nn import build

        where = self.path if self.path is not None else "study"
        seen_data, seen_model, seen_rescale = {}, {}, set()
        for run in self.runs:
            name = run.train["data"]
            if name not in seen_data:
                try:
                    seen_data[name] = _load_dataset(name)
                except (OSError, ImportError, ValueError) as err:
                    raise StudyError(f"{where}: train.data = {name!r}: the data set does not "
                                     f"load: {err}") from None
            ds = seen_data[name]
            key = (name, run.train["model"], json.dumps(run.train["model_options"],
                                                         sort_keys=True))
            if key not in seen_model:
                try:
                    seen_model[key] = build(run.train["model"], seed=0,
                                            in_shape=ds.x_train.shape[1:],
                                            classes=len(ds.classes),
                                            **run.train["model_options"])
                except (TypeError, ValueError) as err:
                    raise StudyError(f"{where}: train.model = {run.train['model']!r} with "
                                     f"model_options {run.train['model_options']!r} on data "
                                     f"{name!r}: {err}") from None
            rescale = run.train.get("rescale")
            if rescale and (key, rescale) not in seen_rescale:  # the model must scale by it
                seen_rescale.add((key, rescale))
                try:
                    low_resolution_model(seen_model[key], ds.x_train.shape[1:],
                                         parse_rescale(rescale).factor)
                except ValueError as err:
                    raise StudyError(f"{where}: train.rescale = {rescale!r} with "
                                     f"train.model = {run.train['model']!r}, model_options "
                                     f"{run.train['model_options']!r}: {err}") from None
        self.data_checked = True

    def describe(self) -> str:
        """A few lines: name, axes and the number of runs."""
        lines = [f"study {self.name!r}: {len(self.runs)} run(s), study seed {self.seed}"]
        if self.description:
            lines.append(f"  {self.description}")
        for k, vals in self.axes.items():
            lines.append(f"  {k}: {', '.join(map(str, vals))}")
        return "\n".join(lines)


# -- data sets (cached per process) -------------------------------------------------------------
_DATASETS: dict = {}


def _load_dataset(name):
    """``fixedsim.data.load(name)``, once per process."""
    from .. import data as _data

    if name not in _DATASETS:
        _DATASETS[name] = _data.load(name)
    return _DATASETS[name]


# -- hashing and seeds --------------------------------------------------------------------------
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def run_id_of(identity: dict) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of a run's configuration."""
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()[:12]


#: The training settings that every run id hashes, default or not: those of
#: :class:`~fixedsim.nn.train.TrainConfig` when run ids were introduced (``seed`` is never
#: hashed). A setting added since enters a run's identity only when it is not at its default,
#: so that adding a training option leaves the ids of existing studies, and with them their
#: committed results and ``--resume``, as they were.
IDENTITY_TRAIN_FIELDS = frozenset({
    "batch_size", "data", "epochs", "eval_batch_size", "lr", "max_loss", "model",
    "model_options", "momentum", "nesterov", "optimizer", "reuse", "reuse_layers", "schedule",
    "test_size", "train_size", "weight_decay"})


@functools.lru_cache(maxsize=1)
def _train_defaults() -> dict:
    from ..nn.train import TrainConfig

    return TrainConfig().to_dict()


def _identity(train: dict, policy: dict, replicate: int, study_seed: int, seeds: str) -> dict:
    """A run's configuration, whose hash is its id: the training settings without the seed
    (those added after :data:`IDENTITY_TRAIN_FIELDS` only when set), the policy, the
    replicate, the study seed, and ``seeds`` only when shared (so that the ids of per-run
    studies are those they always were)."""
    defaults = _train_defaults()
    train = {k: v for k, v in train.items()
             if k in IDENTITY_TRAIN_FIELDS or k not in defaults or v != defaults[k]}
    d = {"train": train, "policy": policy, "replicate": replicate, "study_seed": study_seed}
    if seeds == "shared":
        d["seeds"] = "shared"
    return d


def derive_seed(study_seed: int, run_id: str) -> int:
    """The training seed of a run: the first word of ``SeedSequence([study_seed, run_id])``."""
    return seed_word(study_seed, int(run_id, 16)) & 0xFFFFFFFF


def shared_seed(study_seed: int, replicate: int) -> int:
    """The training seed of every run of one replicate under ``[study] seeds = "shared"``: the
    first word of ``SeedSequence([study_seed, 2**64 + replicate])`` (the offset keeps it
    apart from every :func:`derive_seed`, whose run ids are below ``2**48``)."""
    return seed_word(study_seed, (1 << 64) + int(replicate)) & 0xFFFFFFFF


# -- reading ------------------------------------------------------------------------------------
def _toml_load(path: pathlib.Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except OSError as err:
        raise StudyError(f"{path}: cannot read the study file: {err.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{path}: not valid TOML: {err}") from None


def load_study(path, *, check_data: bool = True) -> Study:
    """Read, validate and expand a study file.

    Parameters
    ----------
    path : str or os.PathLike
        The TOML study file (docs/sweeps.md).
    check_data : bool, default True
        Also load every data set the runs use (and build each model on it), so that a missing
        data set is reported now rather than by every run.

    Returns
    -------
    Study

    Raises
    ------
    StudyError
        (a ``ValueError``) The file is missing or malformed, has an unknown key, a value of
        the wrong type, an empty grid or axis, an impossible format or policy, or names data
        that does not load; the message names the file, the key and the reason.
    """
    path = pathlib.Path(path)
    study = parse_study(_toml_load(path), path=path)
    if check_data:
        study.check_data()
    return study


def _where(path) -> str:
    return str(path) if path is not None else "study"


def _check_type(value, kind, key, where):
    """Check a TOML value against a TrainConfig annotation; return it normalised."""
    def bad(expected):
        return StudyError(f"{where}: {key}: expected {expected}, got {type(value).__name__} "
                          f"{value!r}")
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad("a table")
    return value


def _train_fields() -> dict:
    from ..nn.train import TrainConfig

    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _flatten(table: dict, prefix: str = "") -> list:
    """``(dotted key, leaf value)`` pairs of nested tables, in order."""
    out = []
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _set_path(d: dict, parts: list, value, key: str, where: str) -> None:
    for i, p in enumerate(parts[:-1]):
        nxt = d.get(p)
        if nxt is None:
            nxt = d[p] = {}
        elif not isinstance(nxt, dict):
            raise StudyError(f"{where}: {key}: {'.'.join(parts[:i + 1])} is "
                             f"{nxt!r}, not a table, so it has no key {parts[i + 1]!r}")
        d = nxt
    d[parts[-1]] = copy.deepcopy(value)


def _label(key: str, value):
    """How an axis value appears in results and reports."""
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    if key == "policy" and isinstance(value, dict):
        return str(value.get("name", "custom"))
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_int(v, key, where, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise StudyError(f"{where}: {key}: expected an integer >= {minimum}, got {v!r}")
    return v


def parse_study(data: dict, path=None) -> Study:
    """Validate the parsed contents of a study file and expand its grid.

    Parameters
    ----------
    data : dict
        The TOML document as a dict.
    path : path, optional
        The study file: named in errors, and relative paths (policy files, data folders,
        ``out``) are taken relative to its folder.

    Returns
    -------
    Study
        Data sets are not checked (:meth:`Study.check_data`).
    """
    from ..nn import Policy

    path = pathlib.Path(path) if path is not None else None
    where = _where(path)
    base = path.parent if path is not None else pathlib.Path.cwd()
    if not isinstance(data, dict):
        raise StudyError(f"{where}: expected a table at the top level")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r} at the top level; allowed: "
                         f"{', '.join(TOP_KEYS)}")

    # [study]
    st = data.get("study", {})
    if not isinstance(st, dict):
        raise StudyError(f"{where}: study: expected a table [study], got {st!r}")
    for k in st:
        if k not in STUDY_KEYS:
            raise StudyError(f"{where}: study.{k}: unknown key; allowed: "
                             f"{', '.join(STUDY_KEYS)}")
    name = st.get("name", path.stem if path is not None else "study")
    if not isinstance(name, str) or not name.strip():
        raise StudyError(f"{where}: study.name: expected a non-empty string, got {name!r}")
    description = st.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"{where}: study.description: expected a string, got {description!r}")
    seed = _check_int(st.get("seed", 0), "study.seed", where, 0)
    seeding = st.get("seeds", "per_run")
    if seeding not in SEEDINGS:
        raise StudyError(f"{where}: study.seeds: expected one of "
                         f"{', '.join(map(repr, SEEDINGS))}, got {seeding!r}")
    replicates = st.get("replicates")
    if replicates is not None:
        _check_int(replicates, "study.replicates", where, 1)
    numba_threads = st.get("numba_threads")
    if numba_threads is not None:
        _check_int(numba_threads, "study.numba_threads", where, 1)
    workers = st.get("workers")
    if workers is not None:
        _check_int(workers, "study.workers", where, 1)
    count_steps = st.get("count_steps", False)
    if not isinstance(count_steps, bool):
        raise StudyError(f"{where}: study.count_steps: expected true or false, got "
                         f"{count_steps!r}")
    out = st.get("out")
    if out is not None:
        if not isinstance(out, str) or not out:
            raise StudyError(f"{where}: study.out: expected a folder name, got {out!r}")
        out = (base / out).resolve() if not os.path.isabs(out) else pathlib.Path(out)

    # [train]
    fields = _train_fields()
    train = data.get("train", {})
    if not isinstance(train, dict):
        raise StudyError(f"{where}: train: expected a table [train], got {train!r}")
    for k in train:
        _check_train_key(k, fields, where)
    train = copy.deepcopy(train)

    # policy and [policy_overrides]
    base_policy = data.get("policy", "float32")
    overrides = data.get("policy_overrides", {})
    if not isinstance(overrides, dict):
        raise StudyError(f"{where}: policy_overrides: expected a table, got {overrides!r}")
    overrides = [(f"policy_overrides.{k}", k.split("."), v) for k, v in _flatten(overrides)]

    # [grid]
    axes = {}
    if "grid" in data:
        grid = data["grid"]
        if not isinstance(grid, dict):
            raise StudyError(f"{where}: grid: expected a table [grid] of key = [values], "
                             f"got {grid!r}")
        for key, values in _flatten(grid):
            gk = f"grid.{key}"
            parts = key.split(".")
            if parts[0] not in GRID_ROOTS:
                raise StudyError(f"{where}: {gk}: unknown axis; a grid key starts with "
                                 f"{', '.join(GRID_ROOTS)} (e.g. \"train.lr\", "
                                 f"\"policy.weights.rounding\", \"replicate\")")
            if parts[0] == "train":
                if len(parts) < 2:
                    raise StudyError(f"{where}: {gk}: name a training setting, "
                                     f"e.g. \"train.lr\"")
                _check_train_key(parts[1], fields, where, gk)
                if len(parts) > 2 and fields[parts[1]] != "dict":
                    raise StudyError(f"{where}: {gk}: train.{parts[1]} is not a table")
            if parts[0] == "replicate" and len(parts) > 1:
                raise StudyError(f"{where}: {gk}: replicate has no sub-keys")
            if not isinstance(values, list):
                raise StudyError(f"{where}: {gk}: a grid axis must be a list of values, got "
                                 f"{values!r}; single values belong in [train], policy or "
                                 f"[policy_overrides]")
            if not values:
                raise StudyError(f"{where}: {gk}: empty list: an axis needs at least one value")
            if key == "replicate":
                for v in values:
                    _check_int(v, gk, where, 0)
            labels = [_label(key, v) for v in values]
            seen = set()
            for v in values:
                c = _canonical(v) if not isinstance(v, float) else repr(v)
                if c in seen:
                    raise StudyError(f"{where}: {gk}: the value {v!r} appears twice")
                seen.add(c)
            axes[key] = (values, labels)
        if not axes:
            raise StudyError(f"{where}: grid: the [grid] table is empty; give at least one "
                             f"key = [values], or leave [grid] out for a single run")
    if replicates is not None:
        if "replicate" in axes:
            raise StudyError(f"{where}: study.replicates: give either study.replicates or a "
                             f"grid axis \"replicate\", not both")
        axes["replicate"] = (list(range(replicates)), list(range(replicates)))

    # expand
    keys = list(axes)
    runs, by_id = [], {}
    policy_cache: dict = {}
    for index, combo in enumerate(itertools.product(*(range(len(axes[k][0])) for k in keys))):
        point = {k: axes[k][0][i] for k, i in zip(keys, combo, strict=True)}
        labels = {k: axes[k][1][i] for k, i in zip(keys, combo, strict=True)}
        tdict = _resolve_train(train, point, fields, base, where)
        pdict = _resolve_policy(base_policy, overrides, point, base, where, Policy,
                                policy_cache)
        replicate = int(point.get("replicate", 0))
        rid = run_id_of(_identity(tdict, pdict, replicate, seed, seeding))
        if rid in by_id:
            other = by_id[rid]
            raise StudyError(f"{where}: grid: the points {other.label} and "
                             f"{', '.join(f'{k}={v}' for k, v in labels.items())} resolve to "
                             f"the same configuration (run id {rid})")
        run_seed = shared_seed(seed, replicate) if seeding == "shared" else derive_seed(seed, rid)
        run = RunSpec(run_id=rid, index=index, axes=labels, train={**tdict, "seed": run_seed},
                      policy=pdict, replicate=replicate, seed=run_seed, study_seed=seed,
                      seeds=seeding)
        by_id[rid] = run
        runs.append(run)
    return Study(path=path, name=name.strip(), description=description, seed=seed,
                 numba_threads=numba_threads, workers=workers, out=out,
                 axes={k: list(axes[k][1]) for k in keys}, runs=runs, count_steps=count_steps,
                 seeds=seeding)


def _check_train_key(k, fields, where, key=None):
    key = key or f"train.{k}"
    if k == "seed":
        raise StudyError(f"{where}: {key}: the run seed is not set by hand: it derives from "
                         f"study.seed and the run id; set study.seed, and use replicates "
                         f"(study.replicates or a grid axis \"replicate\") for several seeds")
    if k not in fields:
        raise StudyError(f"{where}: {key}: unknown training setting; allowed: "
                         f"{', '.join(sorted(f for f in fields if f != 'seed'))}")


def _point_desc(point, prefix):
    items = [f"{k} = {json.dumps(v)}" for k, v in point.items()
             if k == prefix or k.startswith(prefix + ".")]
    return ("grid point " + ", ".join(items)) if items else None


def _resolve_train(train, point, fields, base, where) -> dict:
    from ..nn.train import TrainConfig

    d = copy.deepcopy(train)
    for key, value in point.items():
        parts = key.split(".")
        if parts[0] == "train":
            _set_path(d, parts[1:], value, f"grid.{key}", where)
    ctx = _point_desc(point, "train")
    loc = f"{where}: {ctx}" if ctx else where
    for k, v in list(d.items()):
        d[k] = _check_type(v, fields[k], f"train.{k}", loc)
    data = d.get("data")
    if isinstance(data, str) and ("/" in data or os.sep in data) and not os.path.isabs(data):
        d["data"] = str((base / data).resolve())
    try:
        cfg = TrainConfig.from_dict({**d, "seed": 0}, "train")
    except ValueError as err:
        raise StudyError(f"{loc}: {err}") from None
    out = cfg.to_dict()
    del out["seed"]
    return out


def _policy_from_spec(spec, key, base, where, Policy, cache) -> dict:
    ck = _canonical(spec) if isinstance(spec, (dict, str)) else None
    if ck is not None and ck in cache:
        return copy.deepcopy(cache[ck])
    if isinstance(spec, str):
        s = spec.strip()
        if s.endswith((".toml", ".json")) and not os.path.isabs(s):
            s = str(base / s)
        try:
            p = Policy.parse(s)
        except (TypeError, ValueError) as err:
            raise StudyError(f"{where}: {key}: {err}") from None
    elif isinstance(spec, dict):
        try:
            p = Policy.from_dict(spec, key)
        except (TypeError, ValueError) as err:
            raise StudyError(f"{where}: {err}") from None
    else:
        raise StudyError(f"{where}: {key}: expected a policy name (float32, fp16, bf16, fp8, "
                         f"exact, fixed:WL:FL[:ROUNDING]), a policy file or a table, got "
                         f"{type(spec).__name__} {spec!r}")
    d = p.to_dict()
    if ck is not None:
        cache[ck] = copy.deepcopy(d)
    return d


def _resolve_policy(base_policy, overrides, point, base, where, Policy, cache) -> dict:
    if "policy" in point:
        d = _policy_from_spec(point["policy"], f"grid.policy = {json.dumps(point['policy'])}",
                              base, where, Policy, cache)
    else:
        d = _policy_from_spec(base_policy, "policy", base, where, Policy, cache)
    sets = list(overrides)
    sets += [(f"grid.{k}", k.split(".")[1:], v) for k, v in point.items()
             if k.startswith("policy.")]
    if not sets:
        return d
    named = False
    for key, parts, value in sets:
        _set_path(d, parts, value, key, where)
        named = named or parts == ["name"]
    if not named:
        d["name"] = d["name"] + " +" + ",".join(
            f"{'.'.join(parts)}={_label('', value)}" for _, parts, value in sets)
    ctx = ", ".join(f"{key} = {json.dumps(value)}" for key, _, value in sets)
    try:
        return Policy.from_dict(d, "policy").to_dict()
    except (TypeError, ValueError) as err:
        raise StudyError(f"{where}: {ctx}: {err}") from None
