"""Validation of the configs' options, run first when a config is parsed (before any folder or event file is written).

``configs/train.yaml`` lists the options it checks in ``checked_options`` (``evaluate.yaml`` adds its own in
``extra_checked_options``) and calls :func:`validate_options` as the first step of ``initialize`` / ``training`` /
``run`` (``evaluating``). Every numeric option must be a real number (not a string: ``--learning_rate nan`` arrives
as the string ``'nan'``; ``1e-4`` in YAML 1.1 without a dot is a string too), finite and in its range; all problems
are reported together, one line each, in a :class:`ConfigError`::

    invalid option(s) (configs: override them on the command line, e.g. --learning_rate 0.0001):
      learning_rate must be a finite number > 0, got 'nan'
      max_epochs must be an integer >= 1, got 0

The rules (:data:`RULES`) are keyed by option name, so the check does not depend on the order or the merge of the
config files; an option listed without a rule is only checked to be finite, with a warning (add its rule here).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ConfigError", "RULES", "check_option", "validate_options"]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config option with an invalid value: the message names the option, the rule and the value."""


# ---------------------------------------------------------------------------------------------------------- rules
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _got(v: Any) -> str:
    if isinstance(v, str):
        try:
            float(v)
            hint = " (a string: pass a plain number; in YAML write 1.0e-4, not 1e-4)" if math.isfinite(float(v)) else ""
        except ValueError:
            hint = ""
        return f"got {v!r}{hint}"
    return f"got {v!r}"


def real(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False, none: bool = False
) -> Callable[[str, Any], str | None]:
    """A finite real number in the interval (``lo_open`` / ``hi_open``: strict bounds); ``none``: ``null`` allowed."""
    parts = []
    if lo is not None and hi is not None:
        parts.append(f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    elif lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    elif hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    rule = "a finite number" + (" " + parts[0] if parts else "") + (" or null" if none else "")

    def check(name: str, v: Any) -> str | None:
        if v is None and none:
            return None
        if not _is_real(v) or not math.isfinite(float(v)):
            return f"{name} must be {rule}, {_got(v)}"
        x = float(v)
        if lo is not None and (x < lo or (lo_open and x == lo)):
            return f"{name} must be {rule}, {_got(v)}"
        if hi is not None and (x > hi or (hi_open and x == hi)):
            return f"{name} must be {rule}, {_got(v)}"
        return None

    return check


def integer(lo: int | None = None, hi: int | None = None, none: bool = False) -> Callable[[str, Any], str | None]:
    """An integer in [lo, hi] (bools and floats such as 2.0 are refused); ``none``: ``null`` allowed."""
    if lo is not None and hi is not None:
        rule = f"an integer in [{lo}, {hi}]"
    elif lo is not None:
        rule = f"an integer >= {lo}"
    else:
        rule = "an integer"
    rule += " or null" if none else ""

    def check(name: str, v: Any) -> str | None:
        if v is None and none:
            return None
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"{name} must be {rule}, {_got(v)}"
        return None

    return check


def sizes(lo: int = 1, length: Sequence[int] = (2, 3)) -> Callable[[str, Any], str | None]:
    """A list of ``length`` integers >= ``lo`` (e.g. a spatial size)."""

    def check(name: str, v: Any) -> str | None:
        if not isinstance(v, (list, tuple)) or len(v) not in length or not all(_is_int(s) and s >= lo for s in v):
            return f"{name} must be a list of {' or '.join(map(str, length))} integers >= {lo}, {_got(v)}"
        return None

    return check


def epoch_list() -> Callable[[str, Any], str | None]:
    """A list (possibly empty) of increasing integers >= 1 (epochs)."""

    def check(name: str, v: Any) -> str | None:
        if not isinstance(v, (list, tuple)) or not all(_is_int(s) and s >= 1 for s in v) or list(v) != sorted(v):
            return f"{name} must be a list of increasing epochs >= 1, {_got(v)}"
        return None

    return check


def reals(lo: float = 0.0, lo_open: bool = True, length: Sequence[int] = (2, 3), none: bool = False):
    """A list of ``length`` finite numbers > ``lo`` (``lo_open``) or >= ``lo`` (e.g. a spacing in mm)."""
    one = real(lo, lo_open=lo_open)

    def check(name: str, v: Any) -> str | None:
        if v is None and none:
            return None
        if not isinstance(v, (list, tuple)) or len(v) not in length or any(one(name, s) for s in v):
            return (
                f"{name} must be {'null or ' if none else ''}a list of {' or '.join(map(str, length))} finite "
                f"numbers {'>' if lo_open else '>='} {lo:g}, {_got(v)}"
            )
        return None

    return check


def percentile_pair() -> Callable[[str, Any], str | None]:
    """Two percentiles ``[lo, hi]`` with 0 <= lo < hi <= 100."""

    def check(name: str, v: Any) -> str | None:
        ok = (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(_is_real(x) and math.isfinite(x) for x in v)
            and 0 <= v[0] < v[1] <= 100
        )
        return None if ok else f"{name} must be two percentiles [lo, hi] with 0 <= lo < hi <= 100, {_got(v)}"

    return check


def choice(values: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[str, Any], str | None]:
    """One of ``values`` (or of ``values()``, read lazily from the module that defines them)."""

    def check(name: str, v: Any) -> str | None:
        allowed = tuple(values() if callable(values) else values)
        return None if v in allowed else f"{name} must be one of {list(allowed)}, {_got(v)}"

    return check


def flag() -> Callable[[str, Any], str | None]:
    """A boolean (``true``/``false``, also as a command-line string, ``1``/``0`` or ``null``)."""

    def check(name: str, v: Any) -> str | None:
        from scripts.utils import as_flag  # lazy: this module imports neither torch nor MONAI

        try:
            as_flag(v)
        except (ValueError, TypeError):
            return f"{name} must be true or false, {_got(v)}"
        return None

    return check


def _modes():
    from scripts.trainer import MODES

    return MODES


def _variance_sources():
    from scripts.trainer import VARIANCE_SOURCES

    return VARIANCE_SOURCES


def _label_protocols():
    from scripts.evaluator import LABEL_PROTOCOLS

    return LABEL_PROTOCOLS


def _normalizations():
    from scripts.losses import NORMALIZATIONS

    return NORMALIZATIONS


def _intensities():
    from scripts.data.contracts import INTENSITY_POLICIES

    return INTENSITY_POLICIES


#: option name -> check(name, value) returning an error line or None
RULES: dict[str, Callable[[str, Any], str | None]] = {
    # optimisation
    "learning_rate": real(0.0, lo_open=True),
    "variance_learning_rate": real(0.0, lo_open=True),
    "lr_milestones": epoch_list(),
    "lr_decay": real(0.0, 1.0, lo_open=True),
    "max_epochs": integer(1),
    "epoch_length": integer(1, none=True),
    "batch_size": integer(1),
    "val_interval": integer(1),
    "val_max_pairs": integer(1, none=True),
    "num_workers": integer(0),
    "seed": integer(0, 2**32 - 1),
    "cache_rate": real(0.0, 1.0),
    "log_every": integer(1),
    "tensorboard_every": integer(1),
    # losses (Eq. 4, Eq. 5)
    "gamma": real(0.0),
    "beta": real(0.0, 1.0),
    "lambda_reg": real(0.0),
    "snr_form": choice(("variance", "std")),
    "snr_normalization": choice(_normalizations),
    "snr_percentiles": percentile_pair(),
    "snr_clip": real(0.0, lo_open=True),
    # collaborative schedule
    "mode": choice(_modes),
    "variance_source": choice(_variance_sources),
    "channels_last": flag(),
    "compile": flag(),
    "variance_every": integer(1),
    "disp_warmup_epochs": integer(0),
    "var_warmup_epochs": integer(0),
    "variance_level_init_batches": integer(0),
    "reuse_warped": flag(),
    "couple_variance_grad": flag(),
    "snr_use_fixed": flag(),
    "amp": flag(),
    "resume": flag(),
    "overwrite": flag(),
    # data
    "spatial_dims": integer(2, 3),
    "spatial_size": sizes(1),
    "intensity": choice(_intensities),
    # evaluation (configs/evaluate.yaml)
    "eval_split": choice(("training", "validation", "test")),
    "eval_label": integer(0),
    "label": integer(0),
    "label_protocol": choice(_label_protocols),
    "eval_spacing": reals(0.0, none=True),
    "eval_batch_size": integer(1),
    "eval_num_workers": integer(0),
    "eval_fail_fast": flag(),
    "sparsification_steps": integer(1),
    "ence_bins": integer(1),
    "n_panels": integer(0),
    # inference (configs/inference.yaml): test-time instance optimisation
    "instance_steps": integer(0),
    "instance_lr": real(0.0, lo_open=True),
    "instance_mode": choice(("field", "weights")),
    "instance_grid": integer(2),
    "instance_field_lr": real(0.0, lo_open=True),
    "instance_weight": choice(("mse", "snr")),
    "instance_field_lambda": real(0.0),
}


def check_option(name: str, value: Any) -> str | None:
    """The error line for one option (``None`` when valid).

    An option without a rule in :data:`RULES` only has to be finite when it is a number (and a warning asks for its
    rule; tests/test_bad_inputs.py fails until it has one).
    """
    if name not in RULES:
        logger.warning("option %r has no rule in scripts.validation.RULES: only checked to be finite", name)
        if _is_real(value) and not math.isfinite(float(value)):
            return f"{name} must be a finite number, {_got(value)}"
        return None
    return RULES[name](name, value)


def validate_options(*options: Mapping[str, Any] | None) -> bool:
    """Check every option of the given mappings (merged left to right) against :data:`RULES`.

    Cross-checks: ``len(spatial_size) == spatial_dims``; ``eval_spacing`` has ``spatial_dims`` entries. Inside
    ``monai.bundle run``, an override whose id no config file defines is an error suggesting the closest id
    (:mod:`scripts.overrides`; ``--allow_unknown_ids true`` to accept one on purpose).

    Returns ``True``; raises :class:`ConfigError` listing every invalid option (one line each).
    """
    merged: dict[str, Any] = {}
    for o in options:
        merged.update(dict(o or {}))
    errors = [e for e in (check_option(k, v) for k, v in merged.items()) if e]
    from scripts.overrides import check_override_ids  # lazy (MONAI): misspelt ids of `monai.bundle run`

    unknown = check_override_ids()
    dims = merged.get("spatial_dims")
    if _is_int(dims) and dims in (2, 3):
        for key in ("spatial_size", "eval_spacing"):
            v = merged.get(key)
            if isinstance(v, (list, tuple)) and len(v) != dims and not any(e.startswith(key + " ") for e in errors):
                errors.append(f"{key} must have spatial_dims = {dims} entries, got {list(v)!r}")
    if unknown:
        msg = "\n  ".join(unknown + errors)
        logger.error(msg)
        raise ConfigError(msg)
    if errors:
        example = errors[0].split(" ", 1)[0]
        msg = (
            "invalid option(s) (override them in the config or on the command line, e.g. "
            f"--{example} <value>):\n  " + "\n  ".join(errors)
        )
        logger.error(msg)  # MONAI wraps the exception of a config expression: say it plainly first
        raise ConfigError(msg)
    return True
