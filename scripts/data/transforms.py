"""The paired transforms shared by every data source: load, check and resize a registration pair.

The data contract (docs/CONTRACTS.md): a dataset folder holds ``datalist.json`` with ``training`` / ``validation`` /
``test`` lists of items ``{"moving", "fixed"[, "moving_label", "fixed_label", "ddf", "noise_std", "moving_noise_std",
"residual_std", ...]}``; paths are
relative to the JSON file. Registration warps ``moving`` (ED) onto ``fixed`` (ES).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityRangePercentilesd,
)

from scripts.data.contracts import DataError
from scripts.data.datalist import FIELD_KEYS, IMAGE_KEYS, LABEL_KEYS, PAIR_KEYS, PHANTOM_IMAGE_KEYS

logger = logging.getLogger(__name__)


class LoadPaird(MapTransform):
    """:class:`monai.transforms.LoadImaged` key by key; a file that cannot be read (truncated ``.nii.gz``, zero-byte
    or corrupt file) is a :class:`DataError` naming the file, the key and a one-line diagnosis instead of a bare
    ``EOFError``."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True, **load_kwargs):
        super().__init__(keys, allow_missing_keys)
        load_kwargs.setdefault("image_only", True)
        self.loaders = {k: LoadImaged(k, **load_kwargs) for k in self.keys}

    def __call__(self, data: Mapping) -> dict:
        from scripts.data.contracts import read_error

        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:  # an optional file given as null: same as absent
                d.pop(key)
                continue
            try:
                d = self.loaders[key](d)
            except Exception as e:  # nibabel / gzip / ITK: name the file
                raise read_error(d[key], self._gzip_cause(d[key], e), f"'{key}' file") from None
        return d

    @staticmethod
    def _gzip_cause(path, exc: BaseException) -> BaseException:
        """For a ``.gz`` file that failed to load, the gzip error (e.g. ``EOFError`` of a truncated file) if any: the
        readers' own message ("cannot work out file type") hides it."""
        import gzip
        import zlib

        if not str(path).endswith(".gz"):
            return exc
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except (EOFError, OSError, zlib.error) as e:
            return e
        return exc


class CheckPaird(MapTransform):
    """Check a loaded pair against the input contract (docs/data.md, scripts/data/contracts.py).

    - matching spatial shapes and dimensionality (``spatial_dims``);
    - finite values everywhere; images (``moving``/``fixed``) not constant and, with ``intensity="none"``, already in
      [0, 1] (:func:`scripts.data.contracts.check_intensity`: out-of-range images are refused, naming the file and
      ``intensity: percentile``);
    - labels: integers of ``label_values`` (:func:`scripts.data.contracts.check_labels`; default the project's 0-3);
    - geometry: ``moving``, ``moving_label`` and ``fixed_label`` on the grid of ``fixed`` (spacing, direction and
      origin of the affines, :func:`scripts.data.contracts.check_geometry`), errors naming both files.

    Errors are :class:`DataError` naming the offending file (from the image meta data) and the problem.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        allow_missing_keys: bool = True,
        intensity: str = "none",
        label_values: Sequence[int] | None = None,
        check_grid: bool = True,
    ):
        from scripts.data.contracts import INTENSITY_POLICIES, LABEL_SET

        super().__init__(keys, allow_missing_keys)
        if intensity not in INTENSITY_POLICIES:
            raise ValueError(f"intensity must be one of {list(INTENSITY_POLICIES)}, got {intensity!r}.")
        self.spatial_dims = spatial_dims
        self.intensity = intensity
        self.label_values = tuple(LABEL_SET if label_values is None else (int(v) for v in label_values))
        self.check_grid = check_grid

    @staticmethod
    def _name(d: Mapping, key: str) -> str:
        meta = getattr(d[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def __call__(self, data: Mapping) -> dict:
        from scripts.data.contracts import check_geometry, check_intensity, check_labels

        d = dict(data)
        ref_key, ref_shape = None, None
        for key in self.key_iterator(d):
            x = d[key]
            name = self._name(d, key)
            spatial = tuple(x.shape[1:])
            if self.spatial_dims is not None and len(spatial) != self.spatial_dims:
                raise DataError(
                    f"{name}: '{key}' has {len(spatial)} spatial dims (shape {tuple(x.shape)}), expected "
                    f"{self.spatial_dims} (spatial_dims of the config)."
                )
            if ref_shape is None:
                ref_key, ref_shape = key, spatial
            elif spatial != ref_shape:
                raise DataError(
                    f"{name}: '{key}' has spatial shape {spatial} but '{ref_key}' ({self._name(d, ref_key)}) "
                    f"has {ref_shape}."
                )
            t = torch.as_tensor(x)
            if not torch.isfinite(t).all():
                raise DataError(f"{name}: '{key}' contains NaN or Inf voxels.")
            if key in IMAGE_KEYS:
                check_intensity(t, name, policy=self.intensity, key=key)
            elif key in LABEL_KEYS:
                check_labels(t, name, self.label_values, key=key)
        if self.check_grid and "fixed" in d:
            ref = self._affine(d, "fixed")
            for key in ("moving", "moving_label", "fixed_label"):
                aff = self._affine(d, key) if key in d and key in self.keys else None
                if aff is None or ref is None:
                    continue
                check_geometry(
                    aff,
                    ref,
                    [self._name(d, key), self._name(d, "fixed")],
                    moving_shape=tuple(d[key].shape[1:]),
                    fixed_shape=tuple(d["fixed"].shape[1:]),
                    keys=(key, "fixed"),
                    resample_allowed=False,
                )
        return d

    @staticmethod
    def _affine(d: Mapping, key: str):
        meta = getattr(d[key], "meta", None) or {}
        return meta.get("affine")


def paired_transforms(
    spatial_size: Sequence[int] | None = None,
    keys: Sequence[str] = PAIR_KEYS,
    intensity: str = "none",
    label_values: Sequence[int] | None = None,
) -> Compose:
    """Load and prepare a registration pair as the networks expect it (channel-first float32 tensors).

    Args:
        spatial_size: resize images and labels to this size when they differ (``None``: keep). Ground-truth DDFs
            are never resized: a size mismatch there is an error.
        keys: the keys to load; keys absent from an item are skipped.
        intensity: ``"none"`` (images are already in [0, 1], as the phantom and the datalist builders write them;
            images outside [0, 1] are refused, naming the file) or ``"percentile"`` (clip to the 0.5-99.5
            percentiles and scale to [0, 1], for raw data).
        label_values: the allowed label values (default the project's 0, 1, 2, 3); other values are an error.

    Every file is checked when loaded (:class:`LoadPaird`, :class:`CheckPaird`): unreadable or truncated files, NaN,
    constant images, labels outside ``label_values``, moving / fixed on different grids are :class:`DataError`
    naming the file.
    """
    keys = tuple(keys)
    images = [k for k in keys if k in IMAGE_KEYS + PHANTOM_IMAGE_KEYS]
    labels = [k for k in keys if k in LABEL_KEYS]
    fields = [k for k in keys if k in FIELD_KEYS]
    xforms = [
        LoadPaird(keys, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(images + labels, allow_missing_keys=True),
    ]
    if fields:
        xforms.append(EnsureChannelFirstd(fields, channel_dim=-1, allow_missing_keys=True))
    xforms.append(
        CheckPaird(
            keys,
            spatial_dims=len(spatial_size) if spatial_size else None,
            intensity=intensity,
            label_values=label_values,
        )
    )
    if intensity == "percentile":
        xforms.append(
            ScaleIntensityRangePercentilesd(
                [k for k in IMAGE_KEYS if k in keys], 0.5, 99.5, 0.0, 1.0, clip=True, allow_missing_keys=True
            )
        )
    elif intensity != "none":
        raise ValueError(f"intensity must be 'none' or 'percentile', got {intensity!r}.")
    if spatial_size is not None:  # (each group only where ``keys`` has it: e.g. no DDF on real data)
        for group, mode in ((images, "bilinear"), (labels, "nearest"), (fields, None)):
            if group:
                xforms.append(ResizeIfNeededd(group, spatial_size, mode=mode))
    xforms += [
        CastToTyped(images + fields + labels, dtype=np.float32, allow_missing_keys=True),
        EnsureTyped(keys, track_meta=True, allow_missing_keys=True),
    ]
    return Compose(xforms)


class ResizeIfNeededd(MapTransform):
    """Resize to ``spatial_size`` only where the shape differs; ``mode=None`` forbids resizing (raises instead)."""

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], mode: str | None):
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = mode
        self.resize = None if mode is None else Resized(keys, self.spatial_size, mode=mode, allow_missing_keys=True)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) == self.spatial_size:
                continue
            if self.resize is None:
                raise DataError(
                    f"{CheckPaird._name(d, key)}: '{key}' has shape {tuple(d[key].shape[1:])}, the network size is "
                    f"{self.spatial_size}; ground-truth fields are not resized."
                )
            d = self.resize(d)
            break
        return d
