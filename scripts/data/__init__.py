"""Data: everything between files on disk and the tensors the engines see.

Split by concern, each module importing only those before it in this list (no import cycle):

- :mod:`scripts.data.contracts`: the input contracts (intensity range, label set, geometry, safe ids, the written-files
  marker) and :class:`DataError`, the error every check raises, naming the file and the problem.
- :mod:`scripts.data.datalist`: the ``datalist.json`` format (docs/CONTRACTS.md), its keys and splits, and
  :class:`TolerantDataset`, which turns one unreadable pair into a failure record instead of a stopped run.
- :mod:`scripts.data.transforms`: the paired MONAI transforms shared by every data source (:func:`paired_transforms`).
- :mod:`scripts.data.phantom`: the built-in cardiac phantom with its ground truth (versions 1 and 2; anatomy, noise
  and residual moments in submodules).
- :mod:`scripts.data.builders`: datalist builders for real data (ACDC, CAMUS, any list of paired files).

The names below are the ones the configs use (``scripts.data.load_datalist`` ...); the builders and the phantom are
reached through their subpackages.
"""

from scripts.data.contracts import DataError
from scripts.data.datalist import (
    DATALIST_NAME,
    FAILED_KEY,
    FIELD_KEYS,
    IMAGE_KEYS,
    LABEL_KEYS,
    PAIR_KEYS,
    PATH_KEYS,
    PHANTOM_IMAGE_KEYS,
    SPLITS,
    TolerantDataset,
    datalist_path,
    load_datalist,
    prepare_dataset,
    tolerant_collate,
)
from scripts.data.transforms import CheckPaird, LoadPaird, ResizeIfNeededd, paired_transforms

__all__ = [
    "DataError",
    "DATALIST_NAME",
    "FAILED_KEY",
    "FIELD_KEYS",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "PAIR_KEYS",
    "PATH_KEYS",
    "PHANTOM_IMAGE_KEYS",
    "SPLITS",
    "TolerantDataset",
    "datalist_path",
    "load_datalist",
    "prepare_dataset",
    "tolerant_collate",
    "CheckPaird",
    "LoadPaird",
    "ResizeIfNeededd",
    "paired_transforms",
]
