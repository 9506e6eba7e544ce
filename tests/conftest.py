"""Test tiers (docs/testing.md): a test that starts a subprocess must be marked ``@pytest.mark.slow``.

The guard below enforces the rule so that it cannot silently rot: while a test that is *not* marked slow runs (its
setup, its body and its teardown, so module- and session-scoped fixtures it triggers count too), starting a process
through ``subprocess.Popen`` (``run``, ``check_call``, ``check_output`` ...), ``os.system``, ``os.posix_spawn[p]``,
``os.fork`` (``multiprocessing``'s fork context: a worker pool, a ``DataLoader`` with ``num_workers`` > 0) or
``multiprocessing``'s spawn / forkserver launcher raises :class:`SubprocessInFastTestError`, and the test errors at
teardown even if the code under test swallowed the exception. ``python -m pytest -m "not slow"`` is the fast tier;
``python -m pytest tests`` runs everything. tests/test_conftest_guard.py checks the guard itself.
"""

from __future__ import annotations

import multiprocessing.util
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
_fork = getattr(os, "fork", None)
_spawnv_passfds = multiprocessing.util.spawnv_passfds


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


def _guarded_fork():
    _guard("os.fork", "fork")
    return _fork()


def _guarded_spawnv_passfds(path, args, passfds):
    _guard("multiprocessing spawn", args)
    return _spawnv_passfds(path, args, passfds)


def pytest_configure(config):
    # the standard library's one probe (``uname -p``, which ITK's loader triggers), cached before the guard is on
    platform.processor()
    subprocess.Popen.__init__ = _guarded_popen_init
    os.system = _guarded_system
    if _posix_spawn is not None:
        os.posix_spawn = _guarded_spawn(_posix_spawn, "os.posix_spawn")
    if _posix_spawnp is not None:
        os.posix_spawnp = _guarded_spawn(_posix_spawnp, "os.posix_spawnp")
    if _fork is not None:
        os.fork = _guarded_fork
    multiprocessing.util.spawnv_passfds = _guarded_spawnv_passfds


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _popen_init
    os.system = _os_system
    if _posix_spawn is not None:
        os.posix_spawn = _posix_spawn
    if _posix_spawnp is not None:
        os.posix_spawnp = _posix_spawnp
    if _fork is not None:
        os.fork = _fork
    multiprocessing.util.spawnv_passfds = _spawnv_passfds


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
