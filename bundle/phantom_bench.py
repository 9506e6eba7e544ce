"""Benchmark and measurement script of the built-in phantom (not a test: it prints figures for docs/phantom.md).

    python -m bundle.phantom_bench speed --n 1000 --kind echo2d --workers 2 [--version 2]
    python -m bundle.phantom_bench checks --kind echo2d --n 20 [--version 2]
    python -m bundle.phantom_bench compare --kind echo2d --n 30          # v1 vs v2 side by side

``speed`` times ``write_dataset`` (generation + writing the NIfTI files) into a temporary folder;
``checks`` measures on ``n`` pairs the figures the tests assert: label-warp Dice, clean-image warp error,
noise_std / residual_std relative error against Monte-Carlo draws of both frames, heteroscedasticity ratios,
Spearman correlations of the fixed image with the noise / residual maps, the share of pairs with a frame-specific
artefact over the myocardium (version 2), identity Dice, minimum Jacobian determinant.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import numpy as np

ECHO_ARTEFACT_DB = 3.0  # a frame-specific loss of >= 3 dB ...
MRI_ARTEFACT = 0.02  # ... or a ghost of >= 0.02 (about 10 % of the myocardial signal) ...
ARTEFACT_MYO_SHARE = 0.10  # ... over >= 10 % of that frame's myocardium counts as "over the myocardium"


def speed(
    n: int = 1000, kind: str = "echo2d", workers: int = 2, size=None, out_dir: str | None = None, version: int = 2
) -> dict:
    """Time writing ``n`` pairs (all in the training split) with ``workers`` processes; print and return the figures."""
    from scripts.data.phantom import write_dataset

    tmp = out_dir or tempfile.mkdtemp(prefix="phantom_bench_")
    try:
        c0 = os.times()
        t0 = time.perf_counter()
        write_dataset(
            tmp,
            kind=kind,
            n_train=n,
            n_val=0,
            n_test=0,
            size=size,
            seed=0,
            progress=False,
            workers=workers,
            version=version,
        )
        dt = time.perf_counter() - t0
        c1 = os.times()
        cpu = sum(c1[i] - c0[i] for i in range(4))  # user + system, this process and its workers
        nbytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
    finally:
        if out_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "kind": kind,
        "version": version,
        "pairs": n,
        "workers": workers,
        "seconds": round(dt, 2),
        "ms_per_pair": round(1000 * dt / max(n, 1), 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_ms_per_pair": round(1000 * cpu / max(n, 1), 1),
        "MB": round(nbytes / 2**20, 1),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    return res


def monte_carlo_residual(pair: dict, n_draws: int = 64, seed: int = 1) -> dict:
    """Empirical moments over ``n_draws`` noise draws of both frames: fixed std, moving std, residual mean / RMS."""
    import torch
    from monai.networks.blocks import Warp

    from scripts.data import phantom as P

    rng = np.random.default_rng(seed)
    cf = pair["fixed_clean"].astype(np.float64)
    cm = pair["moving_clean"].astype(np.float64)
    f = np.stack([P.sample_noise(cf, pair["fixed_params"], rng) for _ in range(n_draws)])
    m = np.stack([P.sample_noise(cm, pair["moving_params"], rng) for _ in range(n_draws)])
    ddf = torch.as_tensor(np.moveaxis(pair["ddf"], -1, 0))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = Warp("bilinear", "border")(
            torch.as_tensor(m, dtype=torch.float32)[:, None], ddf.expand(n_draws, *ddf.shape[1:])
        )[:, 0].numpy()
    r = f - w
    return {
        "fixed_std": f.std(0, ddof=1),
        "moving_std": m.std(0, ddof=1),
        "fixed_mean": f.mean(0),
        "residual_mean": r.mean(0),
        "residual_rms": np.sqrt((r**2).mean(0)),
    }


def median_rel_err(emp: np.ndarray, th: np.ndarray, floor: float | None = None) -> float:
    """Median |emp - th| / th over pixels with th > floor (default: a quarter of the 90th percentile of th)."""
    floor = 0.25 * float(np.percentile(th, 90)) if floor is None else floor
    m = th > floor
    return float(np.median(np.abs(emp[m] - th[m]) / th[m]))


def frame_specific_over_myo(pair: dict) -> bool:
    """Whether a frame-specific artefact (version 2 events) covers >= 10 % of the myocardium of the frame it hits."""
    for key, lab in (("moving_params", "moving_label"), ("fixed_params", "fixed_label")):
        p = pair[key]
        amount = p.get("specific_db") if p["type"] == "echo" else p.get("specific")
        if amount is None:
            continue
        thr = ECHO_ARTEFACT_DB if p["type"] == "echo" else MRI_ARTEFACT
        myo = pair[lab] == 2
        if myo.any() and (amount[myo] >= thr).mean() >= ARTEFACT_MYO_SHARE:
            return True
    return False


def pair_checks(pair: dict, n_draws: int = 64, seed: int = 1) -> dict:
    """The check figures of one pair (see the module docstring)."""
    from scipy import ndimage, stats

    from scripts.data import phantom as P

    ddf = pair["ddf"]
    ml, fl = pair["moving_label"], pair["fixed_label"]
    nearest = P.warp(ml, ddf, "nearest")
    onehot = np.stack([P.warp((ml == k).astype(np.float32), ddf) for k in range(4)]).argmax(0)
    clean_err = np.abs(P.warp(pair["moving_clean"], ddf) - pair["fixed_clean"])[P.inside_mask(ddf)]
    heart = ndimage.binary_dilation(fl > 0, iterations=3)
    myo = fl == 2
    s = pair["noise_std"][heart]
    p5, p95 = np.percentile(s, [5, 95])
    rs5, rs95 = np.percentile(pair["residual_std"][heart], [5, 95])
    mc = monte_carlo_residual(pair, n_draws, seed)
    i_f = pair["fixed"]
    return {
        "dice_myo_warp_nearest": P.dice(nearest, fl),
        "dice_myo_warp_onehot": P.dice(onehot, fl),
        "clean_warp_mae": float(clean_err.mean()),
        "clean_warp_p99": float(np.percentile(clean_err, 99)),
        "noise_std_median_rel_err": median_rel_err(mc["fixed_std"], pair["noise_std"]),
        "moving_noise_std_median_rel_err": median_rel_err(mc["moving_std"], pair["moving_noise_std"]),
        "residual_std_median_rel_err": median_rel_err(mc["residual_rms"], pair["residual_std"]),
        "hetero_ratio_p95_p5": float(p95 / max(p5, 1e-6)),
        "residual_hetero_ratio_p95_p5": float(rs95 / max(rs5, 1e-6)),
        "spearman_If_noise_std_heart": float(stats.spearmanr(i_f[heart], pair["noise_std"][heart])[0]),
        "spearman_If_noise_std_myo": float(stats.spearmanr(i_f[myo], pair["noise_std"][myo])[0]),
        "spearman_If_residual_std_heart": float(stats.spearmanr(i_f[heart], pair["residual_std"][heart])[0]),
        "spearman_If_residual_std_myo": float(stats.spearmanr(i_f[myo], pair["residual_std"][myo])[0]),
        "spearman_noise_std_residual_std_myo": float(
            stats.spearmanr(pair["noise_std"][myo], pair["residual_std"][myo])[0]
        ),
        "frame_specific_artefact_over_myo": float(frame_specific_over_myo(pair)),
        "identity_dice_myo": P.dice(ml, fl),
        "min_jacobian": float(P.jacobian_determinant(ddf).min()),
        "max_disp_vox": float(np.sqrt((ddf**2).sum(-1)).max()),
    }


def checks(kind: str = "echo2d", n: int = 20, size=None, seed: int = 0, n_draws: int = 64, version: int = 2) -> dict:
    """Aggregate :func:`pair_checks` over ``n`` training pairs of ``seed``: min / mean / max of each figure."""
    from scripts.data import phantom as P

    rows, t = [], 0.0
    for i in range(n):
        t0 = time.perf_counter()
        pair = P.make_pair(P.pair_rng(seed, kind, "training", i), kind, size, version=version)
        t += time.perf_counter() - t0
        rows.append(pair_checks(pair, n_draws))
    out = {"kind": kind, "version": version, "pairs": n, "make_pair_ms": round(1000 * t / n, 1)}
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        out[key] = {
            "min": round(float(v.min()), 4),
            "median": round(float(np.median(v)), 4),
            "mean": round(float(v.mean()), 4),
            "max": round(float(v.max()), 4),
        }
    return out


def compare(kind: str = "echo2d", n: int = 20, size=None, seed: int = 0, n_draws: int = 64) -> dict:
    """:func:`checks` of version 1 and version 2 on the same pairs (same anatomy, motion and labels)."""
    a, b = checks(kind, n, size, seed, n_draws, 1), checks(kind, n, size, seed, n_draws, 2)
    return {k: {"v1": a[k], "v2": b[k]} for k in a if k not in ("kind", "version", "pairs")} | {
        "kind": kind,
        "pairs": n,
    }


if __name__ == "__main__":
    import fire

    fire.Fire({"speed": speed, "checks": checks, "compare": compare})
