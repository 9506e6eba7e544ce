"""The residual ground truth of the built-in phantom: moments of ``I_f - Warp(I_m, z)`` over noise draws of both frames.

See :func:`residual_moments` and docs/phantom.md ("Residual ground truth").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage, special

from scripts.data.phantom.noise import noise_mean, noise_std


# ----------------------------------------------------------------------------------------------------------------------
# residual I_f - Warp(I_m, z) over noise draws of both frames
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _kernel_lag1(n: int, sigma: float) -> float:
    """Correlation at lag 1 of white noise filtered by the 1D Gaussian of ``_speckle`` (wrap, truncate 3)."""
    delta = np.zeros(n)
    delta[n // 2] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma, mode="wrap", truncate=3.0)
    return float((k * np.roll(k, 1)).sum() / (k * k).sum())


def log_speckle_correlation(r: float, looks: int, n_terms: int = 400) -> float:
    """corr(ln G_a, ln G_b) of two Gamma(looks) speckle intensities whose complex fields correlate with |rho|^2 = r.

    Kibble's bivariate gamma: Cov(ln G_a, ln G_b) = sum_{n>=1} r^n Gamma(L) n! / (Gamma(L + n) n^2) and
    Var(ln G) = psi'(L) (the series at r = 1); for L = 1 the covariance is the dilogarithm Li_2(r).
    """
    if r <= 0.0:
        return 0.0
    if r >= 1.0:
        return 1.0
    n = np.arange(1, n_terms + 1, dtype=np.float64)
    c = np.exp(special.gammaln(looks) + special.gammaln(n + 1) - special.gammaln(looks + n)) / n**2
    return float(np.sum(np.exp(n * math.log(min(r, 1.0))) * c) / special.polygamma(1, looks))


def _corner_weights(ddf: np.ndarray):
    """Bilinear / trilinear corners of ``x + z(x)`` as ``Warp`` samples them (align_corners, border padding).

    Returns a list of ``(bits, index tuple, weight)`` over the 2^ndim corners.
    """
    shape = ddf.shape[:-1]
    ndim = len(shape)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    lo, hi, frac = [], [], []
    for i, s in enumerate(shape):
        p = np.clip(grid[i] + ddf[..., i].astype(np.float64), 0.0, s - 1)
        i0 = np.minimum(np.floor(p).astype(np.int64), s - 1)
        lo.append(i0)
        hi.append(np.minimum(i0 + 1, s - 1))
        frac.append(p - i0)
    corners = []
    for code in range(2**ndim):
        bits = tuple((code >> (ndim - 1 - i)) & 1 for i in range(ndim))
        idx = tuple(hi[i] if b else lo[i] for i, b in enumerate(bits))
        w = np.ones(shape)
        for i, b in enumerate(bits):
            w = w * (frac[i] if b else 1.0 - frac[i])
        corners.append((bits, idx, w))
    return corners


def _lag_correlation(params: Mapping, shape) -> callable:
    """corr(I(a), I(b)) of one frame's noise for neighbouring pixels a, b as a function of the lag bits."""
    if params["type"] != "echo":
        return lambda lag: 1.0 if not any(lag) else 0.0  # Rician noise: independent pixels
    grain = params["grain"]
    c = [_kernel_lag1(int(s), float(g)) for s, g in zip(shape, grain)]
    looks = int(params["looks"])

    @functools.lru_cache(maxsize=None)
    def corr(lag):
        if not any(lag):
            return 1.0
        rho_w = float(np.prod([c[i] for i, d in enumerate(lag) if d]))
        return log_speckle_correlation(rho_w**2, looks)

    return corr


def residual_moments(fixed_clean, fixed_params: Mapping, moving_clean, moving_params: Mapping, ddf: np.ndarray):
    """Mean and root-mean-square of the residual r = I_f - Warp(I_m, z) over noise draws of both frames.

    E[r] = mu_f - sum_k w_k mu_m(p_k) (exact), Var[r] = sigma_f^2 + sum_{k,l} w_k w_l rho_kl sigma_m(p_k) sigma_m(p_l),
    with w_k the bilinear (trilinear) corner weights of ``Warp`` (border padding) and rho_kl the correlation of the
    moving frame's noise between corners k and l: 0 for Rician noise (independent pixels, exact); for echo the
    correlation of log speckle of the speckle PSF (Kibble's bivariate gamma, exact before display clipping; the
    clipped displayed values are approximated as correlating like the unclipped ones).

    Returns ``(residual_mean, residual_std)`` float32 arrays, ``residual_std = sqrt(Var[r] + E[r]^2)``: the
    root-mean-square residual at the true displacement, which is what sigma^2 of a Gaussian likelihood converges to.
    """
    ddf = np.asarray(ddf)
    mu_f = noise_mean(np.asarray(fixed_clean, np.float64), fixed_params)
    sd_f = noise_std(np.asarray(fixed_clean, np.float64), fixed_params).astype(np.float64)
    mu_m = noise_mean(np.asarray(moving_clean, np.float64), moving_params)
    sd_m = noise_std(np.asarray(moving_clean, np.float64), moving_params).astype(np.float64)
    corners = _corner_weights(ddf)
    corr = _lag_correlation(moving_params, ddf.shape[:-1])
    warped_mean = sum(w * mu_m[idx] for _, idx, w in corners)
    ws = [(bits, w * sd_m[idx]) for bits, idx, w in corners]
    var_m = np.zeros(ddf.shape[:-1])
    for i, (bi, ai) in enumerate(ws):
        var_m += ai * ai
        for bj, aj in ws[i + 1 :]:
            rho = corr(tuple(abs(x - y) for x, y in zip(bi, bj)))
            if rho:
                var_m += 2.0 * rho * ai * aj
    mean = mu_f - warped_mean
    rms = np.sqrt(np.maximum(sd_f**2 + var_m, 0.0) + mean**2)
    return mean.astype(np.float32), rms.astype(np.float32)
