"""Datalists: the ``datalist.json`` format, its keys and splits, and a dataset that survives one bad pair.

The data contract (docs/CONTRACTS.md): a dataset folder holds ``datalist.json`` with ``training`` / ``validation`` /
``test`` lists of items ``{"moving", "fixed"[, "moving_label", "fixed_label", "ddf", "noise_std", "moving_noise_std",
"residual_std", ...]}``; paths are
relative to the JSON file. Registration warps ``moving`` (ED) onto ``fixed`` (ES).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import Dataset, list_data_collate

from scripts.data.contracts import DataError, not_a_file

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
# phantom ground truth maps (version 2 adds the moving frame's noise std and the residual's RMS / mean over noise
# draws of both frames at the true displacement: docs/phantom.md)
PHANTOM_IMAGE_KEYS = ("noise_std", "moving_clean", "fixed_clean", "moving_noise_std", "residual_std", "residual_mean")
FIELD_KEYS = ("ddf",)
PATH_KEYS = IMAGE_KEYS + LABEL_KEYS + PHANTOM_IMAGE_KEYS + FIELD_KEYS
# what a registration pair carries through transforms and engines (the engines' BATCH_KEYS, docs/CONTRACTS.md)
PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std", "moving_noise_std", "residual_std")
SPLITS = ("training", "validation", "test")
DATALIST_NAME = "datalist.json"


# ------------------------------------------------------------------------------------- one bad pair, not the run
FAILED_KEY = "failed_items"


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of MONAI's "applying transform ..." chain: the one that names the file."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


class TolerantDataset(Dataset):
    """A MONAI ``Dataset`` whose bad items do not stop the run (evaluation over many pairs).

    An item whose transform raises becomes ``{"id": <case>, "failed": "<Error>: <message naming the file>"}`` (the
    error is logged); :func:`tolerant_collate` moves those into the batch's ``failed_items`` list of
    ``(id, message)``, the evaluator skips them, the results writer records them as failed rows and the run ends with
    an error that lists them, after every other pair has been evaluated. ``fail_fast=True`` re-raises at once.
    """

    def __init__(self, data: Sequence, transform=None, fail_fast: bool = False) -> None:
        super().__init__(data=data, transform=transform)
        self.fail_fast = bool(fail_fast)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            item = self.data[index]
            case = str(item.get("id", f"case{index:04d}")) if isinstance(item, Mapping) else f"case{index:04d}"
            cause = _root_cause(e)
            msg = f"{type(cause).__name__}: {cause}"
            if self.fail_fast:
                raise DataError(f"pair {case}: {msg}") from e
            logger.error("pair %s failed and is skipped: %s", case, msg)
            return {"id": case, "failed": msg}


def tolerant_collate(batch: Sequence[Mapping]) -> dict:
    """``list_data_collate`` of the good items, plus ``failed_items``: ``(id, message)`` of the failed ones."""
    failed = [(b["id"], b["failed"]) for b in batch if "failed" in b]
    ok = [b for b in batch if "failed" not in b]
    out = dict(list_data_collate(ok)) if ok else {}
    out[FAILED_KEY] = failed
    return out


def datalist_path(dataset: str | os.PathLike) -> Path:
    """``dataset`` is a datalist JSON or a folder that holds ``datalist.json``."""
    p = Path(dataset)
    return p if p.suffix == ".json" else p / DATALIST_NAME


def prepare_dataset(dataset_dir: str | os.PathLike, phantom: Mapping | None = None) -> str:
    """Return the datalist of ``dataset_dir``; write the built-in phantom there first if the folder is empty.

    Args:
        dataset_dir: a folder holding ``datalist.json`` (or the JSON file itself).
        phantom: keyword arguments of :func:`scripts.data.phantom.write_dataset`; ``None`` means "never generate".
    """
    path = datalist_path(dataset_dir)
    if path.is_file():
        return str(path)
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"dataset_dir {dataset_dir}: a file, not a folder; give the folder that holds {DATALIST_NAME} (or the "
            "datalist .json itself)."
        )
    if isinstance(phantom, str) and phantom.strip().lower() in ("none", "null", "false", ""):
        phantom = None  # from the command line: --phantom None
    if phantom is None:
        raise DataError(
            f"{path}: no datalist found and phantom generation is disabled (phantom: null; on the command line "
            "`--phantom null`)."
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise DataError(
            f"{folder}: folder is not empty but has no {DATALIST_NAME}; refusing to write the phantom over it. "
            "Point dataset_dir at an empty folder or at a folder made by `python -m bundle phantom/datalist`."
        )
    from scripts.data.phantom import write_dataset

    n = sum(int(dict(phantom).get(k, 0) or 0) for k in ("n_train", "n_val", "n_test"))
    logger.info(
        "dataset_dir %s is empty: writing the built-in phantom there once (%s; %d pairs, ~0.5 MB per 128x128 pair; "
        "a few minutes)",
        folder,
        dict(phantom),
        n,
    )
    written = write_dataset(str(folder), **dict(phantom))
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    logger.info("phantom written: %s (%.0f MB); later runs read it from there", written, size / 2**20)
    return str(written)


#: largest voxel spacing (mm) accepted from a datalist: anything larger is a unit or typing error
MAX_SPACING_MM = 1000.0


def check_spacing(value, where: str) -> list[float]:
    """A datalist ``spacing``: a list of 2 or 3 finite numbers in (0, :data:`MAX_SPACING_MM`] mm (strings, booleans
    refused); returns it as floats, else a :class:`DataError` naming ``where`` and the value."""
    import math
    import numbers

    ok = (
        isinstance(value, (list, tuple))
        and len(value) in (2, 3)
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    )
    if ok:
        ok = all(math.isfinite(float(v)) and 0.0 < float(v) <= MAX_SPACING_MM for v in value)
    if not ok:
        raise DataError(
            f"{where}: spacing must be a list of 2 or 3 finite numbers in (0, {MAX_SPACING_MM:g}] mm (one per "
            f"spatial axis), got {value!r}."
        )
    return [float(v) for v in value]


def load_datalist(path: str | os.PathLike, split: str, check_files: bool = True) -> list[dict]:
    """Read one split of a datalist JSON, with paths made absolute (relative paths are relative to the JSON).

    Raises :class:`DataError` naming the file for an unreadable JSON, a missing or empty split, items without
    ``moving``/``fixed``, files that do not exist and a ``spacing`` that is not 2 or 3 positive finite numbers.
    """
    from scripts.data.contracts import safe_id

    path = datalist_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: datalist not found.") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e}); an interrupted write? rebuild it with "
            "`python -m bundle datalist` or `python -m bundle phantom`."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text JSON file ({e}).") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the datalist ({type(e).__name__}: {e.strerror or e}).") from None
    if not isinstance(content, dict):
        raise DataError(
            f"{path}: a datalist is a JSON object with the splits {list(SPLITS)}, got a " f"{type(content).__name__}."
        )
    if split not in content:
        raise DataError(f"{path}: no '{split}' split (has: {sorted(content)}).")
    items = content[split]
    if not isinstance(items, list):
        raise DataError(f"{path}: split '{split}' must be a list of items, got a {type(items).__name__}.")
    if not items:
        raise DataError(f"{path}: split '{split}' is empty.")
    base = path.parent
    out, ids = [], {}
    for i, item in enumerate(items):
        where = f"{path} ('{split}' item {i})"
        if not isinstance(item, dict):
            raise DataError(
                f'{where}: an item is an object {{"moving": ..., "fixed": ...}}, got '
                f"{type(item).__name__} {str(item)[:60]!r}."
            )
        missing = [k for k in IMAGE_KEYS if not item.get(k)]
        if missing:
            raise DataError(f"{path}: item {i} of '{split}' has no {missing}.")
        item = dict(item)
        for k in PATH_KEYS:
            if k in item and item[k] is not None:
                if not isinstance(item[k], str) or not item[k].strip():
                    raise DataError(f"{where}: key '{k}' must be a file path (a string), got {item[k]!r}.")
                p = Path(item[k])
                p = p if p.is_absolute() else base / p
                what = not_a_file(p) if check_files else None
                if what:
                    raise DataError(f"{p}: file listed in {path} ('{split}' item {i}, key '{k}') {what}.")
                item[k] = str(p)
        if "spacing" in item and item["spacing"] is not None:  # mm metrics use it: checked here, not trusted
            item["spacing"] = check_spacing(item["spacing"], f"{where}, key 'spacing'")
        if item.get("id") not in (None, ""):  # ids become file names (results, panels): never a path
            item["id"] = safe_id(item["id"], what=f"{where}: id")
            if item["id"] in ids:
                raise DataError(f"{where}: duplicate id {item['id']!r} (also item {ids[item['id']]}).")
        else:
            stem = safe_id(Path(item["fixed"]).name.split(".")[0], what=f"{where}: id")
            item["id"] = stem if stem not in ids else f"{i:04d}_{stem}"
        ids[item["id"]] = i
        out.append(item)
    return out
