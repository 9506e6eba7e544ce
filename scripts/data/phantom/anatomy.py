"""Anatomy and motion of the built-in cardiac phantom (see :mod:`scripts.data.phantom` and docs/phantom.md).

Soft (anti-aliased) membership functions of the LV / RV / papillary muscles / pericardium in ED coordinates, the
clean rendering of a frame, and the backward map ``T(x) = x + z(x)`` from ES to ED coordinates. Shared by every
phantom version: only the acquisition (:mod:`scripts.data.phantom.noise`) differs between versions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, special

EDGE_PX = 0.6  # width of the soft anatomical edges (pixels): anti-aliasing, keeps bilinear warping accurate


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------------
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
        pap_pos = [
            c + frame @ np.array([0.35 * length, 0.6 * semi[1] * math.cos(t), 0.6 * semi[2] * math.sin(t)]) for t in pap
        ]
        a.update(pap_r=r_endo * rng.uniform(0.13, 0.17), pap_pos=pap_pos, pap_axis=e0, pap_len=0.22 * length)
    a.update(
        centre=c,
        frame=frame,
        semi=semi,
        thick=thick,
        rv_centre=rv_c,
        rv_frame=rv_frame,
        rv_semi=rv_semi,
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
    grad = np.sqrt((((y / (semi**2).reshape((-1,) + (1,) * (y.ndim - 1))) ** 2).sum(0))) / rho
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
        lat = np.sqrt(y[1] ** 2 + y[2] ** 2) / np.maximum(np.sqrt((y**2).sum(0)), 1e-6)  # 0 on the long axis
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
            perp = np.sqrt(np.maximum((dp * dp).sum(0) - along**2, 0))
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
    return {
        "blood": blood - pap,
        "pap": pap,
        "myo": myo,
        "rv": rv,
        "rvw": rvw,
        "la": la,
        "d_out": d_out,
        "labels": labels,
    }


def _render_clean(kind, a, f, tex, look) -> np.ndarray:
    """Clean image (values in [0, 1]) from anatomy memberships ``f`` and sampled textures ``tex``."""
    rest = np.clip(1.0 - f["blood"] - f["pap"] - f["myo"] - f["rv"] - f["rvw"] - f["la"], 0.0, 1.0)
    band = np.exp(-(((f["d_out"] - 1.5 * a["mm"] ** 0.5) / (look["peri_w"])) ** 2)) * (f["d_out"] > -1.0)
    if kind.startswith("echo"):
        bg = np.clip(look["bg"] + 0.09 * tex["large"] + 0.06 * tex["fine"], 0.08, 0.85)
        bg = bg * (1 - band * look["peri_amp"]) + look["peri"] * band * look["peri_amp"]
        myo_i = look["myo"] + 0.05 * tex["myo"]
        img = (
            rest * bg
            + (f["blood"] + f["la"]) * look["blood"]
            + f["rv"] * look["rv_blood"]
            + (f["myo"] + f["pap"]) * myo_i
            + f["rvw"] * look["rvw"]
        )
    else:
        lung = _sig((tex["large2"] - look["lung_thr"]) / 0.15)
        bg = np.clip(look["bg"] + 0.06 * tex["large"] + 0.04 * tex["fine"], 0.08, 0.5)
        bg = bg * (1 - lung) + 0.04 * lung
        fat = band * look["peri_amp"] * (0.55 + 0.45 * np.cos(tex["fat_phase"]))
        bg = bg * (1 - fat) + look["peri"] * fat
        myo_i = look["myo"] + 0.02 * tex["myo"]
        img = (
            rest * bg
            + (f["blood"] + f["la"]) * look["blood"]
            + f["rv"] * look["rv_blood"]
            + (f["myo"] + f["pap"]) * myo_i
            + f["rvw"] * look["rvw"]
        )
    return np.clip(img, 0.0, 1.0)


def _sample_look(rng, kind) -> dict:
    if kind.startswith("echo"):
        return {
            "bg": rng.uniform(0.3, 0.4),
            "blood": rng.uniform(0.0, 0.04),
            "rv_blood": rng.uniform(0.0, 0.04),
            "myo": rng.uniform(0.55, 0.68),
            "rvw": rng.uniform(0.5, 0.6),
            "peri": rng.uniform(0.8, 0.92),
            "peri_amp": rng.uniform(0.6, 1.0),
            "peri_w": rng.uniform(1.2, 2.0),
        }
    return {
        "bg": rng.uniform(0.2, 0.3),
        "blood": rng.uniform(0.6, 0.7),
        "rv_blood": rng.uniform(0.58, 0.7),
        "myo": rng.uniform(0.17, 0.25),
        "rvw": rng.uniform(0.2, 0.26),
        "peri": rng.uniform(0.55, 0.65),
        "peri_amp": rng.uniform(0.5, 1.0),
        "peri_w": rng.uniform(1.2, 2.2),
        "lung_thr": rng.uniform(0.4, 0.9),
    }


# ----------------------------------------------------------------------------------------------------------------------
# motion: backward map T(x) = x + z(x) from ES to ED coordinates
# ----------------------------------------------------------------------------------------------------------------------
def _sample_motion(rng, a) -> dict:
    ndim = a["ndim"]
    mm = a["mm"]
    m = {
        "eject": rng.uniform(0.42, 0.62) if ndim == 2 else rng.uniform(0.52, 0.68),  # ejected cavity area / volume
        "regional": rng.uniform(0.0, 0.25),
        "regional_phase": rng.uniform(0, 2 * np.pi),
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
    w = np.exp(-((grid - c - m["shift"].reshape(shp)) ** 2).sum(0) / (2 * s_t**2))
    x = grid - m["shift"].reshape(shp) * w
    # 2) twist (2D: rotation decaying outside the LV) / torsion (3D: apex and base rotate in opposite directions)
    d = x - c
    if ndim == 2:
        r = np.sqrt((d**2).sum(0)) / float(a["semi"].mean())
        ang = m["twist"] * np.exp(-((r / 1.6) ** 2))
        ca, sa = np.cos(ang), np.sin(ang)
        x = np.stack([c[0] + ca * d[0] - sa * d[1], c[1] + sa * d[0] + ca * d[1]])
    else:
        e0, e1, e2 = (a["frame"][:, i].reshape(shp) for i in range(3))
        u = (d * e0).sum(0)
        p1, p2 = (d * e1).sum(0), (d * e2).sum(0)
        rl = np.sqrt(p1**2 + p2**2) / float(a["semi"][1:].mean())
        un = u / a["semi"][0]  # 0 at the base plane, 1 at the endocardial apex
        ang = m["twist"] * (un - 0.4) * np.exp(-((rl / 1.8) ** 2)) * np.exp(-(((un - 0.5) / 1.2) ** 2))
        ca, sa = np.cos(ang), np.sin(ang)
        x = c + u * e0 + (ca * p1 - sa * p2) * e1 + (sa * p1 + ca * p2) * e2
    # 3) radial, volume-preserving contraction in LV-normalised coordinates: rho_ED^n = rho^n + c * phi(rho)
    d = x - c
    y = np.tensordot(a["frame"].T, d, axes=1) / a["semi"].reshape(shp)
    rho = np.sqrt((y**2).sum(0))
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
    ratio = (1.0 + s**4) ** (-1.0 / 4)  # phi / s
    scale = (1.0 + cc * ratio / rho_e**ndim) ** (1.0 / ndim)
    x = c + d * scale
    # 4) RV squeeze: the ED RV cavity is larger (expansion about the middle of the RV crescent, Gaussian envelope)
    k_rad = 0 if ndim == 2 else 1  # RV-frame axis pointing from the LV towards the RV
    u_rv = a["rv_frame"][:, k_rad]
    crv = (a["rv_centre"] + u_rv * 0.6 * a["rv_semi"][k_rad]).reshape(shp)
    dr = x - crv
    s_rv = 0.6 * float(a["rv_semi"][k_rad])
    x = x + m["rv_squeeze"] * dr * np.exp(-(dr**2).sum(0) / (2 * s_rv**2))
    # 5) small smooth random field
    shape = grid.shape[1:]
    x = x + m["field_amp"] * _random_field(rng_field, shape, m["field_sigma"], n=ndim)
    return x
