"""Any list of paired files (CSV or JSON of moving / fixed [/ labels]) into a datalist (docs/data.md)."""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from scripts.data.builders.io import DataWarning, _check_image, _check_label, _normalise, read_image
from scripts.data.builders.output import _check_splits, _fractions, _progress, _rel, _split_ids, _Writer, check_out
from scripts.data.contracts import LABEL_SET, DataError, check_geometry, safe_id
from scripts.data.datalist import SPLITS

logger = logging.getLogger(__name__)


_PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label")


def _read_pair_list(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: pair list not found.")
    try:
        if path.suffix.lower() == ".json":
            with open(path) as f:
                rows = json.load(f)
            if isinstance(rows, dict) and "pairs" in rows:
                rows = rows["pairs"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: a JSON pair list must be a list of objects with 'moving' and 'fixed'.")
        else:
            with open(path, newline="") as f:
                rows = [dict(r) for r in csv.DictReader(f)]
    except DataError:
        raise
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable pair list ({e}).") from None
    if not rows:
        raise DataError(f"{path}: the pair list is empty.")
    for i, r in enumerate(rows):
        missing = [k for k in ("moving", "fixed") if not r.get(k)]
        if missing:
            raise DataError(
                f"{path}: row {i + 1} has no {missing} (header must be moving,fixed[,moving_label," "fixed_label])."
            )
    return rows


def _parse_label_values(label_values) -> tuple:
    if isinstance(label_values, str):
        label_values = [v for v in label_values.replace("[", "").replace("]", "").replace(" ", "").split(",") if v]
    try:
        values = tuple(sorted({int(v) for v in label_values}))
    except (TypeError, ValueError):
        raise ValueError(f"label_values must be a list of integers, got {label_values!r}") from None
    if not values or values[0] < 0 or values[-1] > 255:
        raise ValueError(f"label_values must be integers in [0, 255] (labels are stored as uint8), got {values}")
    return values


def build_pairs(
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    split: Sequence[float] | str = (0.6, 0.2, 0.2),
    labels: bool | None = None,
    copy: bool = False,
    percentiles: Sequence[float] = (0.5, 99.5),
    spatial_dims: int | None = None,
    label_values: Sequence[int] | str = LABEL_SET,
    overwrite: bool = False,
) -> Path:
    """A CSV (``moving,fixed[,moving_label,fixed_label][,id][,split]``) or JSON list of such objects -> datalist.

    Paths in the list are relative to the list's folder (or absolute); NIfTI, MHD/MHA or NRRD, 2D or 3D. Every file is
    read and checked before anything is written: readable, finite, not constant; moving and fixed on the same grid
    (shape, spacing, direction and origin, :func:`scripts.data.contracts.check_geometry`; a mismatch is an error naming both
    files); labels on their image's grid with values in ``label_values`` (default the project's 0-3). ``copy=False``
    (default): the datalist references the original files (train with ``intensity: percentile``); ``copy=True``:
    normalised float32 NIfTI copies (percentile clip, [0, 1]) and uint8 label copies in the input's own geometry
    (same affine). In both cases outputs can be written back in the input's space. ``labels``: ``None`` uses labels
    where listed, ``True`` requires them for every pair, ``False`` ignores them.

    Ids (``id`` column, else ``NNNN_<fixed file stem>``) become file names: characters other than letters, digits,
    ``._-`` are replaced (:func:`scripts.data.contracts.safe_id`, a :class:`DataWarning` says so); two rows with the same
    id, or listing the same moving and fixed files, are an error. ``out`` must not be or contain any listed file (see
    :func:`check_out`).

    Split: ``split`` = three fractions (seeded shuffle), or a split name (``"test"``: all pairs to test); a ``split``
    column in the list overrides both per row.
    """
    list_path = Path(pairs)
    rows = _read_pair_list(list_path)
    base = list_path.parent
    allowed_labels = _parse_label_values(label_values)
    fixed_split = None
    if isinstance(split, str) and split.strip() in SPLITS:
        fixed_split = split.strip()
    else:
        fractions = _fractions(split)
    row_paths = []
    for i, r in enumerate(rows):
        paths = {}
        for k in _PAIR_KEYS:
            v = r.get(k)
            if v is None or str(v).strip() == "" or (k in ("moving_label", "fixed_label") and labels is False):
                continue
            p = Path(str(v).strip())
            paths[k] = p if p.is_absolute() else base / p
        row_paths.append(paths)
    seen_pairs: dict[tuple[Path, Path], int] = {}
    for i, paths in enumerate(row_paths):  # one pair twice: counted twice in every statistic, or in two splits
        pair = (paths["moving"].resolve(), paths["fixed"].resolve())
        if pair in seen_pairs:
            raise DataError(
                f"{list_path}: rows {seen_pairs[pair] + 1} and {i + 1} list the same pair (moving {pair[0]}, fixed "
                f"{pair[1]}); list each pair once."
            )
        seen_pairs[pair] = i
    inputs = [list_path] + [p for paths in row_paths for p in paths.values()]
    check_out(out, inputs, (), overwrite)  # before reading the images: the output never holds an input
    ids, seen_dims = [], set()
    checked = []
    for i, (r, paths) in enumerate(zip(rows, row_paths)):
        where = f"{list_path} row {i + 1}"
        if labels and not all(k in paths for k in ("moving_label", "fixed_label")):
            raise DataError(f"{where}: labels were asked for but 'moving_label'/'fixed_label' is missing.")
        allowed = None if spatial_dims is None else int(spatial_dims)
        vols = {}
        for k, p in paths.items():
            is_label = k.endswith("label")
            vols[k] = read_image(p, ndim=allowed, what="label" if is_label else "image")
            if not is_label:
                _check_image(vols[k])
        mov, fix = vols["moving"], vols["fixed"]
        if mov.array.shape != fix.array.shape:
            raise DataError(
                f"{fix.path}: fixed shape {fix.array.shape} differs from moving shape "
                f"{mov.array.shape} ({mov.path.name}), {where}."
            )
        try:
            check_geometry(
                mov.affine,
                fix.affine,
                [mov.path, fix.path],
                moving_shape=mov.array.shape,
                fixed_shape=fix.array.shape,
                resample_allowed=False,
            )
        except DataError as e:
            raise DataError(f"{e} ({where}; training registers moving and fixed on one grid)") from None
        for k, img in (("moving_label", mov), ("fixed_label", fix)):
            if k in vols:
                _check_label(vols[k], img, allowed_labels, key=k)
        seen_dims.add(mov.array.ndim)
        if len(seen_dims) > 1:
            raise DataError(
                f"{mov.path}: {mov.array.ndim}D pair in a list of {sorted(seen_dims)}D pairs ({where}); "
                "a datalist holds one dimensionality."
            )
        raw_id = str(r.get("id") or "").strip() or f"{i:04d}_{fix.path.name.split('.')[0]}"
        rid = safe_id(raw_id, what=f"{where}: id")
        if rid != raw_id:
            warnings.warn(
                f"{where}: id {raw_id!r} is used as a file name: changed to {rid!r}.", DataWarning, stacklevel=2
            )
        if rid in ids:
            raise DataError(f"{where}: duplicate id {rid!r}" + (f" (from {raw_id!r})." if rid != raw_id else "."))
        ids.append(rid)
        rsplit = str(r.get("split") or "").strip() or None
        if rsplit is not None and rsplit not in SPLITS:
            raise DataError(f"{where}: split {rsplit!r} is not one of {list(SPLITS)}.")
        checked.append((rid, rsplit, paths, vols))
    # assign splits
    assign = {}
    free = [rid for rid, rsplit, _, _ in checked if rsplit is None]
    if fixed_split is not None:
        assign.update({rid: fixed_split for rid in free})
    else:
        for s, members in _split_ids(free, fractions, seed).items():
            assign.update({rid: s for rid in members})
    assign.update({rid: rs for rid, rs, _, _ in checked if rs is not None})
    datalist = {s: [] for s in SPLITS}
    with _Writer(out, overwrite, inputs=inputs) as w:
        out_final = w.out
        for rid, _, paths, vols in _progress(checked, "pairs"):
            item = {"id": rid}
            if copy:
                mn, fn = (
                    _normalise([vols["moving"].array], percentiles)[0],
                    _normalise([vols["fixed"].array], percentiles)[0],
                )
                item["moving"] = w.nifti(f"pairs/{rid}_moving.nii.gz", mn, vols["moving"].affine)
                item["fixed"] = w.nifti(f"pairs/{rid}_fixed.nii.gz", fn, vols["fixed"].affine)
                for k in ("moving_label", "fixed_label"):
                    if k in vols:
                        item[k] = w.nifti(f"pairs/{rid}_{k}.nii.gz", vols[k].array, vols[k].affine, label=True)
            else:
                for k, p in paths.items():
                    item[k] = _rel(p.absolute(), out_final)
            item["spacing"] = [float(s) for s in vols["fixed"].spacing]
            datalist[assign[rid]].append(item)
        if fixed_split is not None:
            _check_splits(datalist, list_path, required=(fixed_split,))
        else:
            _check_splits(datalist, list_path, required=[s for s, f in zip(SPLITS, fractions) if f > 0])
        info = {
            "dataset": "pairs",
            "pairs_file": str(list_path.absolute()),
            "seed": seed,
            "split": split,
            "copy": copy,
            "percentiles": list(percentiles) if copy else None,
            "label_values": list(allowed_labels),
            "pairs": {s: len(v) for s, v in datalist.items()},
        }
        path = w.commit(datalist, info)
    logger.info("pairs datalist %s: %s", path, info["pairs"])
    return path
