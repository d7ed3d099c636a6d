"""Precision-sweep studies: a grid of training runs from a TOML study file, run locally or on a
Dask cluster, recorded atomically and resumably, summarised in tables and figures.

>>> from fixedsim.study import load_study, run_study, report   # doctest: +SKIP
>>> study = load_study("studies/gupta2015/quick.toml")           # doctest: +SKIP
>>> run_study(study, "out/quick", workers=2)                     # doctest: +SKIP
>>> report("out/quick")                                          # doctest: +SKIP

See docs/sweeps.md for the study-file format and the output folder.
"""

from .report import Report, load_results, report
from .runner import SweepResult, execute_run, load_records, run_study, write_tables
from .spec import (
                   RunSpec,
                   Study,
                   StudyError,
                   derive_seed,
                   load_study,
                   parse_study,
                   run_id_of,
                   shared_seed,
)

__all__ = [
    "Report",
    "RunSpec",
    "Study",
    "StudyError",
    "SweepResult",
    "derive_seed",
    "shared_seed",
    "execute_run",
    "load_records",
    "load_results",
    "load_study",
    "parse_study",
    "report",
    "run_id_of",
    "run_study",
    "write_tables",
]
