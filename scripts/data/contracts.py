"""Input contracts shared by inference, evaluation and the datalist builders (docs/inference.md, "Contracts").

Every check raises :class:`scripts.data.DataError` (a ``ValueError``) whose message names the file (or option), the
problem found and what to do; nothing is silently dropped, clipped or cast with wrap-around.

- :func:`check_intensity`: images must already be in [0, 1] (``intensity: none``) or are scaled by the documented
  percentile option (``intensity: percentile``); out-of-range values under ``none`` are **refused** (one policy: no
  silent normalisation), the message names the file, the range found and ``--intensity percentile``.
- :func:`check_labels` / :func:`safe_label_cast`: label values must be integers of the label set (0, 1, 2, 3); the
  cast to ``uint8`` never wraps (-3 is an error, never 253).
- :func:`check_geometry`: the full affines (spacing, direction, origin) and shapes of two images are compared within
  a tolerance; a mismatch is an error, or (``on_mismatch="resample"``) a warning and ``False`` so the caller resamples.
- :func:`safe_id`: a pair / case id usable as a file-name stem: never a path separator, never ``..``, never empty.
- :func:`check_output_dir`: refuse an output folder that is, or contains, one of the inputs.
- Output marker (:data:`MARKER_NAME`): every tool records the files it writes in its output folder
  (:func:`record_written`, best *before* writing them; :func:`prune_marker` then drops names never written);
  :func:`prepare_output_dir` refuses to write over existing files unless ``overwrite``, and ``overwrite`` removes
  only files listed in the marker (:func:`remove_written`), never the user's own files.
- :func:`read_error`: wrap a low-level read error (truncated gzip, zero-byte file, bad header) with the path and a
  one-line diagnosis.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


__all__ = [
    "DataError",
    "INTENSITY_POLICIES",
    "GRID_POLICIES",
    "LABEL_SET",
    "MARKER_NAME",
    "check_intensity",
    "stored_dtype",
    "check_labels",
    "safe_label_cast",
    "affine4",
    "check_geometry",
    "safe_id",
    "check_output_dir",
    "read_marker",
    "record_written",
    "remove_written",
    "prune_marker",
    "prepare_output_dir",
    "atomic_write_text",
    "atomic_write_json",
    "read_error",
]

INTENSITY_POLICIES = ("none", "percentile")
GRID_POLICIES = ("error", "resample")
LABEL_SET = (0, 1, 2, 3)
MARKER_NAME = ".bundle_written.json"
_ID_OK = re.compile(r"[^\w.-]+")  # letters and digits of any script (patient ids in Cyrillic, CJK ...), _ . -


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu()
    if hasattr(array, "as_tensor"):
        array = array.as_tensor()
    return np.asarray(array)


# ------------------------------------------------------------------------------------------------- intensities
def check_intensity(
    array: Any,
    path: str | os.PathLike,
    policy: str = "none",
    key: str = "image",
    tol: float = 1e-3,
    stored_dtype: Any = None,
) -> tuple[float, float]:
    """Check the intensities of one image against the intensity policy; return its (min, max).

    Always refused: NaN/Inf voxels and a constant image. With ``policy="none"`` the image must already be in [0, 1]
    (within ``tol``): the networks were trained on images in [0, 1], and an image ×1e6, an int16 image 0-3000 or
    negative intensities would give a meaningless DDF, so they are refused with a message naming the file, the range
    found and the option ``--intensity percentile`` (0.5-99.5 percentiles clipped and scaled to [0, 1], any finite
    range accepted). Nothing is normalised silently.

    Args:
        array: the image (numpy array or tensor, any shape).
        path: the file it was read from (for the message).
        policy: ``"none"`` or ``"percentile"`` (:data:`INTENSITY_POLICIES`).
        key: the role of the image (``"moving"``, ``"fixed"``...), for the message.
        tol: tolerance on the [0, 1] bounds under ``"none"``.
        stored_dtype: the data type in the file (for the message; default: ``array``'s), e.g. from
            :func:`stored_dtype`.
    """
    if policy not in INTENSITY_POLICIES:
        raise ValueError(f"intensity must be one of {list(INTENSITY_POLICIES)}, got {policy!r} (option --intensity).")
    a = _numpy(array)
    dtype = np.dtype(stored_dtype) if stored_dtype is not None else a.dtype
    if a.size == 0:
        raise DataError(f"{path}: '{key}' is empty (shape {a.shape}).")
    a = a.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        raise DataError(f"{path}: '{key}' contains {int((~finite).sum())} NaN or Inf voxels.")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo == 0.0:
        raise DataError(f"{path}: '{key}' is a constant image (all voxels {lo:.6g}).")
    if policy == "none" and (lo < -tol or hi > 1.0 + tol):
        raise DataError(
            f"{path}: '{key}' intensities span [{lo:.6g}, {hi:.6g}] (stored as {dtype}), but with --intensity none "
            "the images must already be in [0, 1] as in training. Run with --intensity percentile (clips to the "
            "0.5-99.5 percentiles and scales to [0, 1]) or rescale the file to [0, 1]."
        )
    return lo, hi


def stored_dtype(image: Any) -> np.dtype | None:
    """The data type of a loaded image's file (MONAI MetaTensor read by NibabelReader: NIfTI ``datatype``), or
    ``None`` when unknown (readers convert to float32, so the array's own dtype does not say)."""
    meta = getattr(image, "meta", None) or {}
    code = meta.get("datatype")
    if code is None:
        return None
    try:
        from nibabel.nifti1 import data_type_codes

        return np.dtype(data_type_codes.type[int(np.asarray(code).ravel()[0])])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------------ labels
def check_labels(
    array: Any, path: str | os.PathLike, allowed: Sequence[int] = LABEL_SET, key: str = "label", tol: float = 1e-3
) -> list[int]:
    """Check that every voxel of a label image is an integer of ``allowed``; return the sorted values found.

    Refused, with the file and the offending values (and their voxel counts): NaN/Inf, non-integer values
    (e.g. a label resampled with linear interpolation, or an intensity image given as a label), values outside
    ``allowed`` (e.g. -3, 4, 255).
    """
    a = _numpy(array).astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        raise DataError(f"{path}: '{key}' contains {int((~finite).sum())} NaN or Inf voxels; labels must be integers.")
    r = np.rint(a)
    frac = np.abs(a - r) > tol
    if frac.any():
        sample = np.unique(a[frac])[:5].tolist()
        raise DataError(
            f"{path}: '{key}' has {int(frac.sum())} non-integer voxels (e.g. {[round(v, 4) for v in sample]}); "
            f"labels must be integers in {list(allowed)} (is it an image, or a label resampled with linear "
            "interpolation?)."
        )
    values, counts = np.unique(r.astype(np.int64), return_counts=True)
    bad = [(int(v), int(c)) for v, c in zip(values, counts) if int(v) not in set(int(x) for x in allowed)]
    if bad:
        shown = ", ".join(f"{v} ({c} voxels)" for v, c in bad[:10])
        raise DataError(
            f"{path}: '{key}' has values outside the label set {list(allowed)}: {shown}. "
            "Map them to the label set first (0 background, 1 LV blood pool, 2 LV myocardium, 3 RV / left atrium)."
        )
    return [int(v) for v in values]


def safe_label_cast(
    array: Any, path: str | os.PathLike, dtype: Any = np.uint8, allowed: Sequence[int] | None = LABEL_SET
) -> np.ndarray:
    """Round to integers and cast to ``dtype`` after checking the values (:func:`check_labels`); never wraps.

    With ``allowed=None`` only the range of ``dtype`` is checked.
    """
    a = _numpy(array)
    if allowed is not None:
        check_labels(a, path, allowed)
    r = np.rint(a.astype(np.float64, copy=False))
    info = np.iinfo(np.dtype(dtype))
    if r.size and (not np.isfinite(r).all() or r.min() < info.min or r.max() > info.max):
        raise DataError(
            f"{path}: label values [{np.nanmin(r):.6g}, {np.nanmax(r):.6g}] do not fit {np.dtype(dtype).name} "
            f"[{info.min}, {info.max}]; refusing a cast that would wrap."
        )
    return r.astype(dtype)


# ---------------------------------------------------------------------------------------------------- geometry
def affine4(affine: Any) -> np.ndarray:
    """A (r+1)x(r+1) affine (numpy or tensor) as 4x4 (r <= 3)."""
    a = np.asarray(_numpy(affine), dtype=np.float64)
    if a.shape == (4, 4):
        return a
    r = a.shape[0] - 1
    out = np.eye(4)
    out[:r, :r] = a[:r, :r]
    out[:r, 3] = a[:r, r]
    return out


def _decompose(affine: np.ndarray, nd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = affine[:3, :3]
    spacing = np.sqrt((m**2).sum(0))
    direction = m / np.where(spacing > 0, spacing, 1.0)
    return spacing[:nd], direction[:, :nd], affine[:3, 3]


def check_geometry(
    moving_affine: Any,
    fixed_affine: Any,
    paths: Sequence[str | os.PathLike],
    tol: float = 1e-3,
    on_mismatch: str = "error",
    moving_shape: Sequence[int] | None = None,
    fixed_shape: Sequence[int] | None = None,
    keys: Sequence[str] = ("moving", "fixed"),
    resample_allowed: bool = True,
) -> bool:
    """Compare the grids of two images: shapes, spacing, direction and origin of the full affines.

    Tolerances: spacing relative ``tol``; direction cosines absolute ``tol``; origin absolute ``tol`` times the
    largest spacing (mm), i.e. a small fraction of a voxel. Only the first ``len(shape)`` axes are compared when the
    shapes are given (a 2D image's third affine axis is free).

    Returns ``True`` when the grids match; ``False`` when they differ and ``on_mismatch="resample"`` (a warning is
    logged; the caller resamples ``paths[0]`` onto ``paths[1]`` with the affines). Raises :class:`DataError` naming
    both files and every difference when ``on_mismatch="error"`` or ``resample_allowed`` is false.

    Args:
        moving_affine, fixed_affine: world (mm) affines, 4x4 or (r+1)x(r+1).
        paths: the two files (moving-side first), for the message.
        on_mismatch: ``"error"`` or ``"resample"`` (:data:`GRID_POLICIES`, option ``--on_grid_mismatch``).
        moving_shape, fixed_shape: spatial shapes (optional).
        keys: the roles of the two images, for the message.
        resample_allowed: ``False`` for images that must be on the reference grid (e.g. a fixed label).
    """
    if on_mismatch not in GRID_POLICIES:
        raise ValueError(f"on_grid_mismatch must be one of {list(GRID_POLICIES)}, got {on_mismatch!r}.")
    nd = len(fixed_shape) if fixed_shape is not None else 3
    a, b = affine4(moving_affine), affine4(fixed_affine)
    sa, da, oa = _decompose(a, nd)
    sb, db, ob = _decompose(b, nd)
    diffs = []
    if moving_shape is not None and fixed_shape is not None and tuple(moving_shape) != tuple(fixed_shape):
        diffs.append(f"shape {tuple(int(s) for s in moving_shape)} vs {tuple(int(s) for s in fixed_shape)}")
    if not np.allclose(sa, sb, rtol=tol, atol=1e-9):
        diffs.append(f"spacing {np.round(sa, 4).tolist()} vs {np.round(sb, 4).tolist()} mm")
    if not np.allclose(da, db, atol=tol, rtol=0):
        diffs.append(f"direction {np.round(da, 3).tolist()} vs {np.round(db, 3).tolist()}")
    otol = tol * float(max(sb.max(initial=0.0), 1e-6))
    if not np.allclose(oa, ob, atol=otol, rtol=0):
        diffs.append(
            f"origin {np.round(oa, 3).tolist()} vs {np.round(ob, 3).tolist()} mm "
            f"(offset {np.round(oa - ob, 3).tolist()})"
        )
    if not diffs:
        return True
    what = "; ".join(diffs)
    if on_mismatch == "error" or not resample_allowed:
        hint = (
            "Resample it onto that grid first."
            if not resample_allowed
            else "Resample it first, or run with --on_grid_mismatch resample (it is then resampled onto that grid "
            "with both affines)."
        )
        raise DataError(f"{paths[0]}: '{keys[0]}' is not on the grid of '{keys[1]}' {paths[1]} ({what}). {hint}")
    logger.warning(
        "%s: '%s' is not on the grid of '%s' %s (%s): resampling it onto that grid",
        paths[0],
        keys[0],
        keys[1],
        paths[1],
        what,
    )
    return False


# ------------------------------------------------------------------------------------------------ ids and paths
def safe_id(raw: Any, what: str = "id", max_len: int = 128) -> str:
    """A file-name stem made from ``raw``: never a path separator, never ``..``, never empty, never hidden.

    Characters other than letters and digits (of any script: non-ASCII ids are kept) and ``._-`` (slashes,
    backslashes, spaces, colons...) become ``_``; runs of dots become
    one ``_``-separated dot; leading dots are dropped; the result is at most ``max_len`` characters. A changed id is
    logged (warning). Raises :class:`DataError` when nothing usable remains (e.g. ``"../.."``).
    """
    s = unicodedata.normalize("NFC", str(raw))
    out = _ID_OK.sub("_", s)
    out = re.sub(r"\.{2,}", "_", out).lstrip("._") or ""
    out = out[:max_len].rstrip(".")
    if not out or not re.search(r"[^\W_]", out):
        raise DataError(
            f"{what} {s!r}: not usable as a file name (no letters or digits once '/', '\\', '..' and "
            "other characters are removed); give a plain name such as case01."
        )
    if out != s:
        logger.warning("%s %r contains path or special characters: using %r", what, s, out)
    return out


def not_a_file(path: str | os.PathLike) -> str | None:
    """``None`` for a regular file (or a link to one), else what ``path`` is, for an error message: "is a folder,
    not a file", "is not a regular file (a FIFO)" (also a character / block device such as /dev/zero, a socket),
    "is a broken symbolic link" or "does not exist"."""
    import stat

    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if p.is_symlink() else "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))  # fmt: skip
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"is not a regular file ({kind})"


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.path.expanduser(str(p)))))


def check_output_dir(
    output_dir: str | os.PathLike, input_paths: Iterable[str | os.PathLike | None], option: str = "--output_dir"
) -> Path:
    """Refuse an output folder that is an input, contains an input, or is an existing file; return it resolved.

    Symbolic links are resolved on both sides. ``None`` entries of ``input_paths`` are skipped.
    """
    out = _resolve(output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{option} {output_dir}: exists and is not a folder.")
    for p in input_paths:
        if p is None or str(p) == "":
            continue
        q = _resolve(p)
        if q == out:
            raise DataError(f"{option} {output_dir}: is the input {p}; choose a new, separate output folder.")
        if out in q.parents:
            raise DataError(
                f"{option} {output_dir}: contains the input {p}; the output folder must not hold any input "
                "(choose a new, separate output folder)."
            )
    return out


# --------------------------------------------------------------------------------------------- written-by marker
def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> str:
    """Write ``text`` to a temporary file in the same folder, then rename it over ``path``: a reader or a crash of
    the process never sees a half-written file. ``fsync=True`` also flushes to the disk before the rename (survives
    a power cut; ~10 ms per call here)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = False, **kwargs) -> str:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=2, **kwargs)``."""
    return atomic_write_text(path, json.dumps(obj, indent=kwargs.pop("indent", 2), **kwargs), fsync=fsync)


def read_marker(output_dir: str | os.PathLike) -> dict:
    """The marker of ``output_dir``: ``{"tools": [...], "files": [relative paths]}`` (empty lists if none)."""
    p = Path(output_dir) / MARKER_NAME
    if not p.is_file():
        return {"tools": [], "files": []}
    try:
        m = json.loads(p.read_text())
        return {"tools": list(m.get("tools", [])), "files": [str(f) for f in m.get("files", [])]}
    except (ValueError, OSError, AttributeError) as e:
        raise DataError(
            f"{p}: unreadable marker of bundle-written files ({e}); delete it only if the folder holds "
            "nothing of yours."
        ) from None


def _inside(out: Path, rel: str) -> Path | None:
    """``out / rel`` if it stays inside ``out`` (no ``..``, no absolute path, no symlink escape), else ``None``."""
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    p = out / rel
    try:
        parent = _resolve(p.parent)
    except OSError:
        return None
    if parent != out and out not in parent.parents:
        return None
    return p


def record_written(output_dir: str | os.PathLike, paths: Iterable[str | os.PathLike], tool: str = "bundle") -> None:
    """Add ``paths`` (inside ``output_dir``) to the folder's marker of bundle-written files (atomic update)."""
    out = _resolve(output_dir)
    m = read_marker(out)
    files = list(m["files"])
    known = set(files)
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else out / p
        rel = os.path.relpath(_resolve(full.parent) / full.name, out)
        if rel.startswith("..") or os.path.isabs(rel):
            raise DataError(f"{p}: not inside the output folder {out}; refusing to record it as bundle output.")
        if rel not in known:
            files.append(rel)
            known.add(rel)
    tools = m["tools"] if tool in m["tools"] else m["tools"] + [tool]
    atomic_write_json(out / MARKER_NAME, {"tools": tools, "files": files})


def remove_written(output_dir: str | os.PathLike, only: Iterable[str] | None = None) -> list[str]:
    """Delete the files the marker lists (or the listed ones among ``only``, relative paths); return what was removed.

    Never deletes a file the marker does not list, a folder, or anything outside ``output_dir``; folders left empty
    by the removal are removed. The marker is updated.
    """
    out = _resolve(output_dir)
    m = read_marker(out)
    chosen = set(m["files"]) if only is None else set(m["files"]) & {str(o) for o in only}
    removed, kept = [], []
    for rel in m["files"]:
        if rel not in chosen:
            kept.append(rel)
            continue
        p = _inside(out, rel)
        if p is None:
            logger.warning("%s: marker entry %r points outside the folder: ignored", out, rel)
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
            removed.append(rel)
            parent = p.parent
            while parent != out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    if kept or (out / MARKER_NAME).exists():
        if kept:
            atomic_write_json(out / MARKER_NAME, {"tools": m["tools"], "files": kept})
        else:
            (out / MARKER_NAME).unlink()
    return removed


def prune_marker(output_dir: str | os.PathLike) -> list[str]:
    """Drop marker entries whose file does not exist (e.g. names recorded before writing, never written); return
    them."""
    out = _resolve(output_dir)
    m = read_marker(out)
    gone = [f for f in m["files"] if not (out / f).exists() and not (out / f).is_symlink()]
    if gone:
        keep = [f for f in m["files"] if f not in set(gone)]
        if keep:
            atomic_write_json(out / MARKER_NAME, {"tools": m["tools"], "files": keep})
        elif (out / MARKER_NAME).exists():
            (out / MARKER_NAME).unlink()
    return gone


def prepare_output_dir(
    output_dir: str | os.PathLike,
    input_paths: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    planned: Iterable[str] | None = None,
    tool: str = "bundle",
    option: str = "--output_dir",
) -> Path:
    """Make ``output_dir`` ready for writing; return it resolved.

    - Refuses a folder that is or contains an input (:func:`check_output_dir`).
    - ``planned`` (relative file names about to be written) given: existing ones are a clash. ``planned=None``: any
      existing entry of the folder other than the marker is a clash.
    - Clashes without ``overwrite``: :class:`DataError` listing them and naming ``--overwrite true``.
    - With ``overwrite``: every file of the marker (written earlier by the bundle) is removed; a planned clash with a
      file the bundle did not write is refused (it is never deleted); other files not written by the bundle are kept
      and listed in a warning.
    """
    out = check_output_dir(output_dir, input_paths, option)
    if not out.is_dir():
        out.mkdir(parents=True)
        return out
    entries = sorted(e.name for e in out.iterdir() if e.name != MARKER_NAME)
    if planned is None:
        clashes = entries
    else:
        clashes = sorted(str(p) for p in set(planned) if (out / str(p)).exists() or (out / str(p)).is_symlink())
    if not clashes:
        return out
    shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
    if not overwrite:
        raise DataError(
            f"{option} {output_dir}: already holds {shown}. Choose another folder, or pass --overwrite true to "
            "replace what the bundle wrote there (files the bundle did not write are never deleted)."
        )
    written = set(read_marker(out)["files"])
    foreign = [c for c in clashes if c not in written] if planned is not None else []
    if foreign:
        raise DataError(
            f"{option} {output_dir}: {', '.join(foreign[:5])} were not written by the bundle (not in {MARKER_NAME}); "
            "--overwrite never deletes them: move them away or choose another folder."
        )
    removed = remove_written(out)
    left = sorted(e.name for e in out.iterdir() if e.name != MARKER_NAME)
    logger.warning(
        "%s %s: --overwrite removed %d file(s) written earlier by the bundle%s",
        option,
        out,
        len(removed),
        f"; kept {len(left)} file(s) it did not write: {left[:5]}" if left else "",
    )
    return out


# --------------------------------------------------------------------------------------------------- read errors
def read_error(path: str | os.PathLike, exc: BaseException, what: str = "image") -> DataError:
    """A :class:`DataError` for a file that could not be read: the path, a one-line diagnosis and the cause.

    Use as ``raise read_error(path, e, "moving image") from e``.
    """
    p = Path(str(path))
    try:
        size = p.stat().st_size
    except OSError:
        size = None
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    root = chain[-1]
    truncated = any(
        isinstance(c, (EOFError, zlib.error)) or "gzip" in type(c).__name__.lower() or "EOF" in str(c) for c in chain
    )
    exc = root
    if size == 0:
        why = "the file is empty (0 bytes)"
    elif truncated:
        why = "the file is truncated or its compression is corrupt (incomplete download or copy?)"
    else:
        why = "unreadable or not a supported image/checkpoint"
    return DataError(f"{path}: cannot read the {what}: {why} [{type(exc).__name__}: {str(exc)[:200]}].")
