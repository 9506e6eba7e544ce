"""One-line errors (scripts/errors.py): the bundle's own message is the last thing printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import errors
from scripts.data import DataError
from scripts.data.datalist import load_datalist

ROOT = Path(__file__).resolve().parents[1]


def _chained(tmp_path) -> BaseException:
    try:
        try:
            load_datalist(tmp_path / "nothing.json", "test")
        except DataError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as e:
        return e


def test_summary_is_the_bundle_message_of_the_root_cause(tmp_path, capsys):
    exc = _chained(tmp_path)
    assert errors.summary(exc) == f"error: {tmp_path / 'nothing.json'}: datalist not found."
    errors._hook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nothing.json'}: datalist not found.", "(BUNDLE_DEBUG=1 prints the traceback)"]


def test_a_foreign_error_keeps_its_traceback_and_ends_with_the_summary(capsys):
    try:
        {}["missing"]
    except KeyError as e:
        errors._hook(KeyError, e, e.__traceback__)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-2] == "error: KeyError: 'missing'"


@pytest.mark.slow
def test_monai_bundle_run_prints_one_line_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BUNDLE_DEBUG"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "configs/evaluate.yaml"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert lines[-2].startswith("error: the config refers to '@checked_options'") and "merged AFTER" in lines[-2]
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "BUNDLE_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert "Traceback" in r.stderr
