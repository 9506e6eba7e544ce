"""Calibration of σ̂ on the real echo cine against residuals h_φ did not see (docs/uncertainty.md, "Calibration and
the quality score: evidence"; issue 24).

    python docs/results/real_echo_calibration.py --datalist data/echo_cine \
        --method "ours=models/model.pt,models/variance.pt,,models/variance_scale.json" \
        --method "lowpass=models/lowpass/model.pt,models/lowpass/variance.pt,lowpass,models/lowpass/variance_scale.json"

For each test pair ED_4 → f of the datalist (the last beat, 14 pairs) σ̂² is predicted from that pair; the residuals it
is judged against are those of the same cardiac phase in the other beats (the EDs of beats 1–3) registered to the same
fixed frame f by the same network, r_k = I_f − Î_f(ED_k): h_φ never saw them, and they carry the registration error of
another beat as well as the noise. Measures (scripts.metrics.sigma_calibration, sector pixels, per unseen residual,
then the mean over the 3 residuals and the 14 pairs): ZMS = mean r²/σ̂², PICP90/95 = share of |r| ≤ 1.645 / 1.960 σ̂,
MPIW90 = mean 2·1.645 σ̂; "before": σ̂ as the network gives it, "after": σ̂ × s with the phantom validation scale s
(variance_scale.json). The row "seen" is the pair's own residual (the one h_φ was fed), for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_echo_study import _load, _t, networks, register, warp  # noqa: E402

def frame_path(f: int) -> str:
    return f"frames/frame_{f:03d}.nii.gz"


KEYS = ("zms", "zve", "nll", "picp90", "picp95", "mpiw90", "ence")


def calibrate(datalist_dir, methods):
    from scripts.metrics import sigma_calibration, sigma_scale_value

    d = Path(datalist_dir)
    dl = json.load(open(d / "datalist.json"))
    info = json.load(open(d / "preprocessing.json"))
    mask = torch.as_tensor(_load(d / "sector.nii.gz") > 0)[None, None]
    eds = [b[0] for b in info["beats"][:-1]]
    out = {}
    for name, (model_pt, variance_pt, lowpass, scale) in methods.items():
        net, var = networks(model_pt, variance_pt, lowpass)
        s = sigma_scale_value(scale) if scale else None
        acc = {k: {c: [] for c in KEYS} for k in ("seen", "unseen_before", "unseen_after")}
        for item in dl["test"]:
            mov, fix = _load(d / item["moving"]), _load(d / item["fixed"])
            ddf = register(net, mov, fix)
            wrp = warp(_t(mov), ddf)
            with torch.no_grad():
                lv = var(torch.cat([wrp, _t(fix)], 1)).double()
            unseen = []
            for f in eds:
                m2 = _load(d / frame_path(f))
                unseen.append(_t(fix) - warp(_t(m2), register(net, m2, fix)))
            u = torch.cat(unseen, 0).double()
            masks = mask.expand(len(eds), -1, -1, -1)
            for key, lvk, res, mk in (
                ("seen", lv, (_t(fix) - wrp).double(), mask),
                ("unseen_before", lv.expand_as(u), u, masks),
                ("unseen_after", lv.expand_as(u) + 2 * math.log(s or 1.0), u, masks),
            ):
                c = sigma_calibration(lvk, res, mask=mk)
                for k in KEYS:
                    acc[key][k].append(float(c[k].mean()))
        out[name] = {
            "sigma_scale": s,
            **{key: {k: float(np.mean(v)) for k, v in a.items()} for key, a in acc.items()},
        }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--method", action="append", required=True, help="name=model.pt,variance.pt[,lowpass][,scale]")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    methods = {}
    for m in a.method:
        name, spec = m.split("=", 1)
        parts = spec.split(",") + ["", ""]
        methods[name] = (parts[0], parts[1], parts[2] == "lowpass", parts[3] or None)
    torch.set_num_threads(1)
    res = calibrate(a.datalist, methods)
    print("| weights | residual | s | ZMS | ZVE | NLL | PICP90 | PICP95 | MPIW90 | ENCE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        for key in ("seen", "unseen_before", "unseen_after"):
            v = r[key]
            sc = f"{r['sigma_scale']:.3f}" if key == "unseen_after" and r["sigma_scale"] else "1"
            print(
                f"| {name} | {key} | {sc} | {v['zms']:.3f} | {v['zve']:.3f} | {v['nll']:.3f} | {v['picp90']:.3f} | "
                f"{v['picp95']:.3f} | {v['mpiw90']:.4f} | {v['ence']:.3f} |"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
