"""A 2D echocardiography cine (multi-frame ultrasound DICOM) -> frame pairs split by heart beat (docs/data.md).

Reading goes through MONAI's :class:`monai.data.PydicomReader` (pixel data; pydicom decodes the JPEG and returns RGB)
and the pydicom dataset it returns (the ultrasound region tags, the frame time): no hand-written DICOM parsing.

Pipeline (:func:`read_echo_cine` -> :func:`detect_cycles` -> :func:`build_echo_cine`):

1. Greyscale: the decoded RGB frames (pydicom has already converted YBR -> RGB: no second colour conversion) become
   their BT.601 luma ``0.299 R + 0.587 G + 0.114 B``, i.e. the stored Y of the RGB-encoded greyscale.
2. Crop to the ultrasound region of ``SequenceOfUltrasoundRegions`` (the 2D tissue region: ``RegionLocationMinX0``
   ... ``MaxY1``, inclusive), pixel size ``PhysicalDeltaY`` x ``PhysicalDeltaX`` (cm in the file, mm here).
3. Sector mask: the convex hull of the region pixels whose grey level varies over the cine (temporal std > 1 grey
   level). The sector of a phased array is convex; static overlays (depth digits, the orientation marker, text) do
   not vary and fall outside it. Pixels outside the sector are set to 0 (the phantom's background).
4. Resize each frame to ``spatial_size`` (bilinear with anti-aliasing, as CAMUS; the aspect ratio is not kept);
   ``spacing`` = the region's pixel size times the resize factor of each axis (array order: rows (depth), columns).
5. Intensity: ``clip(I / P, 0, 1)`` with ``P`` the ``percentile`` (99.9) of the in-sector pixels of the whole resized
   cine: one scale for all frames (they keep their relative brightness), 0 stays 0 (no offset: the black of the
   scanner's display is the absence of echo).
6. Cardiac cycles, ED and ES: :func:`detect_cycles` (the rule is documented there).
7. Pairs, split by beat (beat b = frames ED_b .. ED_{b+1} - 1): training = ED_b -> every other frame of each complete
   beat but the last; test = the last beat (complete, or partial if it holds its ES): ED -> ES (id ``*_ED_ES``) and
   ED -> every other frame; validation = the frames before the first ED (the end of the preceding cycle, in no
   training pair) registered from ED of the first beat. No frame of the test beat is in a training or validation pair.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.data.builders.camus import _resize2d, _resized_affine
from scripts.data.builders.output import _check_splits, _Writer, check_out
from scripts.data.contracts import DataError
from scripts.data.datalist import SPLITS

logger = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the Y of the YBR the file stores
_CM_UNITS = 3  # PhysicalUnitsX/YDirection: 3 = cm (DICOM PS3.3 C.8.5.5.1.15)
MIN_FRAMES = 16


@dataclass
class EchoCine:
    """A greyscale cine cropped to its ultrasound region: ``frames`` (N, rows, cols) float32 grey levels (0-255),
    ``mask`` (rows, cols) the sector, ``spacing`` (row, col) in mm, ``frame_time`` in ms, ``region`` the inclusive
    ``(x0, y0, x1, y1)`` pixel box of the region in the full frame, ``path`` the file."""

    frames: np.ndarray
    mask: np.ndarray
    spacing: tuple
    frame_time: float
    region: tuple
    path: Path
    meta: dict = field(default_factory=dict)


def _region(ds, path: Path, shape: tuple) -> tuple:
    regions = getattr(ds, "SequenceOfUltrasoundRegions", None)
    if not regions:
        raise DataError(
            f"{path}: no SequenceOfUltrasoundRegions (0018,6011): the ultrasound region (crop and pixel size) is "
            "unknown; this builder needs an ultrasound DICOM with region calibration."
        )
    cands = []
    for r in regions:
        need = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
        if not all(k in r for k in need + ("PhysicalDeltaX", "PhysicalDeltaY")):
            continue
        if int(r.get("RegionSpatialFormat", 1)) != 1:  # 1 = 2D tissue or flow (not M-mode, spectral...)
            continue
        x0, y0, x1, y1 = (int(r[k].value) for k in need)
        cands.append(((x1 - x0 + 1) * (y1 - y0 + 1), (x0, y0, x1, y1), r))
    if not cands:
        raise DataError(
            f"{path}: SequenceOfUltrasoundRegions has no 2D region with RegionLocationMinX0/MinY0/MaxX1/MaxY1 and "
            "PhysicalDeltaX/Y."
        )
    _, (x0, y0, x1, y1), r = max(cands, key=lambda c: c[0])
    rows, cols = shape
    if not (0 <= x0 < x1 < cols and 0 <= y0 < y1 < rows):
        raise DataError(f"{path}: ultrasound region x {x0}-{x1}, y {y0}-{y1} lies outside the {rows}x{cols} frame.")
    for axis in ("X", "Y"):
        units = int(r.get(f"PhysicalUnits{axis}Direction", _CM_UNITS))
        if units != _CM_UNITS:
            raise DataError(f"{path}: PhysicalUnits{axis}Direction is {units}, not 3 (cm): not a B-mode tissue region.")
    dx, dy = float(r.PhysicalDeltaX) * 10.0, float(r.PhysicalDeltaY) * 10.0  # cm -> mm
    if not (dx > 0 and dy > 0):
        raise DataError(f"{path}: PhysicalDeltaX/Y must be > 0, got {dx / 10}, {dy / 10} cm.")
    return (x0, y0, x1, y1), (dy, dx)


def _sector_mask(frames: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Convex hull of the pixels whose grey level varies over the cine (temporal std > ``threshold``)."""
    from scipy.spatial import ConvexHull, QhullError

    sd = frames.std(0)
    ys, xs = np.nonzero(sd > threshold)
    if len(ys) < 3:
        return np.zeros(sd.shape, bool)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return sd > threshold
    yy, xx = np.mgrid[: sd.shape[0], : sd.shape[1]]
    p = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)
    inside = np.all(p @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0.5, axis=1)
    return inside.reshape(sd.shape)


def read_echo_cine(path: str | os.PathLike) -> EchoCine:
    """Read a multi-frame ultrasound DICOM: greyscale frames of its ultrasound region, its sector and pixel size.

    Errors (:class:`DataError` naming the file): unreadable / not DICOM, not multi-frame, fewer than ``MIN_FRAMES``
    frames, no ultrasound region tags, a region outside the frame, no moving sector."""
    from monai.data import PydicomReader

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: echo cine DICOM file not found.")
    reader = PydicomReader(swap_ij=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = reader.read(str(path))
    except Exception as e:  # pydicom's InvalidDicomError and friends
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).") from None
    if isinstance(ds, list):
        raise DataError(f"{path}: a DICOM series folder, not one multi-frame file.")
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file without pixel data.")
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n < 2:
        raise DataError(f"{path}: not a multi-frame DICOM (NumberOfFrames {n}): a cine is needed to pair frames.")
    if n < MIN_FRAMES:
        raise DataError(f"{path}: {n} frames; at least {MIN_FRAMES} are needed to find cardiac cycles.")
    rows, cols = int(ds.Rows), int(ds.Columns)
    box, spacing = _region(ds, path, (rows, cols))
    quiet = logging.getLogger("monai.data")  # PydicomReader: "no ImagePositionPatient" (expected for ultrasound)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, _ = reader.get_data(ds)
    except Exception as e:
        raise DataError(f"{path}: pixel data could not be decoded ({type(e).__name__}: {e}).") from None
    finally:
        quiet.setLevel(level)
    arr = np.asarray(arr)
    spp = int(getattr(ds, "SamplesPerPixel", 1))
    expected = (n, rows, cols) + ((spp,) if spp > 1 else ())
    if arr.shape != expected:
        raise DataError(f"{path}: decoded pixel array {arr.shape}, expected {expected} (frames, rows, cols[, rgb]).")
    if spp == 3:  # pydicom returns RGB (YBR converted once by the decoder): take the luma, no second conversion
        grey = arr.astype(np.float32) @ np.asarray(LUMA, np.float32)
    elif spp == 1:
        grey = arr.astype(np.float32)
    else:
        raise DataError(f"{path}: SamplesPerPixel {spp}: neither greyscale nor RGB.")
    x0, y0, x1, y1 = box
    frames = np.ascontiguousarray(grey[:, y0 : y1 + 1, x0 : x1 + 1])
    if not np.isfinite(frames).all():
        raise DataError(f"{path}: non-finite pixel values.")
    mask = _sector_mask(frames)
    if mask.mean() < 0.05:
        raise DataError(f"{path}: the ultrasound region does not change over the cine (no moving sector found).")
    ft = getattr(ds, "FrameTime", None)
    if ft is None and getattr(ds, "CineRate", None):
        ft = 1000.0 / float(ds.CineRate)
    frame_time = float(ft) if ft else 1000.0 / 30.0
    meta = {
        "manufacturer": str(getattr(ds, "Manufacturer", "")),
        "modality": str(getattr(ds, "Modality", "")),
        "photometric": str(getattr(ds, "PhotometricInterpretation", "")),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
        "frame_time_from_file": ft is not None,
    }
    return EchoCine(frames, mask, spacing, frame_time, box, path, meta)


# ----------------------------------------------------------------------------------------------------------------------
# cardiac cycles
# ----------------------------------------------------------------------------------------------------------------------
def similarity_matrix(frames: np.ndarray, mask: np.ndarray, smooth: float = 1.0) -> np.ndarray:
    """Pearson correlation between every two frames over the sector pixels, after a Gaussian blur of ``smooth`` px
    (speckle decorrelates faster than the anatomy moves; the blur keeps the signal about the anatomy)."""
    from scipy.ndimage import gaussian_filter

    v = np.stack([gaussian_filter(f.astype(np.float64), smooth)[mask] if smooth else f[mask] for f in frames])
    v = v - v.mean(1, keepdims=True)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v @ v.T


def detect_cycles(
    frames: np.ndarray,
    mask: np.ndarray,
    frame_time: float,
    bpm_range: Sequence[float] = (40.0, 180.0),
    smooth: float = 1.0,
    source: str = "cine",
) -> dict:
    """ED and ES of every beat from the frames alone (no ECG, no labels).

    Rule:
    1. ``S`` = :func:`similarity_matrix` (correlation of every two frames inside the sector).
    2. Period ``T`` (frames): the highest peak of the mean lagged similarity ``a(k) = mean_i S[i, i+k]`` (the
       autocorrelation of the frame sequence) among lags of ``bpm_range`` (40-180 bpm). The heart repeats its shape
       every beat; nothing else in an echo cine is periodic at that rate.
    3. The two extreme phases: the pair ``(i, j)``, ``0 < j - i < T``, of minimum ``S`` — within one cycle the two
       most different frames are the end of filling (ED: largest LV, valves just closed, base furthest from the
       apex) and the end of ejection (ES: smallest LV, base nearest the apex); the image changes most between them.
    4. Which is ED: systole is shorter than diastole at rest (≈ 0.3 s of a 0.8-1 s cycle), so the extreme from which
       the other one is reached in less than ``T / 2`` going forward is ED. (In ``color3d_jpeg_baseline.dcm``: the
       frames most different are 4 and 22; 22 -> 31 is 9 frames, 4 -> 22 is 18: ED = 22; seen in the frames, the
       mitral annulus is lowest at 22 and highest at 4.)
    5. Every ED: from the reference ED, step ±T (from the ED found last) and take, within ±T/4, the frame most
       similar to the reference ED. Not to the previous ED: late diastole is a plateau of similar frames
       (diastasis), and chaining on single frames drifts along it (tried: 22, 50, 76, 100 instead of 22, 49, 77,
       105, the last ED 4 frames early). Beat b = ED_b .. ED_{b+1} - 1.
    6. ES of each beat: the frame of the beat least similar to its ED (searched in ED_b .. ED_b + T - 1, so the last,
       partial beat has an ES when its systole is in the cine).

    Returns ``{"period", "period_s", "bpm", "ed", "es", "beats": [(start, stop)], "reference", "similarity",
    "lag_similarity"}``; ``beats[b]`` is the half-open frame range of beat b; ``ed[b]`` / ``es[b]`` its ED / ES
    (``es[b]`` None when the beat ends before its ES)."""
    n = len(frames)
    S = similarity_matrix(frames, mask, smooth)
    kmin = max(3, int(np.floor(60000.0 / (bpm_range[1] * frame_time))))  # ED and ES need a frame between them
    kmax = min(n - 2, int(np.ceil(60000.0 / (bpm_range[0] * frame_time))))
    lag = np.array([np.mean(np.diag(S, k)) for k in range(0, min(n - 1, kmax + 2))])
    peaks = [
        k for k in range(max(kmin, 1), min(kmax, len(lag) - 2) + 1) if lag[k] >= lag[k - 1] and lag[k] > lag[k + 1]
    ]
    if not peaks:
        raise DataError(
            f"{source}: no cardiac period between {bpm_range[0]:g} and {bpm_range[1]:g} bpm in the frame-to-frame "
            f"similarity of its {n} frames (too few frames, or no periodic motion)."
        )
    T = int(max(peaks, key=lambda k: lag[k]))
    if n < 2 * T:
        raise DataError(f"{source}: {n} frames hold fewer than two cardiac cycles of {T} frames.")
    best, pair = np.inf, None
    for i in range(n):
        for j in range(i + 2, min(n, i + T)):
            if S[i, j] < best:
                best, pair = S[i, j], (i, j)
    i, j = pair
    ref = i if (j - i) <= T / 2 else j
    w = max(1, int(round(T / 4)))
    eds = [ref]
    for direction in (1, -1):
        prev = ref
        while True:
            centre = prev + direction * T
            lo, hi = max(0, centre - w), min(n - 1, centre + w)
            if centre - w < 0 or centre + w > n - 1 or lo > hi:
                break  # the whole search window must lie in the cine (a half window could miss the true ED)
            nxt = lo + int(np.argmax(S[ref, lo : hi + 1]))
            if abs(nxt - prev) < T / 2:
                break
            eds.append(nxt)
            prev = nxt
    eds = sorted(set(eds))
    beats, es = [], []
    for b, e in enumerate(eds):
        stop = eds[b + 1] if b + 1 < len(eds) else n
        beats.append((e, stop))
        search = range(e + 1, min(stop, e + T))
        k = min(search, key=lambda t: S[e, t]) if len(search) else None
        # in a partial last beat the minimum at its very last frame may only be on the way to ES
        if k is not None and stop == n and stop - e < T and k == n - 1:
            k = None
        es.append(k)
    return {
        "period": T,
        "period_s": T * frame_time / 1000.0,
        "bpm": 60000.0 / (T * frame_time),
        "ed": eds,
        "es": es,
        "beats": beats,
        "reference": ref,
        "extreme_pair": list(pair),
        "similarity": S,
        "lag_similarity": lag,
    }


def plot_cycles(cycles: dict, path: str | os.PathLike, title: str = "") -> None:
    """The signal of the rule: similarity of every frame to the ED of its beat, the lagged similarity, the frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S, n = cycles["similarity"], len(cycles["similarity"])
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.2), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    t = np.arange(n)
    ax[0].plot(t, S[cycles["reference"]], color="0.7", lw=1, label=f"S[reference ED {cycles['reference']}, t]")
    for b, ((start, stop), e, s) in enumerate(zip(cycles["beats"], cycles["ed"], cycles["es"])):
        seg = np.arange(start, stop)
        ax[0].plot(seg, S[e, seg], lw=2, label=f"beat {b + 1}: S[ED, t]")
        ax[0].axvline(e, color="tab:red", ls="--", lw=1)
        if s is not None:
            ax[0].axvline(s, color="tab:blue", ls=":", lw=1.5)
    if cycles["beats"] and cycles["beats"][0][0] > 0:
        ax[0].axvspan(0, cycles["beats"][0][0] - 0.5, color="0.9", zorder=0)
    ax[0].set_xlabel("frame")
    ax[0].set_ylabel("correlation in the sector")
    ax[0].set_title("similarity to the beat's ED (red --: ED, blue ..: ES; grey: before the first ED)")
    ax[0].legend(fontsize=7, loc="lower left")
    lag = cycles["lag_similarity"]
    ax[1].plot(np.arange(len(lag)), lag)
    ax[1].axvline(cycles["period"], color="k", ls="--")
    ax[1].set_title(f"mean lagged similarity: T = {cycles['period']} frames ({cycles['bpm']:.0f} bpm)")
    ax[1].set_xlabel("lag (frames)")
    ax[2].imshow(S, cmap="viridis")
    for e in cycles["ed"]:
        ax[2].axhline(e, color="r", lw=0.5)
    ax[2].set_title("frame-to-frame similarity")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------------------------------------
def preprocess_cine(cine: EchoCine, spatial_size: Sequence[int] = (128, 128), percentile: float = 99.9) -> dict:
    """Resize (anti-aliased bilinear) to ``spatial_size``, mask the sector, scale to [0, 1] (steps 3-5 of the module
    doc). Returns ``{"frames" (N, *spatial_size) float32, "mask", "spacing" (mm, array order), "affine", "scale"}``."""
    import torch
    import torch.nn.functional as F

    size = tuple(int(s) for s in spatial_size)
    old = cine.frames.shape[1:]
    frames = np.stack([_resize2d(f, size, False) for f in cine.frames])
    m = torch.as_tensor(cine.mask.astype(np.float32))[None, None]
    mask = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy() > 0.5
    frames = frames * mask
    scale = float(np.percentile(frames[:, mask], percentile))
    if not scale > 0:
        raise DataError(f"{cine.path}: the sector is black in every frame.")
    frames = np.clip(frames / scale, 0.0, 1.0).astype(np.float32)
    dy, dx = cine.spacing
    x0, y0 = cine.region[0], cine.region[1]
    base = np.diag([dy, dx, 1.0, 1.0])
    base[:2, 3] = [y0 * dy, x0 * dx]  # the crop's position in the full frame (row, column), mm
    affine = _resized_affine(base, old, size)
    spacing = [float(dy) * old[0] / size[0], float(dx) * old[1] / size[1]]
    return {"frames": frames, "mask": mask, "spacing": spacing, "affine": affine, "scale": scale}


def echo_pairs(cycles: dict, n_frames: int) -> dict:
    """``{split: [(moving_frame, fixed_frame, tag)]}`` by beat (step 7 of the module doc)."""
    eds, ess, beats = cycles["ed"], cycles["es"], cycles["beats"]
    last = len(beats) - 1
    while last >= 0 and ess[last] is None:  # a trailing piece without its ES cannot be the test beat
        last -= 1
    if last < 1:
        raise DataError("fewer than two beats with an ES: nothing to train on besides the test beat.")
    pairs = {s: [] for s in SPLITS}
    for b in range(last):
        start, stop = beats[b]
        pairs["training"] += [(start, t, f"b{b + 1}") for t in range(start, stop) if t != start]
    start, stop = beats[last]
    pairs["test"].append((start, ess[last], f"b{last + 1}_ED_ES"))
    pairs["test"] += [(start, t, f"b{last + 1}") for t in range(start, stop) if t not in (start, ess[last])]
    if beats[0][0] > 0:  # the end of the cycle before the first beat: in no training pair
        pairs["validation"] += [(beats[0][0], t, "b0") for t in range(0, beats[0][0])]
    else:  # no leading frames: the ED -> ES pair of the beat before the test beat (also a training pair)
        pairs["validation"].append((eds[last - 1], ess[last - 1], f"b{last}_ED_ES"))
    return pairs


def build_echo_cine(
    root: str | os.PathLike,
    out: str | os.PathLike,
    spatial_size: Sequence[int] = (128, 128),
    percentile: float = 99.9,
    bpm_range: Sequence[float] = (40.0, 180.0),
    overwrite: bool = False,
    plot: bool = True,
) -> Path:
    """A multi-frame echo DICOM (``root`` = the .dcm file) -> frame pairs split by beat in ``out`` (module doc).

    Writes ``frames/frame_NNN.nii.gz`` (one per frame used, 2D, float32 in [0, 1]), ``sector.nii.gz`` (the sector
    mask, uint8), ``datalist.json`` (items ``id``, ``patient``, ``moving``, ``fixed``, ``spacing``; no labels),
    ``preprocessing.json`` (the rule's ED / ES / beats, the scale, the region) and ``cycles.png`` (the signal).
    The split is by beat: nothing is shuffled (no seed)."""
    root = Path(root)
    if root.is_dir():
        raise DataError(f"{root}: --root must be the multi-frame echo DICOM file, not a folder.")
    check_out(out, [root], [], overwrite)
    cine = read_echo_cine(root)
    pre = preprocess_cine(cine, spatial_size, percentile)
    cycles = detect_cycles(pre["frames"], pre["mask"], cine.frame_time, bpm_range, source=str(root))
    pairs = echo_pairs(cycles, len(pre["frames"]))
    stem = "echo"
    datalist = {s: [] for s in SPLITS}
    with _Writer(out, overwrite, inputs=[root]) as w:
        written = {}
        for split in SPLITS:
            for mov, fix, tag in pairs[split]:
                for f in (mov, fix):
                    if f not in written:
                        written[f] = w.nifti(f"frames/frame_{f:03d}.nii.gz", pre["frames"][f], pre["affine"])
                datalist[split].append(
                    {
                        "id": f"{stem}_{tag}_f{mov:03d}_to_f{fix:03d}",
                        "patient": stem,
                        "moving": written[mov],
                        "fixed": written[fix],
                        "spacing": list(pre["spacing"]),
                    }
                )
        w.nifti("sector.nii.gz", pre["mask"].astype(np.uint8), pre["affine"], label=True)
        _check_splits(datalist, root)
        if plot:
            try:
                plot_cycles(cycles, w.tmp / "cycles.png", title=f"{root.name}: ED/ES rule")
            except ImportError:  # matplotlib is a dependency; a figure is never worth failing the build
                pass
        info = {
            "dataset": "echo_cine",
            "root": str(root.absolute()),
            "frames": int(len(pre["frames"])),
            "frame_time_ms": cine.frame_time,
            "region_xyxy": list(cine.region),
            "region_spacing_mm": list(cine.spacing),
            "spacing": list(pre["spacing"]),
            "spatial_size": [int(s) for s in spatial_size],
            "intensity": f"BT.601 luma of the decoded RGB; 0 outside the sector; clip(grey / P{percentile:g}, 0, 1)",
            "intensity_scale": pre["scale"],
            "sector_fraction": float(pre["mask"].mean()),
            "period_frames": cycles["period"],
            "bpm": cycles["bpm"],
            "ed": [int(e) for e in cycles["ed"]],
            "es": [None if e is None else int(e) for e in cycles["es"]],
            "beats": [[int(a), int(b)] for a, b in cycles["beats"]],
            "extreme_pair": cycles["extreme_pair"],
            "pairs": {s: len(v) for s, v in datalist.items()},
            "meta": cine.meta,
        }
        path = w.commit(datalist, info)
    logger.info("echo cine datalist %s: %s", path, info["pairs"])
    return path
