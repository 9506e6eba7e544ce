"""Benchmark and measurement script of the built-in phantom (not a test: it prints figures for docs/phantom.md).

    python -m bundle.phantom_bench speed --n 1000 --kind echo2d --workers 2
    python -m bundle.phantom_bench checks --kind echo2d --n 20

``speed`` times ``write_dataset`` (generation + writing the NIfTI files) into a temporary folder;
``checks`` measures on ``n`` pairs the figures the tests assert: label-warp Dice, clean-image warp error,
noise_std relative error (Monte-Carlo), heteroscedasticity ratio, identity Dice, minimum Jacobian determinant.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np


def speed(n: int = 1000, kind: str = "echo2d", workers: int = 2, size=None, out_dir: str | None = None) -> dict:
    """Time writing ``n`` pairs (all in the training split) with ``workers`` processes; print and return the figures."""
    from scripts.phantom import write_dataset

    tmp = out_dir or tempfile.mkdtemp(prefix="phantom_bench_")
    try:
        c0 = os.times()
        t0 = time.perf_counter()
        write_dataset(tmp, kind=kind, n_train=n, n_val=0, n_test=0, size=size, seed=0, progress=False,
                      workers=workers)
        dt = time.perf_counter() - t0
        c1 = os.times()
        cpu = sum(c1[i] - c0[i] for i in range(4))  # user + system, this process and its workers
        nbytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
    finally:
        if out_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {"kind": kind, "pairs": n, "workers": workers, "seconds": round(dt, 2),
           "ms_per_pair": round(1000 * dt / max(n, 1), 1),
           "cpu_seconds": round(cpu, 2), "cpu_ms_per_pair": round(1000 * cpu / max(n, 1), 1), "MB": round(nbytes / 2 ** 20, 1),
           "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    return res


def pair_checks(pair: dict, n_draws: int = 64, seed: int = 1) -> dict:
    """The check figures of one pair (see the module docstring)."""
    from scipy import ndimage

    from scripts import phantom as P

    ddf = pair["ddf"]
    ml, fl = pair["moving_label"], pair["fixed_label"]
    nearest = P.warp(ml, ddf, "nearest")
    onehot = np.stack([P.warp((ml == k).astype(np.float32), ddf) for k in range(4)]).argmax(0)
    clean_err = np.abs(P.warp(pair["moving_clean"], ddf) - pair["fixed_clean"])[P.inside_mask(ddf)]
    heart = ndimage.binary_dilation(fl > 0, iterations=3)
    s = pair["noise_std"][heart]
    p5, p95 = np.percentile(s, [5, 95])
    rng = np.random.default_rng(seed)
    clean = pair["fixed_clean"].astype(np.float64)
    draws = np.stack([P.sample_noise(clean, pair["fixed_params"], rng) for _ in range(n_draws)])
    emp = draws.std(0, ddof=1)
    th = pair["noise_std"]
    m = th > 0.01
    return {
        "dice_myo_warp_nearest": P.dice(nearest, fl),
        "dice_myo_warp_onehot": P.dice(onehot, fl),
        "clean_warp_mae": float(clean_err.mean()),
        "clean_warp_p99": float(np.percentile(clean_err, 99)),
        "noise_std_median_rel_err": float(np.median(np.abs(emp[m] - th[m]) / th[m])),
        "hetero_ratio_p95_p5": float(p95 / max(p5, 1e-6)),
        "noise_std_p5_p95": (float(p5), float(p95)),
        "identity_dice_myo": P.dice(ml, fl),
        "min_jacobian": float(P.jacobian_determinant(ddf).min()),
        "max_disp_vox": float(np.sqrt((ddf ** 2).sum(-1)).max()),
    }


def checks(kind: str = "echo2d", n: int = 20, size=None, seed: int = 0, n_draws: int = 64) -> dict:
    """Aggregate :func:`pair_checks` over ``n`` training pairs of ``seed``: min / mean / max of each figure."""
    from scripts import phantom as P

    rows = [pair_checks(P.make_pair(P.pair_rng(seed, kind, "training", i), kind, size), n_draws) for i in range(n)]
    out = {"kind": kind, "pairs": n}
    for key in rows[0]:
        if key == "noise_std_p5_p95":
            continue
        v = np.array([r[key] for r in rows])
        out[key] = {"min": round(float(v.min()), 4), "mean": round(float(v.mean()), 4), "max": round(float(v.max()), 4)}
    return out


if __name__ == "__main__":
    import fire

    fire.Fire({"speed": speed, "checks": checks})
