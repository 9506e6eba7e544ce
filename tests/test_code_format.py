"""Code format as MONAI's: flake8 (pyflakes errors and syntax), isort and black, with the settings of setup.cfg
([flake8], [isort]) and pyproject.toml ([tool.black]: black reads no other file). Fix with ``isort . && black .``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scripts", "bundle", "tests")


def _tool(name: str) -> list[str]:
    """``python -m <tool>`` of this interpreter, or skip with the reason when it is not installed."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install .[test] installs black, isort and flake8)")
    return [sys.executable, "-m", name]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_flake8_errors():
    """Undefined names, unused variables, shadowed imports, syntax errors (F, E9): real bugs, not style."""
    r = _run(_tool("flake8") + ["--select", "F,E9", *PACKAGES])
    assert r.returncode == 0, f"flake8 --select F,E9 {' '.join(PACKAGES)}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"


def test_isort():
    r = _run(_tool("isort") + ["--check-only", "--diff", "."])
    assert r.returncode == 0, f"isort --check-only . (fix: isort .):\n{(r.stdout + r.stderr)[-4000:]}"


def test_black():
    r = _run(_tool("black") + ["--check", "."])
    assert r.returncode == 0, f"black --check . (fix: black .):\n{r.stderr[-4000:]}"


def test_settings_are_read():
    """The settings the checks rely on: line length 120 everywhere, isort with black's profile."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["flake8"]["max-line-length"] == "120"
    assert cfg["isort"]["profile"] == "black" and cfg["isort"]["line_length"] == "120"
    text = (ROOT / "pyproject.toml").read_text()
    assert "[tool.black]" in text and "line-length = 120" in text
    # black keeps a 118-character line (line length 88, black's default, would split it)
    probe = "y = [" + ", ".join(str(i) for i in range(31)) + "]\n"
    assert 88 < len(probe.rstrip()) <= 120
    r = subprocess.run(_tool("black") + ["-q", "-"], input=probe, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == probe, r.stdout
