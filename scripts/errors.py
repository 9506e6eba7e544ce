"""The last line a user reads: the bundle's own error message, not the end of an 80-line traceback.

``python -m monai.bundle run ...`` wraps every error of a config expression in ``RuntimeError("Failed to evaluate
ConfigExpression")`` and prints the whole chain. :func:`install` (done by ``import scripts`` under
``python -m monai.bundle`` and by ``python -m bundle``) replaces ``sys.excepthook`` so that an error raised by the
bundle's own code (``scripts/``, ``bundle/``: the checks that name the file and the problem) prints as one line,
``error: <message>``, and any other error prints its traceback followed by that line. ``BUNDLE_DEBUG=1`` keeps
Python's own traceback for every error.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

__all__ = ["install", "root_cause", "summary"]

_OWN = ("scripts", "bundle")
_HINT = "(BUNDLE_DEBUG=1 prints the traceback)"
_UNDEFINED = re.compile(r"the referring item `@([^`]+)` is not defined")
_MERGE = (
    "configs/evaluate.yaml and the files of configs/variants/ are merged AFTER configs/train.yaml, e.g. "
    "--config_file \"['configs/train.yaml','configs/evaluate.yaml']\""
)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain (``raise ... from``, then the implicit context)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _raised_by_bundle(exc: BaseException) -> bool:
    """The innermost frame of ``exc`` is in this project's ``scripts/`` or ``bundle/`` (not a venv inside the repo)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    here = Path(__file__).resolve().parents[1]
    try:
        return Path(frames[-1].filename).resolve().relative_to(here).parts[0] in _OWN
    except ValueError:
        return False


def _undefined_id(exc: BaseException) -> str | None:
    """The id of MONAI's 'referring item `@id` is not defined' anywhere in the chain (a config run alone)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        m = _UNDEFINED.search(str(exc))
        if m:
            return m.group(1)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def summary(exc: BaseException) -> str:
    """``error: <message of the root cause>`` (its type added where the message alone would not say it)."""
    undefined = _undefined_id(exc)
    if undefined is not None:
        return f"error: the config refers to '@{undefined}', which no file of --config_file defines: {_MERGE}."
    cause = root_cause(exc)
    msg = str(cause).strip() or type(cause).__name__
    if not _raised_by_bundle(cause) or type(cause).__name__ in ("KeyError", "IndexError"):
        msg = f"{type(cause).__name__}: {msg}"
    return f"error: {msg}"


def _hook(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt) or os.environ.get("BUNDLE_DEBUG"):
        sys.__excepthook__(exc_type, exc, tb)
        return
    if not _raised_by_bundle(root_cause(exc)) and _undefined_id(exc) is None:
        traceback.print_exception(exc_type, exc, tb)
    print(f"{summary(exc)}\n{_HINT}", file=sys.stderr)


def install() -> None:
    """Use :func:`_hook` for uncaught errors (idempotent)."""
    sys.excepthook = _hook


def _under_monai_bundle() -> bool:
    return os.path.abspath(sys.argv[0] if sys.argv else "").replace(os.sep, "/").endswith("monai/bundle/__main__.py")
