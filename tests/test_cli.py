"""The fixedsim command line."""

import subprocess
import sys

import pytest

from fixedsim.cli import main


def test_verify_sample_passes(capsys):
    pytest.importorskip("ml_dtypes")
    assert main(["verify", "--sample", "200000", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "OK: every input agrees bit for bit" in out
    for name in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"):
        assert name in out


def test_verify_one_format(capsys):
    assert main(["verify", "--sample", "1000", "--formats", "fp16", "--quiet"]) == 0
    assert "bf16" not in capsys.readouterr().out


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--sample", "0"])
    assert "--sample must be a positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", "--formats", "fp7"])


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fixedsim.cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("fixedsim ")
