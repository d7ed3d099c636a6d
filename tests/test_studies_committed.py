"""The committed studies reproduce: every study file under ``studies/`` validates, and the
runs of every committed results folder are runs of a study file there (same run ids), so that
``fixedsim sweep FILE --resume`` into a copy of the folder adopts them and runs only what is
missing (docs/sweeps.md: how seeds are added to a study)."""

from __future__ import annotations

import collections
import csv
import pathlib

import pytest

from fixedsim.study import load_study

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STUDIES = pathlib.Path(__file__).resolve().parent.parent / "studies"

#: Results computed before a change of a run's identity, kept as they were computed; their
#: READMEs say which meaning they used. Relative to ``studies/``.
EARLIER = {
    # computed when "float32" named the FP32 FMA chain; the files now say
    # "float32:fma_chain", which hashes to other run ids
    "accumulators/results-seed7": "float32 then meant the FMA chain",
    "deep_reuse/results-training-float32": "float32 then meant the FMA chain",
    "floats/results-3seeds": "float32 then meant the FMA chain (its 6 float32 runs)",
    "floats/results-seed11": "float32 then meant the FMA chain",
    "gupta2015/full-results": "float32 then meant the FMA chain",
    "gupta2015/mnist5k-results": "float32 then meant the FMA chain",
}


#: Every study file (a TOML with a ``[study]`` table) outside the runs' folders.
STUDY_FILES = sorted(p for p in STUDIES.rglob("*.toml")
                     if "runs" not in p.relative_to(STUDIES).parts
                     and "study" in tomllib.loads(p.read_text()))


def _results_folders():
    return sorted(p.parent for p in STUDIES.rglob("results.csv")
                  if "runs" not in p.relative_to(STUDIES).parts)


@pytest.fixture(scope="module")
def runs_by_name():
    """``{study name: [(file, {run ids})]}`` of every study file."""
    out = collections.defaultdict(list)
    for path in STUDY_FILES:
        study = load_study(path, check_data=False)
        out[study.name].append((path, {r.run_id for r in study.runs}))
    return out


def test_every_study_file_validates(runs_by_name):
    assert sum(len(v) for v in runs_by_name.values()) == len(STUDY_FILES) > 50


@pytest.mark.parametrize("folder", _results_folders(),
                         ids=lambda p: str(p.relative_to(STUDIES)))
def test_committed_results_are_runs_of_a_study_file(folder, runs_by_name):
    rel = str(folder.relative_to(STUDIES))
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "study" not in rows[0]:
        pytest.skip("not a sweep's results (no study column)")
    ids = collections.defaultdict(set)
    for row in rows:
        ids[row["study"]].add(row["run_id"])
    for name, got in ids.items():
        files = runs_by_name.get(name, [])
        found = any(got <= runs for _, runs in files)
        if rel in EARLIER:
            assert not found, f"{rel} reproduces now ({EARLIER[rel]}): remove it from EARLIER"
            continue
        assert files, f"{rel}: no study file is named {name!r}"
        assert found, (f"{rel}: {name!r}'s runs are not those of "
                       f"{[str(p.relative_to(STUDIES)) for p, _ in files]} (a study file's "
                       f"grid, seed or replicates differ from what was run)")
