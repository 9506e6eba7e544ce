"""ACDC (Bernard et al. 2018, 2D cine MRI): ED/ES frames from ``Info.cfg``, myocardium-centred crops of every slice
(docs/data.md)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.data.builders.io import (
    ACDC_LABEL_MAP,
    NIFTI_SUFFIXES,
    _check_image,
    _check_label,
    _map_labels,
    _normalise,
    _warn,
    read_image,
)
from scripts.data.builders.output import (
    _check_splits,
    _find_file,
    _progress,
    _read_split_file,
    _split_ids,
    _Writer,
    check_out,
)
from scripts.data.contracts import DataError
from scripts.data.datalist import SPLITS

logger = logging.getLogger(__name__)


_ACDC_PATIENT = re.compile(r"^patient\d{3}$")


def _parse_info_cfg(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: Info.cfg not found (needed for the ED / ES frame numbers).")
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    for key in ("ED", "ES"):
        try:
            info[key] = int(float(info[key]))
        except KeyError:
            raise DataError(f"{path}: no '{key}:' line (the {key} frame number).") from None
        except ValueError:
            raise DataError(f"{path}: '{key}: {info[key]}' is not a frame number.") from None
        if info[key] < 1:
            raise DataError(f"{path}: {key} frame {info[key]} is not a 1-based frame number.")
    if "NbFrame" in info:
        try:
            nb = int(float(info["NbFrame"]))
        except ValueError:
            nb = None
        for key in ("ED", "ES"):
            if nb is not None and info[key] > nb:
                raise DataError(f"{path}: {key} frame {info[key]} is beyond NbFrame {nb}.")
    return info


def _acdc_patients(root: Path) -> dict:
    """patient id -> (folder, origin) where origin is 'training', 'testing' or '' (directly under root)."""
    found = {}
    for origin in ("training", "testing", ""):
        base = root / origin if origin else root
        if not base.is_dir():
            continue
        for p in sorted(base.iterdir()):
            if p.is_dir() and _ACDC_PATIENT.match(p.name) and p.name not in found:
                found[p.name] = (p, origin)
    return found


def _crop2d(a: np.ndarray, centre: Sequence[int], size: Sequence[int], fill=0):
    """Crop ``size`` around ``centre`` (lands on index size//2), padding with ``fill``; returns (crop, start)."""
    start = [int(c) - s // 2 for c, s in zip(centre, size)]
    out = np.full(tuple(size), fill, dtype=a.dtype)
    src, dst = [], []
    for st, s, n in zip(start, size, a.shape):
        lo, hi = max(st, 0), min(st + s, n)
        if hi <= lo:
            return out, start
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = a[tuple(src)]
    return out, start


def build_acdc(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    crop_size: Sequence[int] = (128, 128),
    percentiles: Sequence[float] = (1.0, 99.0),
    labels: bool = True,
    require_myo: str = "both",
    overwrite: bool = False,
) -> Path:
    """ACDC as distributed (``root/{training,testing}/patientNNN``) -> 2D ED/ES slice pairs in ``out``.

    Per patient: ED and ES frame numbers from ``Info.cfg``; ``patientNNN_frameMM.nii.gz`` and ``..._gt.nii.gz``
    (ground truth is always read: it places the crop). Intensities are clipped to the ``percentiles`` of the patient's
    ED and ES volumes together and scaled to [0, 1]. Slices along the 3rd axis whose myocardium (label 2) is missing in
    a frame (``require_myo="both"``) or in both frames (``"either"``) are skipped (one warning with the count). Each
    kept slice pair is cropped to ``crop_size`` around the centroid of the ED ∪ ES myocardium (zero padding), so the
    centroid lands on pixel ``crop_size // 2``. Labels are mapped to the project's convention (LV 1, myo 2, RV 3).

    Split: the patients of ``training/`` are shuffled with ``seed`` into training / validation (``val_fraction``,
    paper: 80/20), ``testing/`` -> test (paper: 50); or a ``split_file`` JSON ``{"training": [ids], ...}``.
    Items keep the in-plane spacing (mm) in ``spacing`` and the slice's world position in the NIfTI affine.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ACDC root folder does not exist.")
    if require_myo not in ("both", "either"):
        raise ValueError(f"require_myo must be 'both' or 'either', got {require_myo!r}")
    crop_size = tuple(int(c) for c in crop_size)
    check_out(out, [split_file], [root], overwrite)  # before reading anything: never write into the data
    patients = _acdc_patients(root)
    if not patients:
        raise DataError(f"{root}: no ACDC patient folders (training/patientNNN, testing/patientNNN) found.")
    if split_file is not None:
        splits = _read_split_file(split_file, list(patients))
    else:
        pool = [p for p, (_, o) in patients.items() if o == "training"]
        if not pool:
            raise DataError(f"{root}: no training/patientNNN folders; give a split file for other layouts.")
        splits = _split_ids(pool, (1.0 - val_fraction, val_fraction, 0.0), seed)
        splits["test"] = sorted(p for p, (_, o) in patients.items() if o == "testing")
        rest = [p for p, (_, o) in patients.items() if o == ""]
        if rest:
            _warn(f"{root}: {len(rest)} patient folder(s) outside training/ and testing/ skipped (use a split file).")
    datalist = {s: [] for s in SPLITS}
    skipped_myo, skipped_const = [], []
    with _Writer(out, overwrite, inputs=[split_file], input_dirs=[root]) as w:
        for split in SPLITS:
            for pid in _progress(splits[split], f"{split} patients"):
                folder = patients[pid][0]
                info = _parse_info_cfg(folder / "Info.cfg")
                frames, gts = {}, {}
                for phase in ("ED", "ES"):
                    stem = f"{pid}_frame{info[phase]:02d}"
                    img = _find_file(folder, stem, NIFTI_SUFFIXES)
                    if img is None:
                        raise DataError(
                            f"{folder / (stem + '.nii.gz')}: missing {phase} frame (Info.cfg: "
                            f"{phase}: {info[phase]})."
                        )
                    gt = _find_file(folder, stem + "_gt", NIFTI_SUFFIXES)
                    if gt is None:
                        raise DataError(
                            f"{folder / (stem + '_gt.nii.gz')}: missing {phase} label (ACDC ground truth "
                            "is needed to centre the crop on the myocardium)."
                        )
                    frames[phase] = read_image(img, ndim=3, what="image")
                    gts[phase] = read_image(gt, ndim=3, what="label")
                    _check_image(frames[phase])
                    _check_label(gts[phase], frames[phase], ACDC_LABEL_MAP)
                ed, es = frames["ED"], frames["ES"]
                if ed.array.shape != es.array.shape:
                    raise DataError(
                        f"{es.path}: ES shape {es.array.shape} differs from ED shape {ed.array.shape} "
                        f"({ed.path.name})."
                    )
                ed_n, es_n = _normalise([ed.array, es.array], percentiles)
                lab = {ph: _map_labels(gts[ph].array, ACDC_LABEL_MAP) for ph in ("ED", "ES")}
                spacing = [float(s) for s in ed.spacing[:2]]
                for z in range(ed.array.shape[2]):
                    m_ed, m_es = lab["ED"][..., z] == 2, lab["ES"][..., z] == 2
                    ok = (m_ed.any() and m_es.any()) if require_myo == "both" else (m_ed.any() or m_es.any())
                    if not ok:
                        skipped_myo.append(f"{pid}:{z}")
                        continue
                    centre = np.rint(np.argwhere(m_ed | m_es).mean(axis=0)).astype(int)
                    mov, start = _crop2d(ed_n[..., z], centre, crop_size)
                    fix, _ = _crop2d(es_n[..., z], centre, crop_size)
                    if mov.max() == mov.min() or fix.max() == fix.min():
                        skipped_const.append(f"{pid}:{z}")
                        continue
                    shift = np.eye(4)
                    shift[:3, 3] = [start[0], start[1], z]
                    affine = ed.affine @ shift
                    cid = f"{pid}_slice{z:02d}"
                    item = {
                        "id": cid,
                        "patient": pid,
                        "moving": w.nifti(f"{pid}/{cid}_ED.nii.gz", mov, affine),
                        "fixed": w.nifti(f"{pid}/{cid}_ES.nii.gz", fix, affine),
                    }
                    if labels:
                        item["moving_label"] = w.nifti(
                            f"{pid}/{cid}_ED_label.nii.gz",
                            _crop2d(lab["ED"][..., z], centre, crop_size)[0],
                            affine,
                            label=True,
                        )
                        item["fixed_label"] = w.nifti(
                            f"{pid}/{cid}_ES_label.nii.gz",
                            _crop2d(lab["ES"][..., z], centre, crop_size)[0],
                            affine,
                            label=True,
                        )
                    item["spacing"] = spacing
                    datalist[split].append(item)
        if skipped_myo:
            rule = "in ED or ES" if require_myo == "both" else "in both ED and ES"
            _warn(
                f"ACDC: skipped {len(skipped_myo)} slice pair(s) without myocardium {rule} "
                f"(patient:slice {', '.join(skipped_myo[:8])}{' ...' if len(skipped_myo) > 8 else ''})."
            )
        if skipped_const:
            _warn(
                f"ACDC: skipped {len(skipped_const)} slice pair(s) that are constant after cropping "
                f"({', '.join(skipped_const[:8])})."
            )
        _check_splits(datalist, split_file or root)
        info = {
            "dataset": "acdc",
            "root": str(root.absolute()),
            "seed": seed,
            "split_file": split_file,
            "val_fraction": val_fraction,
            "crop_size": crop_size,
            "percentiles": list(percentiles),
            "require_myo": require_myo,
            "label_map": ACDC_LABEL_MAP,
            "patients": splits,
            "pairs": {s: len(v) for s, v in datalist.items()},
            "skipped_no_myocardium": skipped_myo,
            "skipped_constant": skipped_const,
        }
        path = w.commit(datalist, info)
    logger.info("ACDC datalist %s: %s", path, info["pairs"])
    return path


# ----------------------------------------------------------------------------------------------------------------------
# CAMUS
# ----------------------------------------------------------------------------------------------------------------------
