"""Datalist builders for real data: ACDC, CAMUS, Sunnybrook and any list of paired NIfTI / MHD / NRRD files.

Each builder reads the data as the provider distributes it, preprocesses it (see ``docs/data.md``), writes NIfTI files
and a ``datalist.json`` in the contract format (docs/CONTRACTS.md) into ``out``, and returns the datalist path. Training
then reads the folder with the same :func:`scripts.data.paired_transforms` as the phantom.

Modules: :mod:`.io` (reading NIfTI / ITK files, label and intensity checks, the label maps), :mod:`.output`
(the all-or-nothing writer, splits), :mod:`.acdc`, :mod:`.camus` and :mod:`.pairs` (one builder each).

Writing is all-or-nothing: everything goes to a hidden temporary folder next to ``out`` that is renamed to ``out`` at
the very end; on any error it is removed. ``out`` must not be, contain or lie inside an input (the data is never
touched); ``overwrite`` replaces only a folder this module wrote (its marker file,
:data:`scripts.data.contracts.MARKER_NAME`, lists every file) and never deletes a file the marker does not list. Ids
become file names only through :func:`scripts.data.contracts.safe_id` (no path separators, no ``..``), so nothing is
written outside ``out``.

Bad input raises :class:`scripts.data.DataError` naming the file and the problem (labels outside the label set, grids
that differ, truncated or NaN files...); what can be skipped safely is skipped with a :class:`DataWarning` that says
what was skipped.

Label convention of the project: 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV (CAMUS: 3 = left atrium).
"""

from __future__ import annotations

import os
from pathlib import Path

from scripts.data.builders.acdc import build_acdc
from scripts.data.builders.camus import build_camus
from scripts.data.builders.echo_cine import build_echo_cine
from scripts.data.builders.io import ACDC_LABEL_MAP, CAMUS_LABEL_MAP, DataWarning, Volume, read_image
from scripts.data.builders.pairs import build_pairs
from scripts.data.builders.sunnybrook import build_sunnybrook

__all__ = [
    "DataWarning",
    "Volume",
    "read_image",
    "build_acdc",
    "build_camus",
    "build_echo_cine",
    "build_pairs",
    "build_sunnybrook",
    "build_datalist",
    "BUILDERS",
    "ACDC_LABEL_MAP",
    "CAMUS_LABEL_MAP",
]

BUILDERS = {
    "acdc": build_acdc,
    "camus": build_camus,
    "echo_cine": build_echo_cine,
    "pairs": build_pairs,
    "sunnybrook": build_sunnybrook,
}


def build_datalist(dataset: str, root: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """Dispatch to :func:`build_acdc`, :func:`build_camus` or :func:`build_pairs` (``root`` = the pair list)."""
    key = str(dataset).lower()
    if key not in BUILDERS:
        raise ValueError(f"dataset must be one of {sorted(BUILDERS)}, got {dataset!r}")
    return BUILDERS[key](root, out, **options)
