"""Test tiers (docs/testing.md): a test that starts a subprocess must be marked ``@pytest.mark.slow``.

The guard below enforces the rule so that it cannot silently rot: while a test that is *not* marked slow runs (its
setup, its body and its teardown, so module- and session-scoped fixtures it triggers count too), starting a process
through ``subprocess.Popen`` (``run``, ``check_call``, ``check_output`` ...), ``os.system`` or ``os.posix_spawn[p]``
raises :class:`SubprocessInFastTestError`, and the test errors at teardown even if the code under test swallowed the
exception. ``python -m pytest -m "not slow"`` is the fast tier; ``python -m pytest tests`` runs everything.
"""

from __future__ import annotations

import os
import platform
import subprocess
import traceback

import pytest

_state: dict = {"item": None, "spawned": []}


class SubprocessInFastTestError(RuntimeError):
    """A test that is not marked ``@pytest.mark.slow`` started a subprocess."""


def _guard(what: str, command) -> None:
    item = _state["item"]
    if item is None or item.get_closest_marker("slow") is not None:
        return
    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith(("subprocess.py", "conftest.py"))]
    caller = " <- ".join(f"{f.filename}:{f.lineno}" for f in frames[-3:][::-1])
    _state["spawned"].append(f"{what}: {command!r} from {caller}")
    raise SubprocessInFastTestError(
        f"{item.nodeid} started a subprocess ({what}: {command!r} from {caller}) but is not marked @pytest.mark.slow "
        "(every test that starts a subprocess belongs to the slow tier, see docs/testing.md)"
    )


_popen_init = subprocess.Popen.__init__
_os_system = os.system
_posix_spawn = getattr(os, "posix_spawn", None)
_posix_spawnp = getattr(os, "posix_spawnp", None)


def _guarded_popen_init(self, args, *a, **k):
    _guard("subprocess.Popen", args)
    return _popen_init(self, args, *a, **k)


def _guarded_system(command):
    _guard("os.system", command)
    return _os_system(command)


def _guarded_spawn(original, name):
    def spawn(path, argv, *a, **k):
        _guard(name, argv)
        return original(path, argv, *a, **k)

    return spawn


def pytest_configure(config):
    # the standard library's one probe (``uname -p``, which ITK's loader triggers), cached before the guard is on
    platform.processor()
    subprocess.Popen.__init__ = _guarded_popen_init
    os.system = _guarded_system
    if _posix_spawn is not None:
        os.posix_spawn = _guarded_spawn(_posix_spawn, "os.posix_spawn")
    if _posix_spawnp is not None:
        os.posix_spawnp = _guarded_spawn(_posix_spawnp, "os.posix_spawnp")


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _popen_init
    os.system = _os_system
    if _posix_spawn is not None:
        os.posix_spawn = _posix_spawn
    if _posix_spawnp is not None:
        os.posix_spawnp = _posix_spawnp


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _state["item"], _state["spawned"] = item, []
    try:
        yield
    finally:
        _state["item"] = None


@pytest.fixture(autouse=True)
def _no_subprocess_unless_slow(request):
    """Fails (at teardown) a fast-tier test that started a subprocess, even if the error was caught inside."""
    yield
    if _state["spawned"] and request.node.get_closest_marker("slow") is None:
        pytest.fail(
            f"{request.node.nodeid} is not marked @pytest.mark.slow but started: " + "; ".join(_state["spawned"]),
            pytrace=False,
        )
