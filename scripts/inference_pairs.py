"""Inference inputs: the pairs to register and the options of ``configs/inference.yaml``.

- :func:`make_pairs`: one pair from ``--moving`` / ``--fixed`` (+ labels) or every item of a datalist, ids sanitised
  and made unique;
- :func:`pair_preprocessing`: the loading step (MONAI ``LoadImaged`` + ``EnsureChannelFirstd``);
- :func:`flag_option` / :func:`int_option` / :func:`positive_float_option`: command-line values (strings such as
  ``'true'``, ``'4'``) as bools / whole numbers / numbers, with errors naming the option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from scripts.data import DataError, datalist_path, load_datalist
from scripts.data.contracts import safe_id
from scripts.utils import as_flag

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "PAIR_KEYS",
    "make_pairs",
    "pair_preprocessing",
    "flag_option",
    "int_option",
    "positive_float_option",
]

IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
PAIR_KEYS = IMAGE_KEYS + LABEL_KEYS


def flag_option(value: Any, option: str) -> bool:
    """``value`` as a bool (:func:`scripts.utils.as_flag`), with an error naming ``--option``."""
    try:
        return as_flag(value)
    except ValueError:
        raise ValueError(f"--{option}: expected true or false, got {value!r}.") from None


def int_option(value: Any, option: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as a whole number >= ``minimum`` (``'4'`` and ``4.0`` accepted; ``allow_none``: null too)."""
    if allow_none and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    try:
        v = float(value)
        ok = np.isfinite(v) and v == int(v) and v >= minimum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(
            f"--{option}: expected a whole number >= {minimum}{' or null' if allow_none else ''}, got {value!r}."
        )
    return int(v)


def positive_float_option(value: Any, option: str) -> float:
    """``value`` as a finite number > 0."""
    try:
        v = float(value)
        ok = bool(np.isfinite(v) and v > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--{option}: expected a finite number > 0, got {value!r}.")
    return v


def make_pairs(
    moving: str | None = None,
    fixed: str | None = None,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    datalist: str | None = None,
    split: str = "test",
    pair_id: str | None = None,
) -> list[dict]:
    """The pairs to register: one pair from ``moving``/``fixed`` (+ labels), or every item of ``datalist``.

    ``datalist`` is a JSON file (or a folder holding ``datalist.json``) that is either a list of items
    ``{"moving", "fixed"[, "moving_label", "fixed_label", "id"]}`` or a bundle datalist with splits (``split``
    is used). Relative paths are relative to the JSON file. Ids are sanitised (:func:`scripts.data.contracts.safe_id`:
    ``../x`` becomes ``x``, ``a/b`` becomes ``a_b``; a warning says so) and made unique (``_1``, ``_2``). Each item
    keeps the datalist it came from under ``"datalist"`` (an input the output folder must not contain).
    """
    items: list[dict] = []
    if datalist:
        path = datalist_path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"--datalist {datalist}: datalist not found ({path}).")
        try:
            with open(path) as f:
                content = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: --datalist is not valid JSON ({e}).") from None
        if isinstance(content, list):
            base = path.parent
            for i, it in enumerate(content):
                if not isinstance(it, Mapping) or "moving" not in it or "fixed" not in it:
                    raise DataError(f"{path}: item {i} needs 'moving' and 'fixed'.")
                it = dict(it)
                for k in PAIR_KEYS:
                    if it.get(k):
                        if not isinstance(it[k], str):
                            raise DataError(f"{path}: item {i} '{k}' must be a path (string), got {it[k]!r}.")
                        p = Path(it[k])
                        it[k] = str(p if p.is_absolute() else base / p)
                it["datalist"] = str(path)
                items.append(it)
        elif isinstance(content, Mapping):
            items = [dict(it, datalist=str(path)) for it in load_datalist(path, split, check_files=False)]
        else:
            raise DataError(f"{path}: --datalist must be a JSON list of pairs or a datalist with splits.")
    if moving is not None or fixed is not None:
        if moving is None or fixed is None:
            raise ValueError("give both --moving and --fixed (or --datalist).")
        items.append(
            {
                "moving": str(moving),
                "fixed": str(fixed),
                "moving_label": moving_label,
                "fixed_label": fixed_label,
                "id": pair_id,
            }
        )
    if not items:
        raise ValueError("nothing to register: give --moving M --fixed F or --datalist pairs.json.")
    seen: dict[str, int] = {}
    for it in items:
        raw = it.get("id")
        name = safe_id(raw, "pair id") if raw not in (None, "") else safe_id(Path(str(it["fixed"])).name.split(".")[0])
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        it["id"] = name
    return items


def pair_preprocessing(keys: Sequence[str] = PAIR_KEYS) -> Compose:
    """Loading step of inference (MONAI transforms): read the files, channel first. The remaining steps (checks,
    intensity scaling, resizing) need the per-pair bookkeeping of :class:`RegistrationInferer`."""
    return Compose(
        [
            LoadImaged(list(keys), image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(list(keys), allow_missing_keys=True),
        ]
    )
