"""Sunnybrook Cardiac Data (Radau et al. 2009, SSFP cine short-axis MRI, CC0): ED→ES slice pairs with the expert LV
contours, and unlabelled ED→phase pairs of every slice for unsupervised training (docs/data.md).

Two layouts are read (``../shared/realdata/README.md``):

- the re-packaged copy: ``dicoms/<SCD…>/<n>.dcm``, ``contourfiles/<SC-HF-I-k>/{i,o}-contours/IM-0001-<nnnn>-
  {i,o}contour-manual.txt`` and ``link.csv`` (``patient_id,original_id``);
- the official download: ``SCD_IMAGES_*/<SCD…>/CINESAX_*/IM-*-<nnnn>.dcm`` and ``SCD_ManualContours/<SC-HF-I-kk>/
  contours-manual/IRCCI-expert/IM-0001-<nnnn>-{i,o}contour-manual.txt``, the patient link from a CSV with the columns
  ``patient_id,original_id`` (``--link``; the official ``scd_patientdata.csv`` columns ``PatientID,OriginalID`` too).

Image number n of a patient's cine (1-based) is slice ``(n - 1) // P``, phase ``(n - 1) % P`` with P the DICOM
``CardiacNumberOfImages`` (checked: every phase of a slice has the slice's position). DICOM is read by MONAI's
``LoadImage(reader="ITKReader")``; contours (``x y`` = column, row per line, a closed polygon) are rasterised on pixel
centres with matplotlib's ``Path``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.data.builders.io import _normalise, _warn
from scripts.data.builders.output import _progress, _Writer, check_out
from scripts.data.contracts import DataError

logger = logging.getLogger(__name__)

__all__ = ["build_sunnybrook", "find_sunnybrook", "contour_mask"]

_CONTOUR = re.compile(r"^IM-\d{4}-(\d{4})-([io])contour-manual\.txt$")
_IMAGE_OFFICIAL = re.compile(r"^IM-\d{4}-(\d{4})\.dcm$", re.IGNORECASE)


def _read_link(path: Path) -> dict:
    """original contour folder id (``SC-HF-I-1``) -> patient id (``SCD0000101``) from a CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read the patient link CSV ({e}).") from None
    out = {}
    for i, row in enumerate(rows):
        row = {str(k).strip().lower(): str(v).strip() for k, v in row.items() if k is not None}
        pid, orig = row.get("patient_id") or row.get("patientid"), row.get("original_id") or row.get("originalid")
        if not pid or not orig:
            raise DataError(f"{path}: row {i + 2} lacks patient_id / original_id (columns: {sorted(row)}).")
        out[orig] = pid
    return out


def _norm_orig(name: str) -> str:
    """``SC-HF-I-01`` and ``SC-HF-I-1`` name the same contour folder."""
    m = re.match(r"^(.*?-)0*(\d+)$", name)
    return f"{m.group(1)}{int(m.group(2))}" if m else name


def find_sunnybrook(root: str | os.PathLike, link: str | os.PathLike | None = None) -> dict:
    """patient id -> ``{"images": {n: path}, "contours": {n: {"i"|"o": path}}, "layout": ...}`` for both layouts."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Sunnybrook root folder does not exist.")
    images: dict = defaultdict(dict)
    if (root / "dicoms").is_dir():
        layout = "shared"
        for pdir in sorted(p for p in (root / "dicoms").iterdir() if p.is_dir()):
            for f in pdir.glob("*.dcm"):
                if f.stem.isdigit():
                    images[pdir.name][int(f.stem)] = f
        contour_dirs = [d for d in (root / "contourfiles").glob("*") if d.is_dir()]
    else:
        layout = "official"
        for f in root.glob("SCD_IMAGES_*/*/*/*.dcm"):
            m = _IMAGE_OFFICIAL.match(f.name)
            if m:
                pid = f.parent.parent.name
                n = int(m.group(1))
                if n in images[pid]:
                    raise DataError(f"{f}: image number {n} of {pid} also in {images[pid][n]} (two cine series?).")
                images[pid][n] = f
        contour_dirs = [d for d in root.glob("SCD_ManualContours/*") if d.is_dir()]
    if not images:
        raise DataError(
            f"{root}: no Sunnybrook DICOM found (expected dicoms/<SCD…>/<n>.dcm or "
            "SCD_IMAGES_*/<SCD…>/CINESAX_*/IM-*-<nnnn>.dcm)."
        )
    link_path = Path(link) if link is not None else root / "link.csv"
    if not link_path.is_file():
        raise DataError(
            f"{link_path}: patient link CSV not found (columns patient_id,original_id, e.g. SCD0000101,SC-HF-I-1); "
            "pass --link for the official layout."
        )
    links = {_norm_orig(k): v for k, v in _read_link(link_path).items()}
    contours: dict = defaultdict(lambda: defaultdict(dict))
    for d in sorted(contour_dirs):
        pid = links.get(_norm_orig(d.name))
        if pid is None:
            _warn(f"{d}: contour folder not in {link_path}; skipped.")
            continue
        for f in sorted(d.rglob("*contour-manual.txt")):
            m = _CONTOUR.match(f.name)
            if not m:
                continue  # p1 / p2 papillary contours
            n, kind = int(m.group(1)), m.group(2)
            if kind in contours[pid][n]:
                raise DataError(f"{f}: a second {kind}-contour for image {n} of {pid} ({contours[pid][n][kind]}).")
            contours[pid][n][kind] = f
    out = {}
    for pid in sorted(images):
        out[pid] = {"images": dict(images[pid]), "contours": {n: dict(c) for n, c in contours.get(pid, {}).items()}}
        out[pid]["layout"] = layout
    for pid in sorted(set(contours) - set(images)):
        raise DataError(f"{root}: contours for {pid} ({len(contours[pid])} images) but no DICOM of {pid}.")
    return out


def contour_mask(path: Path, shape: Sequence[int]) -> np.ndarray:
    """Rasterise a contour file (``x y`` per line: x = column = array axis 0 of MONAI's ITK order, y = row) on pixel
    centres: ``mask[x, y]`` is True inside the polygon."""
    from matplotlib.path import Path as Polygon

    try:
        pts = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a contour file of 'x y' lines ({e}).") from None
    if pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise DataError(f"{path}: a contour needs ≥ 3 finite 'x y' points, got shape {pts.shape}.")
    gx, gy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    inside = Polygon(pts).contains_points(np.stack([gx.ravel(), gy.ravel()], 1))
    mask = inside.reshape(shape[0], shape[1])
    if not mask.any():
        raise DataError(f"{path}: the contour encloses no pixel centre of the {tuple(shape)} image.")
    return mask


def _read_cine(pid: str, files: dict) -> tuple[np.ndarray, np.ndarray, list, int]:
    """(frames (S, P, X, Y) float32, affines (S, 4, 4), spacing [sx, sy], phases P) of one patient's cine."""
    from monai.transforms import LoadImage

    load = LoadImage(reader="ITKReader", image_only=True)
    n_all = sorted(files)
    first = load(str(files[n_all[0]]))
    try:
        phases = int(float(first.meta.get("0018|1090", "").strip()))
    except ValueError:
        raise DataError(f"{files[n_all[0]]}: no CardiacNumberOfImages (0018,1090): cannot tell slice from phase.")
    if phases < 1:
        raise DataError(f"{files[n_all[0]]}: CardiacNumberOfImages (0018,1090) is {phases}; a cine has ≥ 1 phase.")
    if len(n_all) % phases or n_all != list(range(1, len(n_all) + 1)):
        missing = sorted(set(range(1, -(-max(n_all) // phases) * phases + 1)) - set(n_all))
        raise DataError(
            f"{files[n_all[0]].parent}: {pid} has {len(n_all)} images for {phases} phases per slice; missing image "
            f"number(s) {missing[:10]} (each slice needs every phase)."
        )
    n_slices = len(n_all) // phases
    frames, affines, positions = None, np.zeros((n_slices, 4, 4)), {}
    for n in _progress(n_all, f"{pid} DICOM"):
        img = first if n == n_all[0] else load(str(files[n]))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[..., 0] if arr.ndim == 3 else arr
        s, p = (n - 1) // phases, (n - 1) % phases
        if frames is None:
            frames = np.zeros((n_slices, phases, *arr.shape), np.float32)
            spacing = [float(x) for x in np.asarray(img.meta["spacing"])[:2]]
        if arr.shape != frames.shape[2:]:
            raise DataError(f"{files[n]}: image size {arr.shape} differs from the cine's {frames.shape[2:]}.")
        frames[s, p] = arr
        pos = np.asarray(img.affine, np.float64)[:3, 3]
        if p == 0:
            affines[s], positions[s] = np.asarray(img.affine, np.float64), pos
        elif np.abs(pos - positions[s]).max() > 1e-3:
            raise DataError(
                f"{files[n]}: image {n} (slice {s}, phase {p}) lies at {np.round(pos, 2).tolist()}, not at its slice's "
                f"position {np.round(positions[s], 2).tolist()}: the image numbers do not follow slice × phase."
            )
    return frames, affines, spacing, phases


def _labelled_slices(pid: str, contours: dict, phases: int, shape, n_images: int) -> dict:
    """slice -> {"ED": phase, "ES": phase, "ED_label", "ES_label"}, from the slice's two i-contours (ED = the larger
    cavity) and the ED o-contour."""
    by_slice: dict = defaultdict(dict)
    for n, c in contours.items():
        if not 1 <= n <= n_images:
            raise DataError(f"{next(iter(c.values()))}: contour of image {n}, but {pid}'s cine has {n_images} images.")
        by_slice[(n - 1) // phases][(n - 1) % phases] = c
    out = {}
    for s, ph in sorted(by_slice.items()):
        for p, c in ph.items():
            if "i" not in c:
                raise DataError(f"{c['o']}: an epicardium without the endocardium of the same image ({pid}).")
        if len(ph) != 2:
            shown = ", ".join(str(c["i"].name) for c in ph.values())
            raise DataError(f"{pid} slice {s}: contours at {len(ph)} phases ({shown}); expected 2 (ED and ES).")
        cav = {p: contour_mask(c["i"], shape) for p, c in ph.items()}
        ed, es = sorted(cav, key=lambda p: -int(cav[p].sum()))
        if "o" in ph[es]:
            raise DataError(f"{ph[es]['o']}: epicardium at ES (the smaller cavity); Sunnybrook gives it at ED only.")
        lab_ed = cav[ed].astype(np.uint8)
        if "o" in ph[ed]:
            epi = contour_mask(ph[ed]["o"], shape)
            lab_ed[epi & ~cav[ed]] = 2
        out[s] = {"ED": ed, "ES": es, "ED_label": lab_ed, "ES_label": cav[es].astype(np.uint8)}
    return out


def _crop(a: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(size), a.dtype)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, a.shape))
    dst = tuple(slice(x.start - s, x.stop - s) for x, s in zip(src, start))
    out[dst] = a[src]
    return out


def build_sunnybrook(
    root: str | os.PathLike,
    out: str | os.PathLike,
    link: str | os.PathLike | None = None,
    test_patients: Sequence[str] | None = None,
    crop_size: Sequence[int] = (128, 128),
    percentiles: Sequence[float] = (1.0, 99.0),
    folds: bool = True,
    overwrite: bool = False,
) -> Path:
    """Sunnybrook (either layout) -> 2D pairs in ``out``.

    Per patient, every cine frame is clipped to the ``percentiles`` of the patient's whole cine and scaled to [0, 1]
    (ACDC's recipe on the whole cine), and cropped to ``crop_size`` around the patient's LV centre (the mean centroid
    of the expert cavities; zero padding). Pairs:

    - labelled (``validation`` / ``test``): ED (moving) → ES (fixed) of each contoured slice; label 1 = LV cavity at
      both frames, label 2 = myocardium (ED epicardium minus cavity) at ED only: the fixed frame has no myocardium, so
      evaluate with ``eval_label: 1`` (configs/variants/data/sunnybrook.yaml);
    - unlabelled (``training``): ED → every other phase of every slice, ED being the patient's most common contoured
      ED phase.

    Splits by patient: ``test_patients`` give the test pairs; training uses the other patients' unlabelled pairs and
    validation their labelled pairs (settings and checkpoints are chosen on them, never on the test patient). Without
    ``test_patients`` every patient trains, and validation = test = all labelled pairs (in-sample: for the shipped
    weights only). With ``folds`` a ``datalist_loo_<patient>.json`` per patient (leave that patient out) is written
    beside ``datalist.json``, sharing its image files. Items carry ``spacing`` (mm) and ``patient``.
    """
    root = Path(root)
    crop_size = tuple(int(c) for c in crop_size)
    check_out(out, [link], [root], overwrite)
    found = find_sunnybrook(root, link)
    patients = sorted(found)
    test_patients = [str(p) for p in (test_patients or [])]
    unknown = sorted(set(test_patients) - set(patients))
    if unknown:
        raise DataError(f"--test_patients {unknown}: not in {root} (patients: {patients}).")
    unlabelled_pids = [p for p in patients if not found[p]["contours"]]
    if unlabelled_pids:
        _warn(f"Sunnybrook: {unlabelled_pids} have no expert contours: training pairs only.")
    items: dict = {p: {"labelled": [], "unlabelled": []} for p in patients}
    info_patients = {}
    with _Writer(out, overwrite, inputs=[link], input_dirs=[root]) as w:
        for pid in patients:
            frames, affines, spacing, phases = _read_cine(pid, found[pid]["images"])
            n_images = frames.shape[0] * phases
            labelled = _labelled_slices(pid, found[pid]["contours"], phases, frames.shape[2:], n_images)
            if labelled:
                centre = np.mean([np.argwhere(v["ED_label"] > 0).mean(0) for v in labelled.values()], axis=0)
                ed_phase = Counter(v["ED"] for v in labelled.values()).most_common(1)[0][0]
            else:
                centre = np.asarray(frames.shape[2:]) / 2.0
                ed_phase = 0
            start = [int(round(c)) - s // 2 for c, s in zip(centre, crop_size)]
            (norm,) = _normalise([frames], percentiles)
            written = {}

            def frame(s, p, _pid=pid, _norm=norm, _start=start, _affines=affines):
                if (s, p) not in written:
                    shift = np.eye(4)
                    shift[:2, 3] = _start
                    written[(s, p)] = w.nifti(
                        f"{_pid}/{_pid}_slice{s:02d}_phase{p:02d}.nii.gz",
                        _crop(_norm[s, p], _start, crop_size),
                        _affines[s] @ shift,
                    )
                return written[(s, p)]

            for s in range(frames.shape[0]):
                for p in range(phases):
                    if p != ed_phase:
                        items[pid]["unlabelled"].append(
                            {
                                "id": f"{pid}_slice{s:02d}_ED{ed_phase:02d}_to_{p:02d}",
                                "patient": pid,
                                "moving": frame(s, ed_phase),
                                "fixed": frame(s, p),
                                "spacing": spacing,
                            }
                        )
            for s, v in labelled.items():
                shift = np.eye(4)
                shift[:2, 3] = start
                lab = {
                    ph: w.nifti(
                        f"{pid}/{pid}_slice{s:02d}_phase{v[ph]:02d}_label.nii.gz",
                        _crop(v[f"{ph}_label"], start, crop_size),
                        affines[s] @ shift,
                        label=True,
                    )
                    for ph in ("ED", "ES")
                }
                items[pid]["labelled"].append(
                    {
                        "id": f"{pid}_slice{s:02d}_ED_to_ES",
                        "patient": pid,
                        "moving": frame(s, v["ED"]),
                        "fixed": frame(s, v["ES"]),
                        "moving_label": lab["ED"],
                        "fixed_label": lab["ES"],
                        "spacing": spacing,
                    }
                )
            info_patients[pid] = {
                "layout": found[pid]["layout"],
                "slices": int(frames.shape[0]),
                "phases": phases,
                "ed_phase": int(ed_phase),
                "es_phases": sorted({int(v["ES"]) for v in labelled.values()}),
                "labelled_slices": sorted(int(s) for s in labelled),
                "crop_start": start,
                "spacing": spacing,
            }

        def split(test: Sequence[str]) -> dict:
            train = [p for p in patients if p not in test]
            if not train:
                raise DataError(f"--test_patients {list(test)}: every patient is a test patient; none left to train.")
            return {
                "training": [i for p in train for i in items[p]["unlabelled"]],
                "validation": [i for p in train for i in items[p]["labelled"]],
                "test": [i for p in (test or train) for i in items[p]["labelled"]],
            }

        if folds and len(patients) > 1:
            for pid in patients:
                if items[pid]["labelled"]:
                    w.json(f"datalist_loo_{pid}.json", split([pid]))
        info = {
            "dataset": "sunnybrook",
            "root": str(root.absolute()),
            "test_patients": test_patients,
            "crop_size": crop_size,
            "percentiles": list(percentiles),
            "labels": {"1": "LV cavity (ED and ES)", "2": "LV myocardium (ED only)"},
            "patients": info_patients,
            "pairs": {p: {k: len(v) for k, v in items[p].items()} for p in patients},
        }
        path = w.commit(split(test_patients), info)
    logger.info("Sunnybrook datalist %s: %s", path, info["pairs"])
    return path
