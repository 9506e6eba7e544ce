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
4. frame-specific acquisition (gain, attenuation, shadowing, dropout, clutter / coil profile, ghosting, bands) and
   noise (log-compressed Nakagami speckle / Rician noise), drawn independently for ED and ES.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage, special, stats

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
    "write_dataset",
    "save_preview",
    "warp",
    "jacobian_determinant",
    "inside_mask",
    "dice",
    "pair_rng",
]

KINDS = ("echo2d", "echo3d", "mri2d")
DEFAULT_SIZE = {"echo2d": 128, "mri2d": 128, "echo3d": 64}
DEFAULT_SPLITS_3D = (60, 20, 20)  # documented pair counts for echo3d (the paper's private 3D echo split)
LABELS = {"background": 0, "lv_blood_pool": 1, "lv_myocardium": 2, "rv": 3}
FOV_MM = 160.0  # field of view along the shortest image axis: 1.25 mm pixels at 128, 2.5 mm voxels at 64
SPLIT_CODES = {"training": 0, "validation": 1, "test": 2}
KIND_CODES = {"echo2d": 0, "echo3d": 1, "mri2d": 2}
EDGE_PX = 0.6  # width of the soft anatomical edges (pixels): anti-aliasing, keeps bilinear warping accurate
FILE_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std", "moving_clean", "fixed_clean")
PHANTOM_VERSION = 1


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


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _sig(t):
    return special.expit(t)


def _unit(v, axis=0, eps=1e-9):
    return v / np.maximum(np.linalg.norm(v, axis=axis, keepdims=True), eps)


def _grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), 0)


def _random_field(rng, shape, sigma, n=1) -> np.ndarray:
    """``n`` smooth Gaussian random fields (zero mean, unit std) of ``shape``."""
    out = np.empty((n,) + tuple(shape))
    for i in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap", truncate=3.0)
        f -= f.mean()
        out[i] = f / max(f.std(), 1e-12)
    return out


def _sample(field, pts, identity=False):
    """Bilinear sampling of a periodic grid ``field`` at points ``pts`` (ndim, *shape)."""
    if identity:
        return field
    return ndimage.map_coordinates(field, pts, order=1, mode="grid-wrap")  # textures are periodic


# ----------------------------------------------------------------------------------------------------------------------
# anatomy (ED coordinates)
# ----------------------------------------------------------------------------------------------------------------------
def _rotation_2d(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _sample_anatomy(rng, kind, shape, spacing) -> dict:
    ndim = len(shape)
    mm = 1.0 / spacing[0]  # px per mm
    centre_img = (np.array(shape, dtype=np.float64) - 1) / 2
    a = {"ndim": ndim, "shape": tuple(shape), "mm": mm}
    if ndim == 2:
        r_endo = rng.uniform(17, 24) * mm
        thick = rng.uniform(8, 11) * mm
        ell = rng.uniform(0.0, 0.08)
        beta = rng.uniform(0, np.pi)
        frame = _rotation_2d(beta)  # columns: LV axes in array coordinates
        semi = np.array([r_endo * (1 + ell), r_endo * (1 - ell)])
        c = centre_img.copy()
        if kind == "echo2d":
            c[0] = shape[0] * rng.uniform(0.52, 0.6)
            c[1] += rng.uniform(-8, 8) * mm
        else:
            c += rng.uniform(-10, 10, 2) * mm
        # RV towards image-left and slightly anterior (up), +-25 degrees
        base_dir = _unit(np.array([-0.35, -1.0]))
        u_rv = _rotation_2d(rng.uniform(-0.45, 0.45)) @ base_dir
        r_epi = r_endo + thick
        rv_c = c + u_rv * r_epi * rng.uniform(0.55, 0.75)
        rv_frame = np.stack([u_rv, np.array([-u_rv[1], u_rv[0]])], 1)
        rv_semi = np.array([r_epi * rng.uniform(0.8, 0.95), r_epi * rng.uniform(1.25, 1.45)])
        pap_ang = rng.uniform(0, 2 * np.pi)
        pap = [pap_ang, pap_ang + rng.uniform(1.7, 2.4)]
        pap_pos = [frame @ (semi * 0.62 * np.array([math.cos(t), math.sin(t)])) + c for t in pap]
        a.update(pap_r=r_endo * rng.uniform(0.14, 0.19), pap_pos=pap_pos, pap_axis=None)
    else:
        # apical 3D view: long axis e0 points from the base centre towards the apex (towards the probe, -axis 0)
        length = rng.uniform(62, 75) * mm
        r_endo = rng.uniform(20, 25) * mm
        thick = rng.uniform(8, 10.5) * mm
        ell = rng.uniform(0.0, 0.08)
        e0 = _unit(np.array([-1.0, rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)]))
        v = np.array([0.0, rng.uniform(-0.3, 0.3), -1.0])
        e1 = _unit(v - (v @ e0) * e0)  # towards the RV
        e2 = np.cross(e0, e1)
        frame = np.stack([e0, e1, e2], 1)
        semi = np.array([length, r_endo * (1 + ell), r_endo * (1 - ell)])
        c = centre_img.copy()
        c[0] = 3 + (length + 12 * mm) * abs(e0[0]) + rng.uniform(0, 6) * mm  # base centre depth, apex ~20-30 mm
        c[1:] += rng.uniform(-6, 6, 2) * mm
        r_epi = r_endo + thick
        rv_c = c + e1 * r_epi * rng.uniform(0.6, 0.75) + e0 * length * rng.uniform(0.05, 0.15)
        rv_frame = np.stack([e0, e1, e2], 1)
        rv_semi = np.array(
            [length * rng.uniform(0.7, 0.8), r_epi * rng.uniform(0.8, 0.95), r_epi * rng.uniform(1.25, 1.4)]
        )
        pap_ang = rng.uniform(0, 2 * np.pi)
        pap = [pap_ang, pap_ang + rng.uniform(1.7, 2.4)]
        pap_pos = [c + frame @ np.array([0.35 * length, 0.6 * semi[1] * math.cos(t), 0.6 * semi[2] * math.sin(t)])
                   for t in pap]
        a.update(pap_r=r_endo * rng.uniform(0.13, 0.17), pap_pos=pap_pos, pap_axis=e0, pap_len=0.22 * length)
    a.update(
        centre=c, frame=frame, semi=semi, thick=thick, rv_centre=rv_c, rv_frame=rv_frame, rv_semi=rv_semi,
        rv_wall=rng.uniform(2.5, 4.0) * mm,
        endo_modes=[(k, rng.uniform(0, 0.035) / math.sqrt(k - 1), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
        thick_modes=[(k, rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)) for k in (1, 2)],
        rv_modes=[(k, rng.uniform(0, 0.03), rng.uniform(0, 2 * np.pi)) for k in (2, 3)],
    )
    return a


def _modes(phi, modes, weight=1.0):
    out = np.zeros_like(phi)
    for k, amp, ph in modes:
        out += amp * np.cos(k * phi + ph)
    return out * weight


def _ellipsoid_distance(y, semi, modulation):
    """Approximate signed distance (px) to a modulated ellipsoid ``|y / semi| = 1 + modulation`` (y in px)."""
    q = y / semi.reshape((-1,) + (1,) * (y.ndim - 1))
    rho = np.sqrt(np.maximum((q * q).sum(0), 1e-12))
    grad = np.sqrt((((y / (semi ** 2).reshape((-1,) + (1,) * (y.ndim - 1))) ** 2).sum(0))) / rho
    return (rho - (1.0 + modulation)) / np.maximum(grad, 1e-6)


def _anatomy_fields(a, pts) -> dict:
    """Soft memberships (and hard labels) of the anatomy at points ``pts`` (ndim, *shape) in ED coordinates."""
    ndim = a["ndim"]
    shp = (-1,) + (1,) * ndim
    d = pts - a["centre"].reshape(shp)
    y = np.tensordot(a["frame"].T, d, axes=1)  # LV-frame coordinates (px)
    semi = a["semi"]
    if ndim == 2:
        phi = np.arctan2(y[1] / semi[1], y[0] / semi[0])
        lat = 1.0
        base_in = 1.0
        base_d = None
    else:
        phi = np.arctan2(y[2] / semi[2], y[1] / semi[1])
        lat = np.sqrt(y[1] ** 2 + y[2] ** 2) / np.maximum(np.sqrt((y ** 2).sum(0)), 1e-6)  # 0 on the long axis
        base_d = y[0]  # > 0 on the apex side of the base plane
        base_in = _sig(base_d / EDGE_PX)
    endo_mod = _modes(phi, a["endo_modes"], lat)
    d_endo = _ellipsoid_distance(y, semi, endo_mod)
    thick = a["thick"] * (1.0 + _modes(phi, a["thick_modes"], lat))
    semi_epi = semi + a["thick"]
    d_epi = _ellipsoid_distance(y, semi_epi, endo_mod) - (thick - a["thick"])
    # RV
    drv = pts - a["rv_centre"].reshape(shp)
    yr = np.tensordot(a["rv_frame"].T, drv, axes=1)
    if ndim == 2:
        phr = np.arctan2(yr[1], yr[0])
        rv_base = 1.0
    else:
        phr = np.arctan2(yr[2], yr[1])
        rv_base = base_in
    rv_mod = _modes(phr, a["rv_modes"])
    d_rv = _ellipsoid_distance(yr, a["rv_semi"], rv_mod)
    d_rvw = _ellipsoid_distance(yr, a["rv_semi"] + a["rv_wall"], rv_mod)
    # papillary muscles (discs / rods inside the LV cavity)
    d_pap = np.full(pts.shape[1:], np.inf)
    for p in a["pap_pos"]:
        dp = pts - p.reshape(shp)
        if a["pap_axis"] is not None:
            ax = a["pap_axis"].reshape(shp)
            along = (dp * ax).sum(0)
            perp = np.sqrt(np.maximum((dp * dp).sum(0) - along ** 2, 0))
            dist = np.maximum(perp - a["pap_r"], np.abs(along) - a["pap_len"])
        else:
            dist = np.sqrt((dp * dp).sum(0)) - a["pap_r"]
        d_pap = np.minimum(d_pap, dist)

    in_endo = _sig(-d_endo / EDGE_PX) * base_in
    in_epi = np.maximum(_sig(-d_epi / EDGE_PX) * base_in, in_endo)
    blood = in_endo
    myo = in_epi - in_endo
    out_lv = 1.0 - _sig(-d_epi / EDGE_PX) * base_in
    rv = _sig(-d_rv / EDGE_PX) * rv_base * out_lv
    rvw = np.clip(_sig(-d_rvw / EDGE_PX) * rv_base - _sig(-d_rv / EDGE_PX) * rv_base, 0, 1) * out_lv
    pap = blood * _sig(-d_pap / EDGE_PX)
    # distance outside the heart, for the pericardium band
    d_out = np.minimum(d_epi, d_rvw)
    if base_d is not None:
        d_out = np.where(base_d < 0, np.maximum(d_out, -base_d), d_out)
    labels = np.zeros(pts.shape[1:], np.uint8)
    labels[rv > 0.5] = 3
    labels[myo > 0.5] = 2
    labels[blood > 0.5] = 1
    la = 0.0
    if base_d is not None:  # left atrium beyond the base plane (blood, label 0)
        la_semi = np.array([0.45 * semi[0], 0.85 * semi[1], 0.85 * semi[2]])
        y_la = y.copy()
        y_la[0] += 0.4 * semi[0]
        la = _sig(-_ellipsoid_distance(y_la, la_semi, 0.0) / EDGE_PX) * (1.0 - base_in) * (1.0 - rv)
    return {"blood": blood - pap, "pap": pap, "myo": myo, "rv": rv, "rvw": rvw, "la": la, "d_out": d_out,
            "labels": labels}


def _render_clean(kind, a, f, tex, look) -> np.ndarray:
    """Clean image (values in [0, 1]) from anatomy memberships ``f`` and sampled textures ``tex``."""
    rest = np.clip(1.0 - f["blood"] - f["pap"] - f["myo"] - f["rv"] - f["rvw"] - f["la"], 0.0, 1.0)
    band = np.exp(-(((f["d_out"] - 1.5 * a["mm"] ** 0.5) / (look["peri_w"])) ** 2)) * (f["d_out"] > -1.0)
    if kind.startswith("echo"):
        bg = np.clip(look["bg"] + 0.09 * tex["large"] + 0.06 * tex["fine"], 0.08, 0.85)
        bg = bg * (1 - band * look["peri_amp"]) + look["peri"] * band * look["peri_amp"]
        myo_i = look["myo"] + 0.05 * tex["myo"]
        img = (rest * bg + (f["blood"] + f["la"]) * look["blood"] + f["rv"] * look["rv_blood"]
               + (f["myo"] + f["pap"]) * myo_i + f["rvw"] * look["rvw"])
    else:
        lung = _sig((tex["large2"] - look["lung_thr"]) / 0.15)
        bg = np.clip(look["bg"] + 0.06 * tex["large"] + 0.04 * tex["fine"], 0.08, 0.5)
        bg = bg * (1 - lung) + 0.04 * lung
        fat = band * look["peri_amp"] * (0.55 + 0.45 * np.cos(tex["fat_phase"]))
        bg = bg * (1 - fat) + look["peri"] * fat
        myo_i = look["myo"] + 0.02 * tex["myo"]
        img = (rest * bg + (f["blood"] + f["la"]) * look["blood"] + f["rv"] * look["rv_blood"]
               + (f["myo"] + f["pap"]) * myo_i + f["rvw"] * look["rvw"])
    return np.clip(img, 0.0, 1.0)


def _sample_look(rng, kind) -> dict:
    if kind.startswith("echo"):
        return {
            "bg": rng.uniform(0.3, 0.4), "blood": rng.uniform(0.0, 0.04), "rv_blood": rng.uniform(0.0, 0.04),
            "myo": rng.uniform(0.55, 0.68), "rvw": rng.uniform(0.5, 0.6), "peri": rng.uniform(0.8, 0.92),
            "peri_amp": rng.uniform(0.6, 1.0), "peri_w": rng.uniform(1.2, 2.0),
        }
    return {
        "bg": rng.uniform(0.2, 0.3), "blood": rng.uniform(0.6, 0.7), "rv_blood": rng.uniform(0.58, 0.7),
        "myo": rng.uniform(0.17, 0.25), "rvw": rng.uniform(0.2, 0.26), "peri": rng.uniform(0.55, 0.65),
        "peri_amp": rng.uniform(0.5, 1.0), "peri_w": rng.uniform(1.2, 2.2), "lung_thr": rng.uniform(0.4, 0.9),
    }


# ----------------------------------------------------------------------------------------------------------------------
# motion: backward map T(x) = x + z(x) from ES to ED coordinates
# ----------------------------------------------------------------------------------------------------------------------
def _sample_motion(rng, a) -> dict:
    ndim = a["ndim"]
    mm = a["mm"]
    m = {
        "eject": rng.uniform(0.42, 0.62) if ndim == 2 else rng.uniform(0.52, 0.68),  # ejected cavity area / volume
        "regional": rng.uniform(0.0, 0.25), "regional_phase": rng.uniform(0, 2 * np.pi),
        "twist": np.deg2rad(rng.uniform(-6, 6)) if ndim == 2 else np.deg2rad(rng.uniform(4, 9)),
        "rv_squeeze": rng.uniform(0.2, 0.35),
        "field_amp": rng.uniform(0.3, 0.8) * max(mm, 0.25) ** 0.5,
        "field_sigma": 8.0 * mm,
    }
    if ndim == 2:
        m["shift"] = rng.uniform(-2.5, 2.5, 2) * mm
    else:
        e0 = a["frame"][:, 0]
        # base descends towards the apex at ES: ES position = ED position + shift
        lateral = rng.uniform(-1.5, 1.5, 3) * mm
        m["shift"] = e0 * rng.uniform(6, 11) * mm + (lateral - (lateral @ e0) * e0)
    return m


def _backward_map(a, m, grid, rng_field) -> np.ndarray:
    """ED coordinates T(x) of the ES grid points ``grid`` (ndim, *shape)."""
    ndim = a["ndim"]
    shp = (-1,) + (1,) * ndim
    c = a["centre"].reshape(shp)
    r_epi = float(a["semi"].max() + a["thick"])
    # 1) translation (undone smoothly: tissue far from the heart moves less)
    s_t = 2.2 * r_epi
    w = np.exp(-((grid - c - m["shift"].reshape(shp)) ** 2).sum(0) / (2 * s_t ** 2))
    x = grid - m["shift"].reshape(shp) * w
    # 2) twist (2D: rotation decaying outside the LV) / torsion (3D: apex and base rotate in opposite directions)
    d = x - c
    if ndim == 2:
        r = np.sqrt((d ** 2).sum(0)) / float(a["semi"].mean())
        ang = m["twist"] * np.exp(-(r / 1.6) ** 2)
        ca, sa = np.cos(ang), np.sin(ang)
        x = np.stack([c[0] + ca * d[0] - sa * d[1], c[1] + sa * d[0] + ca * d[1]])
    else:
        e0, e1, e2 = (a["frame"][:, i].reshape(shp) for i in range(3))
        u = (d * e0).sum(0)
        p1, p2 = (d * e1).sum(0), (d * e2).sum(0)
        rl = np.sqrt(p1 ** 2 + p2 ** 2) / float(a["semi"][1:].mean())
        un = u / a["semi"][0]  # 0 at the base plane, 1 at the endocardial apex
        ang = m["twist"] * (un - 0.4) * np.exp(-(rl / 1.8) ** 2) * np.exp(-(((un - 0.5) / 1.2) ** 2))
        ca, sa = np.cos(ang), np.sin(ang)
        x = c + u * e0 + (ca * p1 - sa * p2) * e1 + (sa * p1 + ca * p2) * e2
    # 3) radial, volume-preserving contraction in LV-normalised coordinates: rho_ED^n = rho^n + c * phi(rho)
    d = x - c
    y = np.tensordot(a["frame"].T, d, axes=1) / a["semi"].reshape(shp)
    rho = np.sqrt((y ** 2).sum(0))
    if ndim == 2:
        phi = np.arctan2(y[1], y[0])
    else:
        phi = np.arctan2(y[2], y[1])
    cc = m["eject"] * (1.0 + m["regional"] * np.cos(phi - m["regional_phase"]))
    if ndim == 3:  # no contraction beyond the base plane (the atrium fills at ES)
        cc = cc * _sig(y[0] / 0.12)
    # phi(rho) = soft-min(s, 1), s = (rho / rho_e)^n: uniform scaling inside the ES cavity, incompressible outside
    rho_e = 0.95 * (1.0 - m["eject"]) ** (1.0 / ndim)
    s = (rho / rho_e) ** ndim
    ratio = (1.0 + s ** 4) ** (-1.0 / 4)  # phi / s
    scale = (1.0 + cc * ratio / rho_e ** ndim) ** (1.0 / ndim)
    x = c + d * scale
    # 4) RV squeeze: the ED RV cavity is larger (expansion about the middle of the RV crescent, Gaussian envelope)
    k_rad = 0 if ndim == 2 else 1  # RV-frame axis pointing from the LV towards the RV
    u_rv = a["rv_frame"][:, k_rad]
    crv = (a["rv_centre"] + u_rv * 0.6 * a["rv_semi"][k_rad]).reshape(shp)
    dr = x - crv
    s_rv = 0.6 * float(a["rv_semi"][k_rad])
    x = x + m["rv_squeeze"] * dr * np.exp(-(dr ** 2).sum(0) / (2 * s_rv ** 2))
    # 5) small smooth random field
    shape = grid.shape[1:]
    x = x + m["field_amp"] * _random_field(rng_field, shape, m["field_sigma"], n=ndim)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# acquisition: echo (log-compressed Nakagami speckle) and MRI (Rician noise)
# ----------------------------------------------------------------------------------------------------------------------
_ECHO_FLOOR = -0.25  # display level of the electronic noise floor
_ECHO_BLACK = 0.13  # clean value 0 maps to display level -0.13 (blood is mostly below the display floor)


@functools.lru_cache(maxsize=32)
def _logspeckle_quantiles(looks: int, n: int = 3000) -> np.ndarray:
    """Quantiles of 10 log10(G') (dB), G' = Gamma(looks, 1/looks) / exp(E ln G): zero-mean log speckle."""
    p = (np.arange(n) + 0.5) / n
    g = stats.gamma.ppf(p, a=looks, scale=1.0 / looks)
    mean_ln = special.digamma(looks) - math.log(looks)
    return 10.0 / math.log(10.0) * (np.log(g) - mean_ln)


@functools.lru_cache(maxsize=32)
def _echo_std_table(looks: int, dr: float):
    """std of clip(m + Z, 0, 1) as a function of the pre-clipping mean display level m (Z = log speckle / DR)."""
    z = _logspeckle_quantiles(looks) / dr
    m = np.linspace(-1.5, 2.5, 1601)
    v = np.clip(m[:, None] + z[None, :], 0.0, 1.0)
    std = np.sqrt(np.maximum(v.var(1), 0.0))
    return m, std


@functools.lru_cache(maxsize=32)
def _speckle_norm(shape, sigma) -> float:
    delta = np.zeros(shape)
    delta[tuple(s // 2 for s in shape)] = 1.0
    k = ndimage.gaussian_filter(delta, sigma, mode="wrap", truncate=3.0)
    return float(np.sqrt((k ** 2).sum()))


def _speckle(rng, shape, looks, grain) -> np.ndarray:
    """Spatially correlated Gamma(looks, 1/looks) speckle intensity: mean of ``looks`` |complex Gaussian|^2."""
    norm = _speckle_norm(tuple(shape), tuple(grain)) * math.sqrt(2.0)
    g = np.zeros(shape)
    for _ in range(looks):
        re = ndimage.gaussian_filter(rng.standard_normal(shape), grain, mode="wrap", truncate=3.0) / norm
        im = ndimage.gaussian_filter(rng.standard_normal(shape), grain, mode="wrap", truncate=3.0) / norm
        g += re * re + im * im
    return g / looks


def _echo_geometry(rng, shape, mm) -> dict:
    ndim = len(shape)
    apex = (np.array(shape, dtype=np.float64) - 1) / 2
    apex[0] = -rng.uniform(1, 4) * mm
    apex[1:] += rng.uniform(-3, 3, ndim - 1) * mm
    return {
        "apex": apex,
        "half_angle": np.deg2rad(rng.uniform(38, 45) if ndim == 2 else rng.uniform(36, 42)),
        "depth_max": shape[0] * rng.uniform(1.02, 1.12),
        "dr": float(rng.choice([50.0, 55.0, 60.0])),
        "looks": int(rng.choice([1, 2])),
        "grain": tuple([rng.uniform(0.5, 0.8) * max(mm, 0.5)] + [rng.uniform(1.0, 1.6) * max(mm, 0.5)] * (ndim - 1)),
    }


def _echo_frame(rng, geo, a, f, centre_frame, grid) -> dict:
    """Frame-specific acquisition maps (display offsets, clutter, sector) of one echo frame."""
    ndim = grid.ndim - 1
    shp = (-1,) + (1,) * ndim
    v = grid - geo["apex"].reshape(shp)
    depth = np.sqrt((v ** 2).sum(0))
    beam = v / np.maximum(depth, 1e-6)
    ang = np.arccos(np.clip(beam[0], -1, 1))  # angle from the probe axis
    dmax = geo["depth_max"]
    half = geo["half_angle"]
    dr = geo["dr"]
    sector = (ang <= half) & (depth <= dmax)
    rd = depth / dmax
    db = np.full(depth.shape, rng.uniform(-3, 2))  # overall gain
    db -= rng.uniform(0, 10) * rd  # residual attenuation not compensated by TGC
    for _ in range(3):  # TGC slider bumps
        db += rng.uniform(-3, 3) * np.exp(-(((rd - rng.uniform(0, 1)) / 0.12) ** 2))
    db -= 6.0 * _sig((ang - (half - np.deg2rad(4))) / np.deg2rad(1.0))  # weaker edge beams
    art = {}
    if rng.random() < 0.5:  # acoustic shadow (rib / calcification): beam-aligned wedge beyond a depth
        if ndim == 2:
            t = rng.uniform(-0.7, 0.7) * half
            s_ax = np.array([math.cos(t), math.sin(t)])
        else:
            t = rng.uniform(0, 0.7) * half
            psi = rng.uniform(0, 2 * np.pi)
            s_ax = np.array([math.cos(t), math.sin(t) * math.cos(psi), math.sin(t) * math.sin(psi)])
        width = np.deg2rad(rng.uniform(3, 8))
        start = rng.uniform(0.15, 0.45) * dmax
        strength = rng.uniform(12, 30)
        a_s = np.arccos(np.clip((beam * s_ax.reshape(shp)).sum(0), -1, 1))
        db -= strength * _sig((width - a_s) / np.deg2rad(1.0)) * _sig((depth - start) / 1.5)
        art["shadow_db"] = strength
    # lateral-wall dropout: specular walls parallel to the beam reflect little
    drop = rng.uniform(4, 18)
    r = grid - centre_frame.reshape(shp)
    if ndim == 3:
        e0 = a["frame"][:, 0].reshape(shp)
        r = r - (r * e0).sum(0) * e0
    n = r / np.maximum(np.sqrt((r ** 2).sum(0)), 1e-6)
    cos_psi = (n * beam).sum(0)
    wall = f["myo"] + f["rvw"] + f["pap"]
    db -= drop * (1.0 - cos_psi ** 2) ** 2 * wall
    art["dropout_db"] = drop
    # near-field clutter and reverberation bands (additive, speckled like tissue)
    clutter = np.zeros(depth.shape)
    if rng.random() < 0.8:
        peak = rng.uniform(0.25, 0.55)
        dc = rng.uniform(0.04, 0.09) * dmax
        bands = np.ones(depth.shape)
        step = rng.uniform(0.12, 0.2) * dmax
        amp = rng.uniform(0.0, 0.6)
        for k in (1, 2):
            bands += amp * np.exp(-(((depth - k * step) / (0.02 * dmax)) ** 2)) * 10 ** (-k * 0.4)
        clutter = 10 ** (dr * peak / 10) * np.exp(-depth / dc) * bands
        art["clutter"] = peak
    return {"type": "echo", "offset": db / dr, "clutter": clutter, "sector": sector, "dr": dr,
            "looks": geo["looks"], "grain": geo["grain"], "artefacts": art}


def _echo_mean_level(clean, params):
    dr = params["dr"]
    signal = (1.0 + _ECHO_BLACK) * clean - _ECHO_BLACK + params["offset"]
    lin = 10 ** (dr * signal / 10) + params["clutter"] + 10 ** (dr * _ECHO_FLOOR / 10)
    return 10.0 * np.log10(lin) / dr


def _rician_std(nu, sigma):
    t = nu ** 2 / (4 * sigma ** 2)
    lag = (1 + 2 * t) * special.ive(0, t) + 2 * t * special.ive(1, t)  # L_{1/2}(-nu^2 / 2 sigma^2)
    mean = sigma * math.sqrt(math.pi / 2) * lag
    return np.sqrt(np.maximum(nu ** 2 + 2 * sigma ** 2 - mean ** 2, 0.0))


_SIGMA_CAP = 0.05


def _mri_coil(rng, shape, mm) -> dict:
    h, w = shape
    coils = [(np.array([-rng.uniform(0.08, 0.25) * h, rng.uniform(0.1, 0.9) * w]), 1.0) for _ in range(4)]
    coils += [(np.array([rng.uniform(1.05, 1.2) * h, rng.uniform(0.2, 0.8) * w]), rng.uniform(0.05, 0.25))
              for _ in range(2)]
    return {"coils": coils, "width": rng.uniform(0.3, 0.42) * h, "snr_range": rng.uniform(6.0, 10.0),
            "sigma_min": rng.uniform(0.004, 0.008)}


def _mri_sigma(coil, grid, heart) -> np.ndarray:
    sens = np.zeros(grid.shape[1:])
    for p, wgt in coil["coils"]:
        sens += wgt * np.exp(-((grid - p.reshape(-1, 1, 1)) ** 2).sum(0) / (2 * coil["width"] ** 2))
    s_heart = sens[heart] if heart.any() else sens.ravel()
    s5, s95 = np.percentile(s_heart, [5, 95])
    gamma = float(np.clip(math.log(coil["snr_range"]) / max(math.log(s95 / s5), 1e-3), 0.5, 4.0))
    sigma_min = min(coil["sigma_min"], 0.7 * _SIGMA_CAP / coil["snr_range"])
    raw = sigma_min * (s95 / sens) ** gamma
    return _SIGMA_CAP * np.tanh(raw / _SIGMA_CAP)  # soft cap: |signal| + 3 sigma stays below 1


def _mri_frame(rng, sigma, clean, heart_soft, grid) -> dict:
    shape = clean.shape
    gain = np.full(shape, rng.uniform(0.95, 1.05))
    art = {}
    if rng.random() < 0.25:  # bSSFP off-resonance dark band along a random line
        theta = rng.uniform(0, np.pi)
        nrm = np.array([math.cos(theta), math.sin(theta)])
        p0 = np.array(shape) * rng.uniform(0.3, 0.7, 2)
        dist = ((grid - p0.reshape(-1, 1, 1)) * nrm.reshape(-1, 1, 1)).sum(0)
        dist = dist + 3.0 * np.sin(dist / 15.0 + rng.uniform(0, 6))
        gain = gain * (1 - rng.uniform(0.5, 0.9) * np.exp(-((dist / rng.uniform(1.5, 3.0)) ** 2)))
        art["band"] = True
    ghost = np.zeros(shape, np.complex128)
    if rng.random() < 0.35:  # respiratory / cardiac motion ghosts along the phase-encoding axis (axis 1)
        n_g = int(rng.choice([2, 3, 4]))
        amp = rng.uniform(0.08, 0.25)
        moving = clean * heart_soft
        for j in range(1, n_g):
            shift = int(round(j * shape[1] / n_g))
            ghost += amp * 0.6 ** (j - 1) * np.roll(moving, shift, axis=1) * np.exp(1j * rng.uniform(0, 2 * np.pi))
        art["ghost"] = amp
    signal = clean * gain + ghost
    mag = np.abs(signal)
    cap = np.minimum(1.0, 0.85 / np.maximum(mag, 1e-9))  # keep |signal| <= 0.85: clipping at 1 stays negligible
    signal = signal * cap
    return {"type": "mri", "signal": signal, "sigma": sigma,
            "artefacts": art}


def noise_std(clean: np.ndarray, params: Mapping) -> np.ndarray:
    """True per-pixel std of the observed image given its clean image and frame parameters (analytic)."""
    if params["type"] == "echo":
        m_tab, s_tab = _echo_std_table(int(params["looks"]), float(params["dr"]))
        std = np.interp(_echo_mean_level(clean, params), m_tab, s_tab)
        return np.where(params["sector"], std, 0.0).astype(np.float32)
    return _rician_std(np.abs(params["signal"]), params["sigma"]).astype(np.float32)


def sample_noise(clean: np.ndarray, params: Mapping, rng) -> np.ndarray:
    """One noisy observation of ``clean`` under the frame parameters ``params`` (from :func:`make_pair`)."""
    rng = _as_rng(rng)
    if params["type"] == "echo":
        g = _speckle(rng, clean.shape, int(params["looks"]), params["grain"])
        looks = int(params["looks"])
        g = g / math.exp(special.digamma(looks) - math.log(looks))
        dr = float(params["dr"])
        level = _echo_mean_level(clean, params) + 10.0 * np.log10(np.maximum(g, 1e-30)) / dr
        return np.where(params["sector"], np.clip(level, 0.0, 1.0), 0.0).astype(np.float32)
    sig = params["sigma"]
    noisy = params["signal"] + sig * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    return np.clip(np.abs(noisy), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# a pair
# ----------------------------------------------------------------------------------------------------------------------
def make_pair(rng=0, kind: str = "echo2d", size: int | Sequence[int] | None = None) -> dict:
    """Generate one ED -> ES pair.

    Args:
        rng: a ``numpy.random.Generator`` or a seed.
        kind: ``"echo2d"``, ``"echo3d"`` or ``"mri2d"``.
        size: spatial size (int or tuple); default 128 (2D) or 64 (3D).

    Returns:
        dict of numpy arrays: ``moving``, ``fixed``, ``moving_clean``, ``fixed_clean``, ``noise_std`` (float32, fixed
        image), ``moving_label``, ``fixed_label`` (uint8), ``ddf`` (float32, channel-last ``shape + (ndim,)``, voxels,
        ``Warp`` convention), ``spacing`` (tuple, mm) and the frame parameters ``moving_params`` / ``fixed_params``
        (for :func:`sample_noise` / :func:`noise_std`) and the sampled ``anatomy`` / ``motion`` (for inspection).
    """
    rng = _as_rng(rng)
    kind = _check_kind(kind)
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
        p_ed = _echo_frame(rng, geo, anat, f_ed, c_ed, grid)
        p_es = _echo_frame(rng, geo, anat, f_es, c_es, grid)
    else:
        coil = _mri_coil(rng, shape, mm)
        heart_es = ndimage.binary_dilation(f_es["labels"] > 0, iterations=3)
        sigma = _mri_sigma(coil, grid, heart_es)
        heart_soft = []
        for f in (f_ed, f_es):
            h = np.clip(f["blood"] + f["pap"] + f["myo"] + f["rv"] + f["rvw"], 0, 1)
            heart_soft.append(np.clip(ndimage.gaussian_filter(h, 3.0 * mm) * 1.5, 0, 1))
        p_ed = _mri_frame(rng, sigma, clean_ed, heart_soft[0], grid)
        p_es = _mri_frame(rng, sigma, clean_es, heart_soft[1], grid)
    moving = sample_noise(clean_ed, p_ed, rng)
    fixed = sample_noise(clean_es, p_es, rng)
    return {
        "moving": moving,
        "fixed": fixed,
        "moving_clean": clean_ed.astype(np.float32),
        "fixed_clean": clean_es.astype(np.float32),
        "moving_label": f_ed["labels"],
        "fixed_label": f_es["labels"],
        "ddf": np.moveaxis(ddf, 0, -1).astype(np.float32),
        "noise_std": noise_std(clean_es, p_es),
        "spacing": tuple(float(s) for s in spacing),
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
    import torch
    import warnings

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
    for key in FILE_KEYS:
        (folder / f"{key}.nii.gz").write_bytes(_nifti_gz_bytes(pair[key], pair["spacing"]))
        item[key] = f"{rel}/{key}.nii.gz"
    item["spacing"] = [round(s, 6) for s in pair["spacing"]]
    return item


def _generate_and_write(job) -> tuple[dict, dict | None]:
    """Worker: generate pair (split, i) and write its files; return the datalist item (and the pair if kept)."""
    out, kind, shape, seed, split, i, keep = job
    pair = make_pair(pair_rng(seed, kind, split, i), kind, shape)
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
) -> str:
    """Write a phantom data set (NIfTI files + ``datalist.json``) into ``out_dir``; return the datalist path.

    Layout: ``out_dir/datalist.json`` and ``out_dir/<split>/<id>/<key>.nii.gz`` for the keys moving, fixed,
    moving_label, fixed_label, ddf, noise_std, moving_clean, fixed_clean; ``id = <kind>_<split>_<index:04d>``.
    Pair ``i`` of a split depends only on (seed, kind, split, i): the same seed gives identical bytes, whatever
    the split sizes or ``workers``. The paper's 3D split is 60/20/20: pass ``n_train=60, n_val=20, n_test=20``
    for echo3d. ``preview``: a PNG path (or True for ``out_dir/preview.png``) for a gallery of the first
    training pairs. ``workers`` > 1 generates pairs in that many forked processes.
    """
    from tqdm.auto import tqdm

    kind = _check_kind(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"training": int(n_train), "validation": int(n_val), "test": int(n_test)}
    shape = spatial_size(kind, size)
    datalist = {
        "description": f"built-in cardiac phantom ({kind}), scripts/phantom.py v{PHANTOM_VERSION}",
        "phantom": {"kind": kind, "seed": int(seed), "size": list(shape),
                    "spacing": list(default_spacing(kind, size)), "version": PHANTOM_VERSION},
        "labels": {str(v): k for k, v in LABELS.items()},
        "training": [], "validation": [], "test": [],
    }
    n_gallery = 3
    jobs = [(str(out), kind, shape, int(seed), split, i, bool(preview) and split == "training" and i < n_gallery)
            for split, n in counts.items() for i in range(n)]
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
            gallery = [make_pair(pair_rng(seed, kind, "training", i), kind, shape) for i in range(n_gallery)]
        save_preview(gallery, png)
    return str(path)


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
    """A gallery PNG: per pair ED, ES (with label contours), labels, noise_std, GT displacement, ES clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap_lbl = ListedColormap(["black", "tab:red", "gold", "tab:blue"])
    cols = ["ED (moving)", "ES (fixed)", "ES labels (ED myo: white)", "noise_std (ES)", "GT |DDF| + arrows", "ES clean"]
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
        mag = np.sqrt((d2 ** 2).sum(-1))
        im = axes[r, 4].imshow(mag, cmap="viridis")
        fig.colorbar(im, ax=axes[r, 4], fraction=0.046, pad=0.02)
        step = max(1, mag.shape[0] // 16)
        yy, xx = np.mgrid[0:mag.shape[0]:step, 0:mag.shape[1]:step]
        # arrows point from the ES pixel to where its tissue was at ED (x + z)
        axes[r, 4].quiver(xx, yy, d2[::step, ::step, 1], -d2[::step, ::step, 0], color="w", scale_units="xy",
                          angles="xy", scale=1.0, width=0.004)
        axes[r, 4].contour(les == 2, levels=[0.5], colors="red", linewidths=0.5)
        axes[r, 5].imshow(_mid(p["fixed_clean"], p), cmap="gray", vmin=0, vmax=1)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(f"{p['kind']} #{r}" + (" (mid slice)" if nd == 3 else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
