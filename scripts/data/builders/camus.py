"""CAMUS (Leclerc et al. 2019, 2D echocardiography): the 2- and 4-chamber ED/ES frames, resized to the network grid
(docs/data.md)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.data.builders.io import CAMUS_LABEL_MAP, _check_image, _check_label, _map_labels, _normalise, read_image
from scripts.data.builders.output import (
    _check_splits,
    _find_file,
    _fractions,
    _progress,
    _read_split_file,
    _split_ids,
    _Writer,
    check_out,
)
from scripts.data.contracts import DataError
from scripts.data.datalist import SPLITS

logger = logging.getLogger(__name__)


_CAMUS_PATIENT = re.compile(r"^patient\d{4}$")
CAMUS_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")


def _camus_patients(root: Path) -> dict:
    found = {}
    for base in [root] + sorted(p for p in root.iterdir() if p.is_dir() and not _CAMUS_PATIENT.match(p.name)):
        for p in sorted(base.iterdir()):
            if p.is_dir() and _CAMUS_PATIENT.match(p.name) and p.name not in found:
                found[p.name] = p
    return found


def _resize2d(a: np.ndarray, size: Sequence[int], label: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
    if label:
        r = F.interpolate(t, size=tuple(size), mode="nearest-exact")
        return r[0, 0].numpy().round().astype(np.uint8)
    r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return r[0, 0].numpy()


def _resized_affine(affine: np.ndarray, old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """Affine of an image resampled from ``old`` to ``new`` pixels over the same field of view (pixel centres)."""
    scale = np.ones(3)
    scale[: len(old)] = [o / n for o, n in zip(old, new)]
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = (scale - 1.0) / 2.0
    return affine @ m


def build_camus(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
    fractions: Sequence[float] | str = (0.6, 0.2, 0.2),
    views: Sequence[str] | str = ("2CH", "4CH"),
    spatial_size: Sequence[int] = (128, 128),
    percentiles: Sequence[float] = (0.0, 100.0),
    labels: bool = True,
    keep_atrium: bool = True,
    overwrite: bool = False,
) -> Path:
    """CAMUS, original MHD/RAW release or NIfTI release -> 2D ED->ES pairs per view in ``out``.

    Files ``patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}[_gt].{mhd,nii.gz}`` are found in ``root`` or one folder below
    (``training/``, ``testing/``, ``database_nifti/``). Each frame is resized to ``spatial_size`` (bilinear with
    anti-aliasing for images, nearest for labels) and scaled to [0, 1] after clipping to the ``percentiles`` of the
    ED and ES frames together (default 0-100: min-max, CAMUS is 8-bit). Labels stay 1 LV blood pool (endocardium),
    2 myocardium, 3 left atrium (``keep_atrium=False``: 3 -> 0). ``spacing`` is the pixel size after resizing.

    Split: patients shuffled with ``seed`` by ``fractions`` (60/20/20 = the paper's 300/100/100 of 500 patients),
    or a ``split_file``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CAMUS root folder does not exist.")
    if isinstance(views, str):
        views = [v for v in views.replace(" ", "").split(",") if v]
    views = [str(v).upper() for v in views]
    if not views or set(views) - {"2CH", "4CH"}:
        raise ValueError(f"views must be among ('2CH', '4CH'), got {views}")
    spatial_size = tuple(int(s) for s in spatial_size)
    label_map = dict(CAMUS_LABEL_MAP) if keep_atrium else {**CAMUS_LABEL_MAP, 3: 0}
    check_out(out, [split_file], [root], overwrite)  # before reading anything: never write into the data
    patients = _camus_patients(root)
    if not patients:
        raise DataError(f"{root}: no CAMUS patient folders (patientNNNN) found.")
    splits = (
        _read_split_file(split_file, list(patients))
        if split_file is not None
        else _split_ids(list(patients), _fractions(fractions), seed)
    )
    datalist = {s: [] for s in SPLITS}
    with _Writer(out, overwrite, inputs=[split_file], input_dirs=[root]) as w:
        for split in SPLITS:
            for pid in _progress(splits[split], f"{split} patients"):
                folder = patients[pid]
                for view in views:
                    frames, gts = {}, {}
                    for phase in ("ED", "ES"):
                        stem = f"{pid}_{view}_{phase}"
                        img = _find_file(folder, stem, CAMUS_SUFFIXES)
                        if img is None:
                            raise DataError(f"{folder / stem}.{{mhd,nii.gz}}: missing {phase} frame of view {view}.")
                        frames[phase] = read_image(img, ndim=2, what="image")
                        _check_image(frames[phase])
                        if labels:
                            gt = _find_file(folder, stem + "_gt", CAMUS_SUFFIXES)
                            if gt is None:
                                raise DataError(
                                    f"{folder / stem}_gt.{{mhd,nii.gz}}: missing {phase} label of view "
                                    f"{view} (labels were asked for; pass labels=False to go without)."
                                )
                            gts[phase] = read_image(gt, ndim=2, what="label")
                            _check_label(gts[phase], frames[phase], CAMUS_LABEL_MAP)
                    ed, es = frames["ED"], frames["ES"]
                    if ed.array.shape != es.array.shape:
                        raise DataError(
                            f"{es.path}: ES shape {es.array.shape} differs from ED shape "
                            f"{ed.array.shape} ({ed.path.name})."
                        )
                    old = ed.array.shape
                    mov, fix = _normalise(
                        [_resize2d(ed.array, spatial_size, False), _resize2d(es.array, spatial_size, False)],
                        percentiles,
                    )
                    affine = _resized_affine(ed.affine, old, spatial_size)
                    cid = f"{pid}_{view}"
                    item = {
                        "id": cid,
                        "patient": pid,
                        "moving": w.nifti(f"{pid}/{cid}_ED.nii.gz", mov, affine),
                        "fixed": w.nifti(f"{pid}/{cid}_ES.nii.gz", fix, affine),
                    }
                    if labels:
                        for key, ph in (("moving_label", "ED"), ("fixed_label", "ES")):
                            lab = _map_labels(_resize2d(gts[ph].array, spatial_size, True), label_map)
                            item[key] = w.nifti(f"{pid}/{cid}_{ph}_label.nii.gz", lab, affine, label=True)
                    item["spacing"] = [float(s) * o / n for s, o, n in zip(ed.spacing, old, spatial_size)]
                    datalist[split].append(item)
        _check_splits(datalist, split_file or root)
        info = {
            "dataset": "camus",
            "root": str(root.absolute()),
            "seed": seed,
            "split_file": split_file,
            "fractions": fractions,
            "views": views,
            "spatial_size": spatial_size,
            "percentiles": list(percentiles),
            "label_map": label_map,
            "patients": splits,
            "pairs": {s: len(v) for s, v in datalist.items()},
        }
        path = w.commit(datalist, info)
    logger.info("CAMUS datalist %s: %s", path, info["pairs"])
    return path


# ----------------------------------------------------------------------------------------------------------------------
# generic pairs
# ----------------------------------------------------------------------------------------------------------------------
