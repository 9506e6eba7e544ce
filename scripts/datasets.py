"""Datalist builders for real data: ACDC, CAMUS and any list of paired NIfTI / MHD / NRRD files.

Each builder reads the data as the provider distributes it, preprocesses it (see ``docs/data.md``), writes NIfTI files
and a ``datalist.json`` in the contract format (docs/CONTRACTS.md) into ``out``, and returns the datalist path. Training
then reads the folder with the same :func:`scripts.data.paired_transforms` as the phantom.

Writing is all-or-nothing: everything goes to a hidden temporary folder next to ``out`` that is renamed to ``out`` at
the very end; on any error it is removed. ``out`` must not be, contain or lie inside an input (the data is never
touched); ``overwrite`` replaces only a folder this module wrote (its marker file,
:data:`scripts.contracts.MARKER_NAME`, lists every file) and never deletes a file the marker does not list. Ids
become file names only through :func:`scripts.contracts.safe_id` (no path separators, no ``..``), so nothing is
written outside ``out``.

Bad input raises :class:`scripts.data.DataError` naming the file and the problem (labels outside the label set, grids
that differ, truncated or NaN files...); what can be skipped safely is skipped with a :class:`DataWarning` that says
what was skipped.

Label convention of the project: 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV (CAMUS: 3 = left atrium).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.contracts import (
    LABEL_SET,
    MARKER_NAME,
    check_geometry,
    check_labels,
    check_output_dir,
    read_marker,
    record_written,
    remove_written,
    safe_id,
    safe_label_cast,
)
from scripts.data import DATALIST_NAME, SPLITS, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DataWarning",
    "Volume",
    "read_image",
    "build_acdc",
    "build_camus",
    "build_pairs",
    "build_datalist",
    "ACDC_LABEL_MAP",
    "CAMUS_LABEL_MAP",
]

# provider label -> project label (0 bg, 1 LV blood pool, 2 LV myocardium, 3 RV; CAMUS: 3 = left atrium)
ACDC_LABEL_MAP = {0: 0, 1: 3, 2: 2, 3: 1}  # ACDC: 1 RV, 2 myocardium, 3 LV cavity
CAMUS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}  # CAMUS: 1 LV endocardium, 2 myocardium, 3 left atrium
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")


class DataWarning(UserWarning):
    """Something in the input was skipped (the message says what)."""


def _warn(msg: str) -> None:
    logger.warning(msg)
    warnings.warn(msg, DataWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """An image read from disk: ``array`` in the file's index order (as MONAI's readers give it), RAS ``affine``."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple
    path: Path


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _read_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)  # reads (and decompresses) everything: truncation shows here
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return arr, affine, zooms


def _read_itk(path: Path):
    import itk

    img = itk.imread(str(path))
    arr = np.asarray(itk.array_from_image(img)).T  # ITK index order (x, y[, z]), as MONAI's ITKReader gives it
    ndim = img.GetImageDimension()
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    affine = np.eye(4)
    d = min(ndim, 3)
    affine[:d, :d] = direction[:d, :d] * spacing[:d]
    affine[:d, 3] = origin[:d]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, NIfTI / MONAI are RAS
    if arr.ndim > ndim:  # vector pixels: the component axis is first after the transpose, move it last
        arr = np.moveaxis(arr, 0, -1)
    return arr, affine, tuple(float(s) for s in spacing[: arr.ndim])


def read_image(path: str | os.PathLike, ndim: int | Sequence[int] | None = None, what: str = "image") -> Volume:
    """Read a NIfTI (nibabel) or MHD/MHA/NRRD (ITK) file; check it is readable, finite and of the expected rank.

    Args:
        path: the file.
        ndim: allowed number of spatial dimensions (trailing singleton dimensions are dropped first). ``None``: 2 or 3.
        what: word used in error messages ("image", "label").

    Raises:
        DataError: missing, unreadable or truncated file, wrong rank (e.g. 4D where 3D expected), NaN/Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file does not exist.")
    suffix = _suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            arr, affine, spacing = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            arr, affine, spacing = _read_itk(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use NIfTI .nii/.nii.gz, MHD/MHA or NRRD).")
    except DataError:
        raise
    except Exception as e:  # nibabel / zlib / ITK errors: unreadable or truncated
        raise DataError(f"{path}: unreadable or truncated {what} file ({type(e).__name__}: {e}).") from None
    allowed = (2, 3) if ndim is None else ((ndim,) if isinstance(ndim, int) else tuple(ndim))
    shape = arr.shape
    while arr.ndim > min(allowed) and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in allowed:
        names = {2: "2D", 3: "3D", 4: "4D"}
        raise DataError(
            f"{path}: {what} has shape {shape} ({names.get(arr.ndim, f'{arr.ndim}D')}) where a "
            f"{' or '.join(names.get(a, str(a)) for a in allowed)} {what} was expected."
        )
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has unsupported voxel type {arr.dtype}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: {what} contains NaN or Inf voxels.")
    return Volume(arr, affine, tuple(spacing[: arr.ndim]), path)


def _check_image(vol: Volume) -> None:
    if float(vol.array.max()) == float(vol.array.min()):
        raise DataError(f"{vol.path}: constant image (every voxel is {float(vol.array.min())}).")


def _check_label(
    lab: Volume, img: Volume, allowed: Sequence[int] | Mapping[int, int] = LABEL_SET, key: str = "label"
) -> None:
    """Shape and grid of ``lab`` equal to ``img``'s; every value an integer of ``allowed`` (the provider's label set
    for ACDC / CAMUS, the project's for pair lists). Errors name the label file (and the values found)."""
    if lab.array.shape != img.array.shape:
        raise DataError(
            f"{lab.path}: label shape {lab.array.shape} differs from image shape {img.array.shape} "
            f"({img.path.name})."
        )
    check_geometry(
        lab.affine,
        img.affine,
        [lab.path, img.path],
        moving_shape=lab.array.shape,
        fixed_shape=img.array.shape,
        keys=(key, "image"),
        resample_allowed=False,
    )
    check_labels(lab.array, lab.path, sorted(allowed), key=key)


def _map_labels(a: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[np.asarray(a).astype(np.int64)]


def _normalise(arrays: Sequence[np.ndarray], percentiles: Sequence[float]) -> list[np.ndarray]:
    """Clip to the given percentiles of all ``arrays`` together and scale to [0, 1] (float32)."""
    lo, hi = np.percentile(np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64), list(percentiles))
    if hi <= lo:  # e.g. a sparse image whose percentiles coincide: fall back to min-max
        lo = min(float(np.min(a)) for a in arrays)
        hi = max(float(np.max(a)) for a in arrays)
    return [np.clip((np.asarray(a, np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32) for a in arrays]


# ----------------------------------------------------------------------------------------------------------------------
# writing (all or nothing)
# ----------------------------------------------------------------------------------------------------------------------
TOOL = "datalist"


def _walk_files(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files, other entries: symlinks, special files) under ``folder``, relative POSIX paths; no links
    followed."""
    files, other = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            if full.is_symlink() or not (full.is_dir() or full.is_file()):
                other.append(rel)
            elif full.is_file():
                files.append(rel)
    return sorted(files), sorted(other)


def check_out(
    out: str | os.PathLike, inputs: Sequence = (), input_dirs: Sequence = (), overwrite: bool = False
) -> Path:
    """Refuse an output folder that would touch the input data or the user's files; return it (absolute).

    - ``out`` is, contains or lies inside an input (``inputs``: files and folders; ``input_dirs``: data folders,
      such as the ACDC / CAMUS root, that must not get a new folder inside either).
    - ``out`` exists and is not empty: refused unless ``overwrite``; with ``overwrite`` it must be a folder written by
      this module (its marker lists every file in it): otherwise nothing is deleted and the error names the files
      that were not written by the bundle.
    """
    out_abs = Path(os.path.abspath(out))
    check_output_dir(out_abs, [*inputs, *input_dirs], option="--out")
    real = Path(os.path.realpath(out_abs))
    for d in input_dirs:
        if d is not None and Path(os.path.realpath(d)) in real.parents:
            raise DataError(
                f"--out {out}: lies inside the input folder {d}; write the datalist outside the data "
                "(a folder in there could be read back as data)."
            )
    if out_abs.is_dir() and any(out_abs.iterdir()):
        if not overwrite:
            raise DataError(
                f"--out {out}: output folder is not empty (pass overwrite=True / --overwrite True to "
                "replace a folder written by `python -m bundle datalist`)."
            )
        marker = out_abs / MARKER_NAME
        if not marker.is_file():
            raise DataError(
                f"--out {out}: was not written by `python -m bundle datalist` (no {MARKER_NAME} marker), "
                "so --overwrite does not delete it; nothing was changed. Choose a new or empty folder."
            )
        listed = set(read_marker(out_abs)["files"]) | {MARKER_NAME}
        files, other = _walk_files(out_abs)
        foreign = sorted(set(files) - listed) + other
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DataError(
                f"--out {out}: holds {shown}, not written by the bundle (not in {MARKER_NAME}); "
                "--overwrite never deletes them and nothing was changed: move them away or choose "
                "another folder."
            )
    return out_abs


class _Writer:
    """Collects files in a temporary folder next to ``out`` and renames it to ``out`` on :meth:`commit`.

    ``inputs`` / ``input_dirs``: see :func:`check_out` (checked again here, right before anything is written).
    """

    def __init__(
        self, out: str | os.PathLike, overwrite: bool = False, inputs: Sequence = (), input_dirs: Sequence = ()
    ):
        self.out = check_out(out, inputs, input_dirs, overwrite)
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out}: output path exists and is not a folder.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._tmp_real = Path(os.path.realpath(self.tmp))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def nifti(self, rel: str, array: np.ndarray, affine: np.ndarray, label: bool = False) -> str:
        import nibabel as nib

        path = self.tmp / rel
        if (
            Path(rel).is_absolute()
            or ".." in Path(rel).parts
            or self._tmp_real not in Path(os.path.realpath(path)).parents
        ):
            raise DataError(f"{rel}: would be written outside the output folder {self.out}; refused.")
        path.parent.mkdir(parents=True, exist_ok=True)
        if label:
            data = safe_label_cast(array, rel, np.uint8, allowed=None)
        else:
            data = np.asarray(array, dtype=np.float32)
        img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
        img.header.set_xyzt_units("mm")
        if label:
            img.header.set_intent("label")
        nib.save(img, str(path))
        return rel

    def commit(self, datalist: Mapping, info: Mapping) -> Path:
        with open(self.tmp / DATALIST_NAME, "w") as f:
            json.dump(datalist, f, indent=1)
        with open(self.tmp / "preprocessing.json", "w") as f:
            json.dump(info, f, indent=1, default=str)
        record_written(self.tmp, _walk_files(self.tmp)[0], tool=TOOL)  # the marker: what --overwrite may remove
        old = None
        if self.out.exists():
            check_out(self.out, overwrite=True)  # still only bundle files (checked again right before the swap)
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            old.rmdir()
            self.out.rename(old)
        try:
            self.tmp.rename(self.out)
        except OSError:
            if old is not None:
                old.rename(self.out)
            raise
        if old is not None:  # remove only the files its marker lists, then the folders left empty
            remove_written(old)
            for dirpath, _, _ in sorted(os.walk(old), key=lambda t: -len(t[0])):
                if not any(Path(dirpath).iterdir()):
                    Path(dirpath).rmdir()
            if old.exists():
                _warn(f"{old}: files not written by the bundle appeared during the build; left there.")
        return self.out / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------------
def _fractions(split) -> tuple:
    if isinstance(split, str):
        split = [float(s) for s in split.replace(" ", "").split(",") if s]
    fr = tuple(float(s) for s in split)
    if len(fr) != 3 or any(f < 0 for f in fr) or sum(fr) <= 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers (training, validation, test), got {split}")
    return tuple(f / sum(fr) for f in fr)


def _split_ids(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict:
    """Seeded shuffle of the sorted ``ids`` cut by ``fractions`` (validation and test rounded, training the rest)."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    n_train = n - n_val - n_test
    return {"training": ids[:n_train], "validation": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}


def _read_split_file(path: str | os.PathLike, available: Sequence[str]) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: split file is not valid JSON ({e}).") from None
    if not isinstance(content, dict) or not set(content) & set(SPLITS):
        raise DataError(f"{path}: split file must be a JSON object with keys among {list(SPLITS)}.")
    unknown = sorted(set(content) - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown split names {unknown} (use {list(SPLITS)}).")
    out, seen = {}, {}
    for s in SPLITS:
        ids = [str(i) for i in content.get(s, [])]
        for i in ids:
            if i not in available:
                raise DataError(f"{path}: patient {i!r} of split '{s}' was not found in the data.")
            if i in seen:
                raise DataError(f"{path}: patient {i!r} is in both '{seen[i]}' and '{s}'.")
            seen[i] = s
        out[s] = ids
    unused = sorted(set(available) - set(seen))
    if unused:
        _warn(
            f"{path}: {len(unused)} patient(s) found in the data but in no split were skipped: "
            f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}"
        )
    return out


def _check_splits(datalist: Mapping, source, required: Sequence[str] = SPLITS) -> None:
    for s in required:
        if not datalist.get(s):
            raise DataError(
                f"{source}: split '{s}' is empty (no pairs); use more cases, other fractions or a " "split file."
            )


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _find_file(folder: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for s in suffixes:
        p = folder / f"{stem}{s}"
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------------------------------------------------
# ACDC
# ----------------------------------------------------------------------------------------------------------------------
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


def _progress(items, desc: str):
    """A tqdm progress bar over ``items`` (the builders read and write one patient / pair at a time)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


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
    (shape, spacing, direction and origin, :func:`scripts.contracts.check_geometry`; a mismatch is an error naming both
    files); labels on their image's grid with values in ``label_values`` (default the project's 0-3). ``copy=False``
    (default): the datalist references the original files (train with ``intensity: percentile``); ``copy=True``:
    normalised float32 NIfTI copies (percentile clip, [0, 1]) and uint8 label copies in the input's own geometry
    (same affine). In both cases outputs can be written back in the input's space. ``labels``: ``None`` uses labels
    where listed, ``True`` requires them for every pair, ``False`` ignores them.

    Ids (``id`` column, else ``NNNN_<fixed file stem>``) become file names: characters other than letters, digits,
    ``._-`` are replaced (:func:`scripts.contracts.safe_id`, a :class:`DataWarning` says so); two rows with the same
    id are an error. ``out`` must not be or contain any listed file (see :func:`check_out`).

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


BUILDERS = {"acdc": build_acdc, "camus": build_camus, "pairs": build_pairs}


def build_datalist(dataset: str, root: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """Dispatch to :func:`build_acdc`, :func:`build_camus` or :func:`build_pairs` (``root`` = the pair list)."""
    key = str(dataset).lower()
    if key not in BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(BUILDERS)}, got {dataset!r}")
    return BUILDERS[key](root, out, **options)
