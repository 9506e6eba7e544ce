"""Acquisition and noise of the built-in cardiac phantom (see :mod:`scripts.data.phantom` and docs/phantom.md).

Version 1 (``_echo_frame`` / ``_mri_frame``): every acquisition parameter is drawn independently for ED and ES.
Version 2 (``_echo_acquisition_v2`` / ``_mri_acquisition_v2``): the scanner settings of a cine loop (gain, TGC,
noise floor, coil array, parallel imaging, off-resonance band, persistent rib shadow, clutter geometry) are drawn
once per acquisition and shared by both frames; frame-specific events (a shadow, a segmental dropout, motion ghosts)
hit exactly one frame. ``noise_mean`` / ``noise_std`` give the exact moments of one observed frame
(:mod:`scripts.data.phantom.residual` those of the residual ``I_f - Warp(I_m, z)`` over noise draws of both frames).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage, special, stats

from scripts.data.phantom.anatomy import _as_rng, _sig

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
    return float(np.sqrt((k**2).sum()))


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
    depth = np.sqrt((v**2).sum(0))
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
    n = r / np.maximum(np.sqrt((r**2).sum(0)), 1e-6)
    cos_psi = (n * beam).sum(0)
    wall = f["myo"] + f["rvw"] + f["pap"]
    db -= drop * (1.0 - cos_psi**2) ** 2 * wall
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
    return {
        "type": "echo",
        "offset": db / dr,
        "clutter": clutter,
        "sector": sector,
        "dr": dr,
        "looks": geo["looks"],
        "grain": geo["grain"],
        "artefacts": art,
    }


def _echo_mean_level(clean, params):
    dr = params["dr"]
    signal = (1.0 + _ECHO_BLACK) * clean - _ECHO_BLACK + params["offset"]
    floor = params.get("floor", _ECHO_FLOOR)  # v2: a noise floor that rises with depth (TGC gain on thermal noise)
    lin = 10 ** (dr * signal / 10) + params["clutter"] + 10 ** (dr * floor / 10)
    return 10.0 * np.log10(lin) / dr


def _rician_std(nu, sigma):
    t = nu**2 / (4 * sigma**2)
    lag = (1 + 2 * t) * special.ive(0, t) + 2 * t * special.ive(1, t)  # L_{1/2}(-nu^2 / 2 sigma^2)
    mean = sigma * math.sqrt(math.pi / 2) * lag
    return np.sqrt(np.maximum(nu**2 + 2 * sigma**2 - mean**2, 0.0))


_SIGMA_CAP = 0.05


def _mri_coil(rng, shape, mm) -> dict:
    h, w = shape
    coils = [(np.array([-rng.uniform(0.08, 0.25) * h, rng.uniform(0.1, 0.9) * w]), 1.0) for _ in range(4)]
    coils += [
        (np.array([rng.uniform(1.05, 1.2) * h, rng.uniform(0.2, 0.8) * w]), rng.uniform(0.05, 0.25)) for _ in range(2)
    ]
    return {
        "coils": coils,
        "width": rng.uniform(0.3, 0.42) * h,
        "snr_range": rng.uniform(6.0, 10.0),
        "sigma_min": rng.uniform(0.004, 0.008),
    }


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
    return {"type": "mri", "signal": signal, "sigma": sigma, "artefacts": art}


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


@functools.lru_cache(maxsize=32)
def _echo_mean_table(looks: int, dr: float):
    """E[clip(m + Z, 0, 1)] as a function of the pre-clipping mean display level m (same quadrature as the std)."""
    z = _logspeckle_quantiles(looks) / dr
    m = np.linspace(-1.5, 2.5, 1601)
    return m, np.clip(m[:, None] + z[None, :], 0.0, 1.0).mean(1)


def _rician_mean(nu, sigma):
    t = nu**2 / (4 * sigma**2)
    lag = (1 + 2 * t) * special.ive(0, t) + 2 * t * special.ive(1, t)
    return sigma * math.sqrt(math.pi / 2) * lag


def noise_mean(clean: np.ndarray, params: Mapping) -> np.ndarray:
    """True per-pixel mean of the observed image given its clean image and frame parameters (analytic)."""
    if params["type"] == "echo":
        m_tab, e_tab = _echo_mean_table(int(params["looks"]), float(params["dr"]))
        mean = np.interp(_echo_mean_level(clean, params), m_tab, e_tab)
        return np.where(params["sector"], mean, 0.0)
    return _rician_mean(np.abs(params["signal"]), params["sigma"])


# ----------------------------------------------------------------------------------------------------------------------
# version 2: one acquisition (cine loop) shared by both frames, frame-specific events in exactly one frame
# ----------------------------------------------------------------------------------------------------------------------
P_RIB_SHADOW = 0.3  # echo: persistent rib shadow in both frames (probe held still)
P_CLUTTER = 0.8  # echo: chest-wall reverberation haze
P_SHADOW_ONE = 0.4  # echo: lung / rib shadow in one frame (breathing moves the lung edge into the window)
P_DROPOUT_ONE = 0.4  # echo: segmental dropout in one frame (through-plane motion of the wall)
P_ACCEL = 0.6  # MRI: parallel imaging R = 2 along the phase-encoding axis
P_BAND = 0.25  # MRI: bSSFP off-resonance band (static B0: same place in both frames)
P_GHOST_ONE = 0.5  # MRI: motion / flow ghosts in one frame (k-space inconsistency of that cardiac phase)


def _beams(geo, grid):
    shp = (-1,) + (1,) * (grid.ndim - 1)
    v = grid - geo["apex"].reshape(shp)
    depth = np.sqrt((v**2).sum(0))
    beam = v / np.maximum(depth, 1e-6)
    return depth, beam, np.arccos(np.clip(beam[0], -1, 1))


def _beam_axis(rng, ndim, half):
    if ndim == 2:
        t = rng.uniform(-0.8, 0.8) * half
        return np.array([math.cos(t), math.sin(t)])
    t = rng.uniform(0, 0.8) * half
    psi = rng.uniform(0, 2 * np.pi)
    return np.array([math.cos(t), math.sin(t) * math.cos(psi), math.sin(t) * math.sin(psi)])


def _shadow_loss(beam, depth, s, width):
    """Attenuation (dB) of a beam-aligned wedge of half-width ``width`` beyond the depth ``s['start']``."""
    shp = (-1,) + (1,) * (beam.ndim - 1)
    a_s = np.arccos(np.clip((beam * s["axis"].reshape(shp)).sum(0), -1, 1))
    return s["strength"] * _sig((width - a_s) / np.deg2rad(1.0)) * _sig((depth - s["start"]) / 1.5)


def _echo_acquisition_v2(rng, geo, ndim, mm) -> dict:
    """Settings of one echo cine loop (both frames) and its frame-specific events."""
    dmax, half = geo["depth_max"], geo["half_angle"]
    acq = {
        "gain_db": rng.uniform(-3, 2),
        "att_db": rng.uniform(0, 10),  # residual depth attenuation not compensated by TGC
        "tgc": [(rng.uniform(-3, 3), rng.uniform(0, 1)) for _ in range(3)],  # TGC slider bumps (dB, depth)
        "floor_bottom": rng.uniform(-0.25, 0.0),  # display level of the thermal noise at the maximum depth
        "floor_rise_db": rng.uniform(25, 45),  # TGC gain over the depth, applied to the thermal noise too
        "dropout_db": rng.uniform(4, 18),  # specular walls parallel to the beam (angle of incidence)
        "events": [],
    }
    if rng.random() < P_RIB_SHADOW:
        acq["rib"] = {
            "axis": _beam_axis(rng, ndim, half),
            "width": np.deg2rad(rng.uniform(3, 8)),
            "start": rng.uniform(0.1, 0.3) * dmax,
            "strength": rng.uniform(12, 30),
            "jitter": np.deg2rad(rng.uniform(-1, 1, 2)),
        }
    if rng.random() < P_CLUTTER:
        acq["clutter"] = {
            "level": rng.uniform(0.25, 0.6),
            "decay": rng.uniform(10, 30) * mm,
            "wall": rng.uniform(8, 20) * mm,
            "bands_db": rng.uniform(0, 6, 4),
            "frame_db": rng.normal(0, 1.5, 2),
            "frame_shift": rng.uniform(-1, 1, 2) * mm,
        }
    if rng.random() < P_SHADOW_ONE:
        acq["events"].append(
            (
                "shadow",
                int(rng.integers(2)),
                {
                    "axis": _beam_axis(rng, ndim, half),
                    "width": np.deg2rad(rng.uniform(4, 10)),
                    "start": rng.uniform(0.1, 0.4) * dmax,
                    "strength": rng.uniform(12, 30),
                },
            )
        )
    if rng.random() < P_DROPOUT_ONE:
        acq["events"].append(
            (
                "dropout",
                int(rng.integers(2)),
                {
                    "theta": rng.uniform(0, 2 * np.pi),
                    "half": np.deg2rad(rng.uniform(20, 45)),
                    "strength": rng.uniform(6, 18),
                },
            )
        )
    return acq


def _echo_frame_v2(acq, geo, a, f, centre_frame, grid, frame: int) -> dict:
    """Acquisition maps of frame ``frame`` (0 = ED, 1 = ES) of an echo loop with settings ``acq``."""
    ndim = grid.ndim - 1
    shp = (-1,) + (1,) * ndim
    depth, beam, ang = _beams(geo, grid)
    dmax, half, dr = geo["depth_max"], geo["half_angle"], geo["dr"]
    sector = (ang <= half) & (depth <= dmax)
    rd = depth / dmax
    db = np.full(depth.shape, acq["gain_db"]) - acq["att_db"] * rd
    for amp, pos in acq["tgc"]:
        db += amp * np.exp(-(((rd - pos) / 0.12) ** 2))
    db -= 6.0 * _sig((ang - (half - np.deg2rad(4))) / np.deg2rad(1.0))  # weaker edge beams
    # lateral-wall dropout on this frame's walls
    r = grid - centre_frame.reshape(shp)
    if ndim == 3:
        e0 = a["frame"][:, 0].reshape(shp)
        r = r - (r * e0).sum(0) * e0
    n = r / np.maximum(np.sqrt((r**2).sum(0)), 1e-6)
    wall = f["myo"] + f["rvw"] + f["pap"]
    db -= acq["dropout_db"] * (1.0 - (n * beam).sum(0) ** 2) ** 2 * wall
    art, specific = {}, np.zeros(depth.shape)
    if "rib" in acq:
        s = acq["rib"]
        db -= _shadow_loss(beam, depth, s, s["width"] + s["jitter"][frame])
        art["rib_shadow_db"] = s["strength"]
    for kind, fr, e in acq["events"]:
        if fr != frame:
            continue
        if kind == "shadow":
            loss = _shadow_loss(beam, depth, e, e["width"])
        else:  # segmental dropout: an angular segment of the walls about the LV centre
            if ndim == 2:
                theta = np.arctan2(r[1], r[0])
            else:
                theta = np.arctan2(
                    (r * a["frame"][:, 2].reshape(shp)).sum(0), (r * a["frame"][:, 1].reshape(shp)).sum(0)
                )
            dth = np.abs(np.angle(np.exp(1j * (theta - e["theta"]))))
            loss = e["strength"] * _sig((e["half"] - dth) / 0.1) * wall
        db -= loss
        specific += loss
        art[f"{kind}_db"] = e["strength"]
    clutter = np.zeros(depth.shape)
    if "clutter" in acq:  # probe-fixed chest-wall haze with reverberation bands at multiples of the wall depth
        c = acq["clutter"]
        d = depth + c["frame_shift"][frame]
        bands = np.ones(depth.shape)
        for k, b_db in enumerate(c["bands_db"], start=1):
            bands += 10 ** (b_db / 10) * np.exp(-(((d - k * c["wall"]) / (1.5 * a["mm"])) ** 2)) * 0.5**k
        clutter = 10 ** ((dr * c["level"] + c["frame_db"][frame]) / 10) * np.exp(-np.maximum(d, 0) / c["decay"]) * bands
        art["clutter"] = c["level"]
    floor = acq["floor_bottom"] - acq["floor_rise_db"] / dr * (1.0 - rd)
    return {
        "type": "echo",
        "offset": db / dr,
        "clutter": clutter,
        "floor": floor,
        "sector": sector,
        "dr": dr,
        "looks": geo["looks"],
        "grain": geo["grain"],
        "artefacts": art,
        "specific_db": specific,
    }


def _mri_acquisition_v2(rng, shape) -> dict:
    """Settings of one cine MRI acquisition (both frames): coil array, parallel imaging, noise, band, events."""
    h, w = shape
    coils = [
        (np.array([-rng.uniform(0.02, 0.12) * h, (j + 0.5) / 4 * w + rng.uniform(-0.06, 0.06) * w]), 1.0)
        for j in range(4)
    ]  # anterior array on the chest
    coils += [
        (
            np.array([rng.uniform(1.08, 1.25) * h, (j + 0.5) / 4 * w + rng.uniform(-0.06, 0.06) * w]),
            rng.uniform(0.6, 1.0),
        )
        for j in range(4)
    ]  # posterior (spine) array under the table
    acq = {
        "coils": coils,
        "radius": rng.uniform(0.3, 0.45) * h,
        "accel": 2 if rng.random() < P_ACCEL else 1,
        "sigma_centre": rng.uniform(0.006, 0.014),
        "shading": rng.uniform(0.0, 0.3),
        "events": [],
    }
    if rng.random() < P_BAND:
        acq["band"] = {
            "theta": rng.uniform(0, np.pi),
            "p0": np.array(shape) * rng.uniform(0.3, 0.7, 2),
            "phase": rng.uniform(0, 6),
            "loss": rng.uniform(0.5, 0.9),
            "width": rng.uniform(1.5, 3.0),
        }
    if rng.random() < P_GHOST_ONE:
        acq["events"].append(
            (
                "ghost",
                int(rng.integers(2)),
                {
                    "spacing": rng.uniform(0.15, 0.45) * w,
                    "amp": rng.uniform(0.05, 0.2),
                    "phases": rng.uniform(0, 2 * np.pi, 4),
                },
            )
        )
    return acq


def _mri_maps_v2(acq, grid, centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise std sigma(x), signal shading b(x) and g-factor of the coil-combined (and SENSE-unfolded) image.

    Coil c has sensitivity s_c(x) = w_c (a^2 / (a^2 + d_c(x)^2))^(3/2) (on-axis field of a loop of radius a) and
    white noise of equal level. Sensitivity-normalised combination: sigma ∝ sqrt([(A^T A)^-1]_00 R), A = [s(x), s(x')]
    for R = 2 (x' = x + W/2 along the phase-encoding axis 1), A = s(x) for R = 1; the normalisation is imperfect:
    signal and noise keep a shading (|s|^2 / |s(c)|^2)^(kappa/2). sigma is set to sigma_centre at the LV centre.
    """
    sens = np.stack(
        [
            wgt * (acq["radius"] ** 2 / (acq["radius"] ** 2 + ((grid - p.reshape(-1, 1, 1)) ** 2).sum(0))) ** 1.5
            for p, wgt in acq["coils"]
        ]
    )
    m00 = (sens**2).sum(0)
    if acq["accel"] == 2:
        alias = np.roll(sens, grid.shape[2] // 2, axis=2)
        m11, m01 = (alias**2).sum(0), (sens * alias).sum(0)
        var = 2.0 * m11 / np.maximum(m00 * m11 - m01**2, 1e-12 * m00 * m11)
    else:
        var = 1.0 / m00
    gfac = np.sqrt(var * m00 / acq["accel"])
    ci = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(centre, grid.shape[1:]))
    shade = (m00 / m00[ci]) ** (acq["shading"] / 2)
    raw = np.sqrt(var) * shade
    sigma = _SIGMA_CAP * np.tanh(acq["sigma_centre"] * raw / raw[ci] / _SIGMA_CAP)  # soft cap: no clipping at 1
    return sigma, shade, gfac


def _mri_frame_v2(acq, sigma, shade, clean, heart_soft, grid, frame: int) -> dict:
    shape = clean.shape
    gain = shade.copy()
    art = {}
    if "band" in acq:  # bSSFP off-resonance band: fixed in space (B0), the tissue moves under it
        b = acq["band"]
        nrm = np.array([math.cos(b["theta"]), math.sin(b["theta"])])
        dist = ((grid - b["p0"].reshape(-1, 1, 1)) * nrm.reshape(-1, 1, 1)).sum(0)
        dist = dist + 3.0 * np.sin(dist / 15.0 + b["phase"])
        gain = gain * (1 - b["loss"] * np.exp(-((dist / b["width"]) ** 2)))
        art["band"] = True
    ghost = np.zeros(shape, np.complex128)
    for kind, fr, e in acq["events"]:
        if fr != frame:
            continue
        moving = clean * heart_soft * shade
        for j, sgn in ((1, 1), (1, -1), (2, 1), (2, -1)):  # replicas at +-j * spacing along the phase-encoding axis
            k = 2 * (j - 1) + (sgn < 0)
            shift = int(round(sgn * j * e["spacing"]))
            ghost += e["amp"] * 0.5 ** (j - 1) * np.roll(moving, shift, axis=1) * np.exp(1j * e["phases"][k])
        art["ghost"] = e["amp"]
    signal = clean * gain + ghost
    mag = np.abs(signal)
    signal = signal * np.minimum(1.0, 0.85 / np.maximum(mag, 1e-9))
    return {"type": "mri", "signal": signal, "sigma": sigma, "artefacts": art, "specific": np.abs(ghost)}
