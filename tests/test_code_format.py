"""Code format as MONAI's: flake8 (pyflakes errors and syntax), isort and black, with the settings of setup.cfg
([flake8], [isort]) and pyproject.toml ([tool.black]: black reads no other file). Fix with ``isort . && black .``.

The tools run in-process through their Python APIs (no subprocess); black and flake8 over the whole tree take
~20 s of CPU, so they are in the slow tier with the rest of CI (docs/testing.md), isort and the settings stay fast.
Each test is skipped, with the reason, when its tool is not installed (``pip install .[test]`` installs all three).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scripts", "bundle", "tests")
EXCLUDED = {"__pycache__"}  # scripts/data is a package; the top-level data/ and runs/ are never globbed


def _python_files() -> list[Path]:
    files = [p for p in ROOT.glob("*.py")]
    for pkg in PACKAGES:
        files += [p for p in (ROOT / pkg).rglob("*.py") if not EXCLUDED & set(p.relative_to(ROOT).parts)]
    return sorted(files)


def _black_line_length() -> int:
    m = re.search(
        r"^\[tool\.black\][^\[]*?^line-length\s*=\s*(\d+)", (ROOT / "pyproject.toml").read_text(), re.M | re.S
    )
    assert m, "pyproject.toml has no [tool.black] line-length"
    return int(m.group(1))


@pytest.mark.slow
def test_flake8_errors(monkeypatch, capsys):
    """Undefined names, unused variables, shadowed imports, syntax errors (F, E9): real bugs, not style."""
    legacy = pytest.importorskip("flake8.api.legacy", reason="flake8 is not installed (pip install .[test])")
    monkeypatch.chdir(ROOT)
    report = legacy.get_style_guide(select=["F", "E9"]).check_files(list(PACKAGES))
    out = capsys.readouterr().out
    assert report.total_errors == 0, f"flake8 --select F,E9 {' '.join(PACKAGES)}:\n{out[-4000:]}"


def test_isort():
    isort = pytest.importorskip("isort", reason="isort is not installed (pip install .[test])")
    config = isort.Config(settings_path=str(ROOT))
    bad = [str(p.relative_to(ROOT)) for p in _python_files() if not isort.check_file(p, config=config, show_diff=False)]
    assert not bad, f"imports not sorted as setup.cfg [isort] wants in {bad}: run `isort .`"


@pytest.mark.slow
def test_black():
    black = pytest.importorskip("black", reason="black is not installed (pip install .[test])")
    mode = black.Mode(line_length=_black_line_length())
    bad = []
    for p in _python_files():
        try:
            black.format_file_contents(p.read_text(), fast=True, mode=mode)
        except black.NothingChanged:
            continue
        bad.append(str(p.relative_to(ROOT)))
    assert not bad, f"black would reformat {bad}: run `black .`"


def test_settings_are_read():
    """The settings the checks rely on: line length 120 everywhere, isort with black's profile."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["flake8"]["max-line-length"] == "120"
    assert cfg["isort"]["profile"] == "black" and cfg["isort"]["line_length"] == "120"
    assert _black_line_length() == 120
    black = pytest.importorskip("black", reason="black is not installed (pip install .[test])")
    probe = "y = [" + ", ".join(str(i) for i in range(31)) + "]\n"  # 118 characters: kept at 120, split at 88
    assert 88 < len(probe.rstrip()) <= 120
    with pytest.raises(black.NothingChanged):
        black.format_file_contents(probe, fast=True, mode=black.Mode(line_length=_black_line_length()))
    assert black.format_file_contents(probe, fast=True, mode=black.Mode()) != probe
