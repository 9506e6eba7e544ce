"""The builders' output: the all-or-nothing writer (a hidden temporary folder renamed at the end, a marker listing
every written file), the output-folder check, the train / validation / test splits and their split files."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.data.builders.io import _warn
from scripts.data.contracts import (
    MARKER_NAME,
    DataError,
    check_output_dir,
    read_marker,
    record_written,
    remove_written,
    safe_label_cast,
)
from scripts.data.datalist import DATALIST_NAME, SPLITS

logger = logging.getLogger(__name__)


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

    def json(self, rel: str, content: Mapping) -> str:
        """Write a JSON file (e.g. a further datalist beside ``datalist.json``) into the output folder."""
        if Path(rel).name != rel:
            raise DataError(f"{rel}: a JSON file is written at the top of the output folder {self.out}; refused.")
        with open(self.tmp / rel, "w") as f:
            json.dump(content, f, indent=1)
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


def _progress(items, desc: str):
    """A tqdm progress bar over ``items`` (the builders read and write one patient / pair at a time)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
