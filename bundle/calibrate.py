"""``python -m bundle calibrate``: fit the one-scalar σ scale on the validation split (docs/uncertainty.md,
"Calibration of σ̂").

It evaluates the weights on ``eval_split=validation`` with no scale (``configs/evaluate.yaml``'s ``evaluating``, into
``eval_dir``, default ``<output_dir>/eval_validation``) and writes

    s² = Σ_pairs Σ_{x ∈ fov} r(x)² / σ̂²(x)  /  Σ_pairs |fov|

(the pooled ZMS over the validation pixels in the field of view: the s that makes the validation ZMS exactly 1,
Laves et al.'s σ scaling for a Gaussian likelihood) as ``variance_scale.json`` next to the variance weights. Use it
with ``--sigma_scale <that json>`` in the evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

SCALE_JSON = "variance_scale.json"
DEFAULT_CONFIGS = ("configs/train.yaml", "configs/evaluate.yaml")


def fit_sigma_scale(summary: dict[str, Any], key: str = "pooled_zms_fov") -> float:
    """s = sqrt(pooled ZMS) from an evaluation's ``summary.json`` (``calibration[key]``)."""
    zms = float(summary.get("calibration", {}).get(key, math.nan))
    if not math.isfinite(zms) or zms <= 0:
        raise ValueError(f"summary.json has no finite {key} (no variance network, or an empty field of view).")
    return math.sqrt(zms)


def calibrate(
    config_file: Sequence[str] | str = DEFAULT_CONFIGS,
    out: str | None = None,
    eval_dir: str | None = None,
    **override: Any,
) -> str:
    """Evaluate on the validation split without a σ scale and write ``{"sigma_scale": s, "variance_scale": s², ...}``
    to ``out`` (default: ``variance_scale.json`` in the folder of ``variance_ckpt_path``). Other options are the
    config overrides of the evaluation (``--dataset_dir``, ``--ckpt_path``, ``--variance_ckpt_path``...).
    Returns the path written."""
    from monai.bundle import ConfigParser, run

    files = [config_file] if isinstance(config_file, str) else list(config_file)
    own = sorted(k for k in ("sigma_scale", "eval_split") if k in override)
    if own:
        raise ValueError(f"calibrate: --{', --'.join(own)} is set by the command (the validation split, no scale).")
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(override)
    if eval_dir is None:
        eval_dir = os.path.join(str(parser.get_parsed_content("output_dir")), "eval_validation")
    var_ckpt = str(parser.get_parsed_content("variance_ckpt_path"))
    out = out or os.path.join(os.path.dirname(os.path.abspath(var_ckpt)), SCALE_JSON)
    # "none", not None: monai.bundle.run drops None overrides, and the fit must see σ̂² without any scale
    run("evaluating", config_file=files, eval_split="validation", sigma_scale="none", eval_dir=eval_dir, **override)
    with open(os.path.join(eval_dir, "summary.json")) as f:
        summary = json.load(f)
    s = fit_sigma_scale(summary)
    cal = summary["calibration"]
    record = {
        "sigma_scale": s,
        "variance_scale": s * s,
        "fitted_on": "validation",
        "n_pairs": summary.get("n_cases"),
        "pooled_zms_fov": cal.get("pooled_zms_fov"),
        "pooled_zms": cal.get("pooled_zms"),
        "pooled_zms_ref_fov": cal.get("pooled_zms_ref_fov"),
        "variance_ckpt_path": var_ckpt,
        "config_file": files,
        "override": {k: str(v) for k, v in override.items()},
        "eval_dir": eval_dir,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(
        f"sigma scale s = {s:.4f} (s^2 = {s * s:.4f}, validation ZMS in the fov {cal.get('pooled_zms_fov'):.4f})"
        f" -> {out}"
    )
    return out


def qc_report(
    *eval_dirs: str, error: str = "epe", worst: float = 0.1, columns: str = "qc_", flip: bool = False
) -> None:
    """How well each ``qc_*`` column of the given evaluations' ``metrics.csv`` (pooled) ranks the per-pair
    ``error`` (``epe`` on the phantom; ``dice`` with ``--flip``: 1 − Dice; ``hd95``): Spearman(qc, error) and the
    AUROC of the qc for finding the worst ``worst`` share of the pairs (the ⌈worst·n⌉ largest errors; Mann-Whitney
    AUC, ties counted ½). Prints a Markdown table."""
    import csv

    import numpy as np
    import torch
    from monai.metrics import compute_roc_auc
    from scipy.stats import spearmanr

    rows: list[dict] = []
    for d in eval_dirs:
        path = d if d.endswith(".csv") else os.path.join(d, "metrics.csv")
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("status", "done") == "done"]
    err = np.array([float(r.get(error, "nan")) for r in rows])
    err = 1.0 - err if flip else err
    cols = [c for c in rows[0] if c.startswith(columns)] if rows else []
    out = []
    for c in cols:
        q = np.array([float(r.get(c, "nan")) for r in rows])
        ok = np.isfinite(q) & np.isfinite(err)
        qo, eo = q[ok], err[ok]
        k = max(1, math.ceil(worst * eo.size))
        bad = np.zeros(eo.size, bool)
        bad[np.argsort(-eo, kind="stable")[:k]] = True
        auc = compute_roc_auc(torch.as_tensor(qo), torch.as_tensor(bad.astype(float))) if eo.size > k else math.nan
        out.append({"qc": c, "n": int(eo.size), "spearman": float(spearmanr(qo, eo).statistic), "auroc": float(auc)})
    err_name = f"1 - {error}" if flip else error
    print(f"| column | n | Spearman with {err_name} | AUROC worst {worst:.0%} |\n|---|---|---|---|")
    for o in out:
        print(f"| {o['qc']} | {o['n']} | {o['spearman']:.3f} | {o['auroc']:.3f} |")
