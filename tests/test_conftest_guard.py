"""The test-tier guard of tests/conftest.py: a test not marked ``slow`` cannot start a process (docs/testing.md)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

pytest_plugins = ["pytester"]

# what a test calls -> what the guard reports
LAUNCHERS = {
    "subprocess.run": ("subprocess.Popen", lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)),
    "os.system": ("os.system", lambda: os.system("true")),
    "multiprocessing fork Pool": ("os.fork", lambda: multiprocessing.get_context("fork").Pool(1)),
    "multiprocessing spawn Process": (
        "multiprocessing spawn",
        lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    ),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_fast_test_cannot_start_a_process(launcher, request):
    assert conftest._state["item"] is request.node  # the guard is watching this very test
    with pytest.raises(conftest.SubprocessInFastTestError, match=r"is not marked @pytest\.mark\.slow"):
        LAUNCHERS[launcher][1]()
    spawned = list(conftest._state["spawned"])
    assert len(spawned) == 1 and spawned[0].startswith(LAUNCHERS[launcher][0] + ": "), spawned
    conftest._state["spawned"].clear()  # the error was expected here: do not fail this test at teardown


@pytest.mark.slow
def test_a_slow_test_may_start_a_process():
    r = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "42" and conftest._state["spawned"] == []


@pytest.mark.slow
def test_a_swallowed_error_still_fails_the_fast_test(pytester):
    """Code under test that catches the error does not hide the process: the test fails at teardown."""
    pytester.makeconftest(Path(conftest.__file__).read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow tier\n")
    pytester.makepyfile(test_inner="""
        import subprocess, sys
        import pytest

        def test_fast_swallows():
            try:
                subprocess.run([sys.executable, "-c", "pass"])
            except Exception:
                pass

        @pytest.mark.slow
        def test_slow_runs():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_fast_swallows is not marked @pytest.mark.slow but started: subprocess.Popen*"])
    assert pytester.runpytest_subprocess("-q", "-m", "not slow", "-p", "no:cacheprovider").ret != 0
