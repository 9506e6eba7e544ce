"""The built-in synthetic cardiac phantom: ED/ES pairs with ground-truth motion, labels and noise level.

No public data can be downloaded, so the bundle carries its own data set. Each pair is generated from a continuous
model, which gives what real data never gives:

* the true dense displacement field (DDF) ``z`` with ``ES(x) = ED(x + z(x))`` (``monai.networks.blocks.Warp``
  convention: voxel units, channel ``i`` = displacement along array axis ``i``, ``align_corners=True``);
* the true ED and ES labels (0 background, 1 LV blood pool, 2 LV myocardium, 3 RV blood pool);
* the true per-pixel standard deviation of the noise of the fixed (ES) image given its clean image.

Kinds: ``echo2d`` (short-axis echo, 128x128), ``echo3d`` (apical 3D echo, 64^3) and ``mri2d`` (short-axis cine MRI,
128x128). The model and its equations are documented in ``docs/phantom.md``.

Construction of a pair (all kinds):

1. anatomy in ED coordinates, as soft (anti-aliased) membership functions that can be evaluated at any point:
   LV endocardium / epicardium (ellipses / truncated half-ellipsoids with low-order Fourier boundary modes), RV
   (an ellipse / ellipsoid minus the LV), RV free wall, papillary muscles, pericardium, smooth background texture;
2. a smooth, invertible backward map ``T(x) = x + z(x)`` from ES to ED coordinates (volume-preserving radial
   contraction of the LV, twist/torsion, RV squeeze, translation, small random smooth field);
3. the ES clean image and ES labels are the ED model evaluated at ``T(x)`` (consistent by construction);
4. acquisition (gain, attenuation, shadowing, dropout, clutter / coil profile, ghosting, bands) and noise
   (log-compressed Nakagami speckle / Rician noise): version 1 draws it independently for ED and ES; version 2 (the
   default) draws the scanner settings once per cine loop and frame-specific events in exactly one frame;
5. the ground truth of the residual ``I_f - Warp(I_m, z)`` over noise draws of both frames (``residual_std``,
   ``residual_mean``) and the noise std of both frames.

Modules: this one (API, pairs, files, gallery), :mod:`scripts.data.phantom.anatomy` (anatomy, motion, rendering),
:mod:`scripts.data.phantom.noise` (acquisition and noise of both versions), :mod:`scripts.data.phantom.residual`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.phantom.anatomy import (  # noqa: F401  (re-exported: the phantom's internals stay reachable here)
    EDGE_PX,
    _anatomy_fields,
    _as_rng,
    _backward_map,
    _grid,
    _random_field,
    _render_clean,
    _sample,
    _sample_anatomy,
    _sample_look,
    _sample_motion,
    _sig,
)
from scripts.data.phantom.noise import (  # noqa: F401
    _echo_acquisition_v2,
    _echo_frame,
    _echo_frame_v2,
    _echo_geometry,
    _echo_mean_level,
    _mri_acquisition_v2,
    _mri_coil,
    _mri_frame,
    _mri_frame_v2,
    _mri_maps_v2,
    _mri_sigma,
    noise_mean,
    noise_std,
    sample_noise,
)
from scripts.data.phantom.residual import log_speckle_correlation, residual_moments  # noqa: F401

__all__ = [
    "KINDS",
    "DEFAULT_SIZE",
    "DEFAULT_SPLITS_3D",
    "LABELS",
    "spatial_size",
    "default_spacing",
    "make_pair",
    "sample_noise",
    "noise_std",
    "noise_mean",
    "residual_moments",
    "log_speckle_correlation",
    "file_keys",
    "check_dataset",
    "VERSIONS",
    "DEFAULT_VERSION",
    "write_dataset",
    "save_preview",
    "warp",
    "jacobian_determinant",
    "inside_mask",
    "dice",
    "pair_rng",
]

KINDS = ("echo2d", "echo3d", "mri2d")
# the generator named in datalist.json; version 1 keeps the path it was written with (its files stay byte-identical)
_GENERATOR = {1: "scripts/phantom.py", 2: "scripts/data/phantom"}
DEFAULT_SIZE = {"echo2d": 128, "mri2d": 128, "echo3d": 64}
DEFAULT_SPLITS_3D = (60, 20, 20)  # documented pair counts for echo3d (the paper's private 3D echo split)
LABELS = {"background": 0, "lv_blood_pool": 1, "lv_myocardium": 2, "rv": 3}
FOV_MM = 160.0  # field of view along the shortest image axis: 1.25 mm pixels at 128, 2.5 mm voxels at 64
SPLIT_CODES = {"training": 0, "validation": 1, "test": 2}
KIND_CODES = {"echo2d": 0, "echo3d": 1, "mri2d": 2}
FILE_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std", "moving_clean", "fixed_clean")
FILE_KEYS_V2 = FILE_KEYS + ("moving_noise_std", "residual_std", "residual_mean")  # written from version 2 on
VERSIONS = (1, 2)
DEFAULT_VERSION = 2
PHANTOM_VERSION = DEFAULT_VERSION  # the version new data sets get (kept for backward compatibility of the name)


def file_keys(version: int = DEFAULT_VERSION) -> tuple[str, ...]:
    """The image files written per pair by phantom ``version``."""
    return FILE_KEYS if _check_version(version) == 1 else FILE_KEYS_V2


def _check_version(version) -> int:
    try:
        v = int(version)
    except (TypeError, ValueError):
        v = None
    if v not in VERSIONS or (isinstance(version, float) and version != v):
        raise ValueError(f"unknown phantom version {version!r}; choose one of {VERSIONS}.")
    return v


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------------
def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {KINDS}.")
    return kind


def spatial_size(kind: str, size: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The array shape of a kind: ``size`` (int or tuple), default 128x128 (2D) or 64^3 (echo3d)."""
    ndim = 3 if _check_kind(kind) == "echo3d" else 2
    if size is None:
        size = DEFAULT_SIZE[kind]
    if isinstance(size, (int, np.integer)):
        shape = (int(size),) * ndim
    else:
        shape = tuple(int(s) for s in size)
        if len(shape) == 1:
            shape = shape * ndim
    if len(shape) != ndim:
        raise ValueError(f"size {size!r} has {len(shape)} dims, kind {kind!r} needs {ndim}.")
    if min(shape) < 16:
        raise ValueError(f"size {shape} is too small for the phantom (min 16 per axis).")
    return shape


def default_spacing(kind: str, size: int | Sequence[int] | None = None) -> tuple[float, ...]:
    """Isotropic voxel spacing in mm: the field of view (160 mm along the shortest axis) over the size."""
    shape = spatial_size(kind, size)
    sp = FOV_MM / min(shape)
    return (sp,) * len(shape)


def pair_rng(seed: int, kind: str = "echo2d", split: str = "training", index: int = 0) -> np.random.Generator:
    """The generator of pair ``index`` of ``split``: pairs do not depend on the split sizes or on other pairs."""
    return np.random.default_rng([int(seed), KIND_CODES[_check_kind(kind)], SPLIT_CODES[split], int(index)])


# ----------------------------------------------------------------------------------------------------------------------
# a pair
# ----------------------------------------------------------------------------------------------------------------------
def _heart_soft(f: Mapping, mm: float) -> np.ndarray:
    """A smooth heart mask (the part of the image that moves with the heart beat: the source of motion ghosts)."""
    h = np.clip(f["blood"] + f["pap"] + f["myo"] + f["rv"] + f["rvw"], 0, 1)
    return np.clip(ndimage.gaussian_filter(h, 3.0 * mm) * 1.5, 0, 1)


def make_pair(
    rng=0, kind: str = "echo2d", size: int | Sequence[int] | None = None, version: int = DEFAULT_VERSION
) -> dict:
    """Generate one ED -> ES pair.

    Args:
        rng: a ``numpy.random.Generator`` or a seed.
        kind: ``"echo2d"``, ``"echo3d"`` or ``"mri2d"``.
        size: spatial size (int or tuple); default 128 (2D) or 64 (3D).
        version: phantom version, 1 or 2 (default). Both draw the same anatomy, motion, labels, DDF and clean
            images from the same generator; they differ in the acquisition and noise (docs/phantom.md).

    Returns:
        dict of numpy arrays: ``moving``, ``fixed``, ``moving_clean``, ``fixed_clean``, ``noise_std`` (fixed image),
        ``moving_noise_std`` (moving image), ``residual_std`` / ``residual_mean`` (RMS and mean of
        ``I_f - Warp(I_m, z)`` over noise draws of both frames, :func:`residual_moments`; float32),
        ``moving_label``, ``fixed_label`` (uint8), ``ddf`` (float32, channel-last ``shape + (ndim,)``, voxels,
        ``Warp`` convention), ``spacing`` (tuple, mm), ``version``, and the frame parameters ``moving_params`` /
        ``fixed_params`` (for :func:`sample_noise` / :func:`noise_std`) and the sampled ``anatomy`` / ``motion``
        (for inspection). Version 1 files hold only :data:`FILE_KEYS`; version 2 also the three residual maps.
    """
    rng = _as_rng(rng)
    kind = _check_kind(kind)
    version = _check_version(version)
    shape = spatial_size(kind, size)
    spacing = default_spacing(kind, size)
    ndim = len(shape)
    anat = _sample_anatomy(rng, kind, shape, spacing)
    mm = anat["mm"]
    motion = _sample_motion(rng, anat)
    look = _sample_look(rng, kind)
    grid = _grid(shape)
    pts_es = _backward_map(anat, motion, grid, rng)
    ddf = pts_es - grid

    # textures defined on the ED grid, sampled at T(x) for ES (smooth: bilinear sampling is accurate)
    fields = {"large": (12.0 * mm, 1), "fine": (1.2 * max(mm, 0.6), 1), "myo": (2.0 * mm, 1)}
    if kind == "mri2d":
        fields["large2"] = (14.0 * mm, 1)
    tex_ed = {k: _random_field(rng, shape, s, n)[0] for k, (s, n) in fields.items()}
    if kind == "mri2d":
        tex_ed["fat_phase"] = np.pi * _random_field(rng, shape, 10.0 * mm, 1)[0]
    tex_es = {k: _sample(v, pts_es) for k, v in tex_ed.items()}

    f_ed = _anatomy_fields(anat, grid)
    f_es = _anatomy_fields(anat, pts_es)
    clean_ed = _render_clean(kind, anat, f_ed, tex_ed, look)
    clean_es = _render_clean(kind, anat, f_es, tex_es, look)

    if kind.startswith("echo"):
        geo = _echo_geometry(rng, shape, mm)
        c_ed = anat["centre"]
        c_es = anat["centre"] + motion["shift"]
        if version == 1:
            p_ed = _echo_frame(rng, geo, anat, f_ed, c_ed, grid)
            p_es = _echo_frame(rng, geo, anat, f_es, c_es, grid)
        else:
            acq = _echo_acquisition_v2(rng, geo, ndim, mm)
            p_ed = _echo_frame_v2(acq, geo, anat, f_ed, c_ed, grid, 0)
            p_es = _echo_frame_v2(acq, geo, anat, f_es, c_es, grid, 1)
    elif version == 2:
        heart_soft = [_heart_soft(f, mm) for f in (f_ed, f_es)]
        acq = _mri_acquisition_v2(rng, shape)
        sigma, shade, _ = _mri_maps_v2(acq, grid, anat["centre"] + motion["shift"])
        p_ed = _mri_frame_v2(acq, sigma, shade, clean_ed, heart_soft[0], grid, 0)
        p_es = _mri_frame_v2(acq, sigma, shade, clean_es, heart_soft[1], grid, 1)
    else:
        coil = _mri_coil(rng, shape, mm)
        heart_es = ndimage.binary_dilation(f_es["labels"] > 0, iterations=3)
        sigma = _mri_sigma(coil, grid, heart_es)
        heart_soft = [_heart_soft(f, mm) for f in (f_ed, f_es)]
        p_ed = _mri_frame(rng, sigma, clean_ed, heart_soft[0], grid)
        p_es = _mri_frame(rng, sigma, clean_es, heart_soft[1], grid)
    moving = sample_noise(clean_ed, p_ed, rng)
    fixed = sample_noise(clean_es, p_es, rng)
    ddf_cl = np.moveaxis(ddf, 0, -1).astype(np.float32)
    residual_mean, residual_std = residual_moments(clean_es, p_es, clean_ed, p_ed, ddf_cl)
    return {
        "moving": moving,
        "fixed": fixed,
        "moving_clean": clean_ed.astype(np.float32),
        "fixed_clean": clean_es.astype(np.float32),
        "moving_label": f_ed["labels"],
        "fixed_label": f_es["labels"],
        "ddf": ddf_cl,
        "noise_std": noise_std(clean_es, p_es),
        "moving_noise_std": noise_std(clean_ed, p_ed),
        "residual_std": residual_std,
        "residual_mean": residual_mean,
        "spacing": tuple(float(s) for s in spacing),
        "version": version,
        "moving_params": p_ed,
        "fixed_params": p_es,
        "anatomy": anat,
        "motion": motion,
        "kind": kind,
    }


# ----------------------------------------------------------------------------------------------------------------------
# checks shared by tests / benchmark
# ----------------------------------------------------------------------------------------------------------------------
def warp(image: np.ndarray, ddf: np.ndarray, mode: str = "bilinear", padding_mode: str = "border") -> np.ndarray:
    """Warp ``image`` (spatial array) with a channel-last DDF exactly as ``monai.networks.blocks.Warp`` does."""
    import warnings

    import torch
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = Warp(mode=mode, padding_mode=padding_mode)
        img = torch.as_tensor(np.asarray(image, np.float32))[None, None]
        z = torch.as_tensor(np.moveaxis(np.asarray(ddf, np.float32), -1, 0))[None]
        return w(img, z)[0, 0].numpy()


def inside_mask(ddf: np.ndarray) -> np.ndarray:
    """Pixels whose ED position x + z(x) lies inside the image: there a warped ED image can match the ES image."""
    shape = ddf.shape[:-1]
    grid = _grid(shape)
    ok = np.ones(shape, bool)
    for i, s in enumerate(shape):
        pos = grid[i] + ddf[..., i]
        ok &= (pos >= 0) & (pos <= s - 1)
    return ok


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """det(I + grad z) of a channel-last DDF: :func:`scripts.metrics.jacobian_determinant` on numpy arrays."""
    import torch

    from scripts.metrics import jacobian_determinant as _det

    return _det(torch.as_tensor(np.moveaxis(np.asarray(ddf), -1, 0))).numpy()


def dice(a: np.ndarray, b: np.ndarray, label: int = 2) -> float:
    a, b = np.asarray(a) == label, np.asarray(b) == label
    den = a.sum() + b.sum()
    return float(2 * (a & b).sum() / den) if den else 1.0


# ----------------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------------
def _nifti_header(shape: tuple, dtype: str, spacing: tuple) -> bytes:
    """NIfTI-1 header (+ empty extension flag) of an array: fixed affine (diag(spacing)), mm units, no timestamps."""
    return _nifti_header_cached(tuple(int(s) for s in shape), np.dtype(dtype).str, tuple(float(s) for s in spacing))


@functools.lru_cache(maxsize=64)
def _nifti_header_cached(shape, dtype, spacing) -> bytes:
    import nibabel as nib

    nsp = len(spacing)
    affine = np.eye(4)
    for i, s in enumerate(spacing[:3]):
        affine[i, i] = s
    img = nib.Nifti1Image(np.zeros(shape, np.dtype(dtype)), affine)
    hdr = img.header
    hdr.set_xyzt_units("mm")
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    if len(shape) > nsp:  # channel-last vector field: unit spacing along the component axis
        zooms = list(hdr.get_zooms())
        zooms[nsp:] = [1.0] * (len(shape) - nsp)
        hdr.set_zooms(zooms)
    raw = img.to_bytes()
    offset = int(nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]))["vox_offset"])
    return raw[:offset]


def _nifti_gz_bytes(arr: np.ndarray, spacing: Sequence[float]) -> bytes:
    """Deterministic .nii.gz bytes: cached header (fixed affine), Fortran-ordered data, gzip with mtime 0, no name."""
    arr = np.asarray(arr)
    raw = _nifti_header(arr.shape, arr.dtype.str, tuple(spacing)) + arr.tobytes(order="F")
    return gzip.compress(raw, compresslevel=1, mtime=0)


def _write_pair(pair: Mapping, folder: Path, rel: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    item = {"id": folder.name}
    for key in file_keys(pair.get("version", 1)):
        (folder / f"{key}.nii.gz").write_bytes(_nifti_gz_bytes(pair[key], pair["spacing"]))
        item[key] = f"{rel}/{key}.nii.gz"
    item["spacing"] = [round(s, 6) for s in pair["spacing"]]
    return item


def _generate_and_write(job) -> tuple[dict, dict | None]:
    """Worker: generate pair (split, i) and write its files; return the datalist item (and the pair if kept)."""
    out, kind, shape, seed, split, i, keep, version = job
    pair = make_pair(pair_rng(seed, kind, split, i), kind, shape, version=version)
    name = f"{kind}_{split}_{i:04d}"
    item = _write_pair(pair, Path(out) / split / name, f"{split}/{name}")
    return item, (pair if keep else None)


def write_dataset(
    out_dir: str | os.PathLike,
    kind: str = "echo2d",
    n_train: int = 600,
    n_val: int = 200,
    n_test: int = 200,
    size: int | Sequence[int] | None = None,
    seed: int = 0,
    preview: str | os.PathLike | bool | None = None,
    progress: bool = True,
    workers: int = 1,
    version: int = DEFAULT_VERSION,
) -> str:
    """Write a phantom data set (NIfTI files + ``datalist.json``) into ``out_dir``; return the datalist path.

    Layout: ``out_dir/datalist.json`` and ``out_dir/<split>/<id>/<key>.nii.gz`` for the keys moving, fixed,
    moving_label, fixed_label, ddf, noise_std, moving_clean, fixed_clean and, from ``version`` 2 on (the default),
    moving_noise_std, residual_std, residual_mean; ``id = <kind>_<split>_<index:04d>``. The datalist's ``phantom``
    entry records kind, seed, size, spacing and ``version``; version 1 writes exactly what it always wrote.
    Pair ``i`` of a split depends only on (seed, kind, split, i): the same seed gives identical bytes, whatever
    the split sizes or ``workers``. The paper's 3D split is 60/20/20: pass ``n_train=60, n_val=20, n_test=20``
    for echo3d. ``preview``: a PNG path (or True for ``out_dir/preview.png``) for a gallery of the first
    training pairs. ``workers`` > 1 generates pairs in that many forked processes.
    """
    from tqdm.auto import tqdm

    kind = _check_kind(kind)
    version = _check_version(version)
    out = Path(out_dir)
    counts = {"training": int(n_train), "validation": int(n_val), "test": int(n_test)}
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative or int(n_train) != n_train or int(n_val) != n_val or int(n_test) != n_test:
        raise ValueError(
            f"pair counts must be whole numbers >= 0, got n_train={n_train}, n_val={n_val}, n_test={n_test}."
        )
    out.mkdir(parents=True, exist_ok=True)
    shape = spatial_size(kind, size)
    datalist = {
        "description": f"built-in cardiac phantom ({kind}), {_GENERATOR[version]} v{version}",
        "phantom": {
            "kind": kind,
            "seed": int(seed),
            "size": list(shape),
            "spacing": list(default_spacing(kind, size)),
            "version": version,
        },
        "labels": {str(v): k for k, v in LABELS.items()},
        "training": [],
        "validation": [],
        "test": [],
    }
    n_gallery = 3
    jobs = [
        (str(out), kind, shape, int(seed), split, i, bool(preview) and split == "training" and i < n_gallery, version)
        for split, n in counts.items()
        for i in range(n)
    ]
    gallery = []
    bar = tqdm(total=len(jobs), desc=f"phantom {kind}", disable=not progress, unit="pair")
    workers = max(1, min(int(workers or 1), len(jobs)))
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.imap(_generate_and_write, jobs, chunksize=4)
            for job, (item, pair) in zip(jobs, results):
                datalist[job[4]].append(item)
                if pair is not None:
                    gallery.append(pair)
                bar.update(1)
    else:
        for job in jobs:
            item, pair = _generate_and_write(job)
            datalist[job[4]].append(item)
            if pair is not None:
                gallery.append(pair)
            bar.update(1)
    bar.close()
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    if preview:
        png = out / "preview.png" if preview is True else Path(preview)
        if not gallery:
            gallery = [
                make_pair(pair_rng(seed, kind, "training", i), kind, shape, version=version) for i in range(n_gallery)
            ]
        save_preview(gallery, png)
    return str(path)


def check_dataset(datalist: str | os.PathLike, **phantom) -> dict:
    """Refuse a phantom data set written with other generator settings than the ``phantom`` arguments asked for.

    ``phantom`` are :func:`write_dataset` keyword arguments (kind, seed, size, version; others are ignored). A
    datalist without a ``phantom`` entry (real data) passes; one without a recorded version is version 1. Returns the
    datalist's ``phantom`` entry; raises ``ValueError`` naming the file, the setting and both values.
    """
    path = Path(datalist)
    path = path if path.suffix == ".json" else path / "datalist.json"
    info = json.loads(path.read_text()).get("phantom")
    if not isinstance(info, dict):
        return {}
    want = {
        "kind": phantom.get("kind", "echo2d"),
        "seed": int(phantom.get("seed", 0)),
        "version": _check_version(phantom.get("version", DEFAULT_VERSION)),
    }
    if phantom.get("size") is not None:
        want["size"] = list(spatial_size(want["kind"], phantom["size"]))
    have = dict(info, version=int(info.get("version", 1)))
    for key, value in want.items():
        if key in have and have[key] != value:
            raise ValueError(
                f"{path}: phantom data set has {key}={have[key]!r} but {key}={value!r} was asked for; point "
                f"dataset_dir at a new folder (e.g. data/phantom_{want['kind']}_v{want['version']}) to write it."
            )
    return info


# ----------------------------------------------------------------------------------------------------------------------
# preview gallery
# ----------------------------------------------------------------------------------------------------------------------
def _mid(arr, pair, axis_last=False):
    """A 2D view: the array itself (2D) or the slice through the LV centre along the last axis (3D)."""
    a = np.asarray(arr)
    nd = len(pair["spacing"])
    if nd == 2:
        return a
    k = int(np.clip(round(pair["anatomy"]["centre"][2]), 0, a.shape[2] - 1))
    return a[:, :, k]


def save_preview(pairs: Sequence[Mapping], path: str | os.PathLike) -> str:
    """A gallery PNG: per pair ED, ES (label contours), labels, noise_std, residual_std, GT displacement, ES clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap_lbl = ListedColormap(["black", "tab:red", "gold", "tab:blue"])
    cols = [
        "ED (moving)",
        "ES (fixed)",
        "ES labels (ED myo: white)",
        "noise_std (ES)",
        "residual_std",
        "GT |DDF| + arrows",
        "ES clean",
    ]
    n = len(pairs)
    fig, axes = plt.subplots(n, len(cols), figsize=(3.0 * len(cols), 3.0 * n), squeeze=False)
    for r, p in enumerate(pairs):
        ed, es = _mid(p["moving"], p), _mid(p["fixed"], p)
        led, les = _mid(p["moving_label"], p), _mid(p["fixed_label"], p)
        ddf = p["ddf"]
        nd = ddf.shape[-1]
        if nd == 3:
            k = int(np.clip(round(p["anatomy"]["centre"][2]), 0, ddf.shape[2] - 1))
            d2 = ddf[:, :, k, :2]
        else:
            d2 = ddf
        axes[r, 0].imshow(ed, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].contour(led == 2, levels=[0.5], colors="gold", linewidths=0.6)
        axes[r, 1].imshow(es, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].contour(les == 2, levels=[0.5], colors="gold", linewidths=0.6)
        axes[r, 1].contour(led == 2, levels=[0.5], colors="cyan", linewidths=0.4, linestyles="dotted")
        axes[r, 2].imshow(les, cmap=cmap_lbl, vmin=0, vmax=3, interpolation="nearest")
        axes[r, 2].contour(led == 2, levels=[0.5], colors="w", linewidths=0.6)
        im = axes[r, 3].imshow(_mid(p["noise_std"], p), cmap="magma")
        fig.colorbar(im, ax=axes[r, 3], fraction=0.046, pad=0.02)
        im = axes[r, 4].imshow(_mid(p["residual_std"], p), cmap="magma")
        axes[r, 4].contour(les == 2, levels=[0.5], colors="cyan", linewidths=0.4)
        fig.colorbar(im, ax=axes[r, 4], fraction=0.046, pad=0.02)
        mag = np.sqrt((d2**2).sum(-1))
        im = axes[r, 5].imshow(mag, cmap="viridis")
        fig.colorbar(im, ax=axes[r, 5], fraction=0.046, pad=0.02)
        step = max(1, mag.shape[0] // 16)
        yy, xx = np.mgrid[0 : mag.shape[0] : step, 0 : mag.shape[1] : step]
        # arrows point from the ES pixel to where its tissue was at ED (x + z)
        axes[r, 5].quiver(
            xx,
            yy,
            d2[::step, ::step, 1],
            -d2[::step, ::step, 0],
            color="w",
            scale_units="xy",
            angles="xy",
            scale=1.0,
            width=0.004,
        )
        axes[r, 5].contour(les == 2, levels=[0.5], colors="red", linewidths=0.5)
        axes[r, 6].imshow(_mid(p["fixed_clean"], p), cmap="gray", vmin=0, vmax=1)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(
            f"{p['kind']} v{p.get('version', 1)} #{r}" + (" (mid slice)" if nd == 3 else ""), fontsize=9
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
