"""Command-line overrides of ``python -m monai.bundle run``: an unknown id is an error (issue 23).

MONAI adds an override whose id no config file defines as a new, unused id: ``--max_epoch 1`` or
``--lerning_rate 0.5`` ran with the defaults, exit 0. :func:`check_override_ids`, called by
:func:`scripts.validation.validate_options` (the first step of ``initialize`` / ``evaluating``), finds the
``monai.bundle.scripts.run`` call on the stack, reads its ``config_file`` list and its ``override`` keys, and refuses
every key that is not an id of those files, suggesting the closest ids::

    unknown option --max_epoch (no id of configs/train.yaml); did you mean --max_epochs?

A nested id ``a#b#c`` is known when it exists, or when its parent ``a#b`` exists and is a mapping (a new argument of
a component). Options of ``monai.bundle run`` itself (``workflow_type``, ...) are not ids. Opt out with
``--allow_unknown_ids true`` (or the environment variable ``BUNDLE_ALLOW_UNKNOWN_IDS=1``). Called outside
``monai.bundle run`` (a ``ConfigParser`` in Python) it checks nothing.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["RUN_OPTIONS", "bundle_run_call", "config_ids", "unknown_override_ids", "check_override_ids"]

#: keys of ``monai.bundle run``'s ``**override`` that MONAI itself consumes (not config ids), and our own opt-out
RUN_OPTIONS = frozenset(
    {"workflow_type", "workflow_name", "properties_path", "allow_unknown_ids", "bundle_root_check", "args_file"}
)


def bundle_run_call() -> tuple[Any, dict] | None:
    """``(config_file, override)`` of the ``monai.bundle.scripts.run`` call on the stack, or ``None``."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            code = frame.f_code
            if code.co_name == "run" and frame.f_globals.get("__name__") == "monai.bundle.scripts":
                loc = frame.f_locals
                if isinstance(loc.get("override"), Mapping):
                    return loc.get("config_file"), dict(loc["override"])
            frame = frame.f_back
    finally:
        del frame
    return None


def config_ids(content: Any, prefix: str = "") -> dict[str, Any]:
    """Every id (``a``, ``a#b``, ``a#0#c`` ...) of a config mapping, with its value."""
    out: dict[str, Any] = {}
    items: Iterable = content.items() if isinstance(content, Mapping) else enumerate(content)
    for k, v in items:
        i = f"{prefix}{k}"
        out[i] = v
        if isinstance(v, (Mapping, list)):
            out.update(config_ids(v, i + "#"))
    return out


def _suggest(key: str, known: Iterable[str]) -> list[str]:
    known = list(known)
    hits = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    if not hits:
        hits = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return hits


def unknown_override_ids(keys: Iterable[str], ids: Mapping[str, Any]) -> list[str]:
    """One error line per key of ``keys`` that is not an id of ``ids`` (see the module docstring)."""
    top = [i for i in ids if "#" not in i]
    errors = []
    for key in keys:
        key = str(key)
        if key in RUN_OPTIONS or key in ids:
            continue
        parts = key.split("#")
        if len(parts) > 1:
            parent = "#".join(parts[:-1])
            if isinstance(ids.get(parent), Mapping):
                continue  # a new argument of an existing component / mapping
            # the deepest existing ancestor and what it holds
            depth = len(parts) - 1
            while depth > 0 and "#".join(parts[:depth]) not in ids:
                depth -= 1
            base = "#".join(parts[:depth])
            if depth == 0:
                hint = _suggest(parts[0], top)
                hint = [h + "#" + "#".join(parts[1:]) for h in hint]
            else:
                sib = [i for i in ids if i.startswith(base + "#") and i.count("#") == depth]
                hint = _suggest("#".join(parts[: depth + 1]), sib)
            missing = "#".join(parts[: depth + 1])
            errors.append(
                f"unknown option --{key}: no id {missing}"
                + (f"; did you mean --{' or --'.join(hint)}?" if hint else "")
            )
            continue
        hint = _suggest(key, top)
        errors.append(f"unknown option --{key}" + (f"; did you mean --{' or --'.join(hint)}?" if hint else ""))
    return errors


def _flag(v: Any) -> bool:
    """:func:`scripts.utils.as_flag`, an unset / empty value being false."""
    from scripts.utils import as_flag

    return (
        False
        if v is None or (isinstance(v, str) and not v.strip())
        else as_flag(v.strip() if isinstance(v, str) else v)
    )


def check_override_ids() -> list[str]:
    """Error lines for the unknown override ids of the ``monai.bundle run`` call being executed (``[]`` if none or
    outside such a call, or with ``--allow_unknown_ids true`` / ``BUNDLE_ALLOW_UNKNOWN_IDS=1``)."""
    call = bundle_run_call()
    if call is None:
        return []
    config_file, override = call
    if _flag(override.get("allow_unknown_ids", False)) or _flag(os.environ.get("BUNDLE_ALLOW_UNKNOWN_IDS", "")):
        return []
    if not override or config_file is None:
        return []
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_files(config_file)
    except Exception:  # MONAI has read them already; a path it resolved differently: do not guess
        return []
    errors = unknown_override_ids(override, config_ids(content))
    if errors:
        files = config_file if isinstance(config_file, str) else ", ".join(map(str, config_file))
        errors = [e + f" (not an id of {files})" if "did you mean" not in e else e for e in errors]
        errors.append(
            "(an override must name an id of the config files; --allow_unknown_ids true accepts new ids on purpose)"
        )
    return errors
