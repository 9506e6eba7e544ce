"""Real echo study (docs/results/real_echo.md): the shipped echo2d weights, zero-shot and fine-tuned on the first
beats of pydicom-data's echo cine, measured without labels on the last beat.

    python docs/results/real_echo_study.py --datalist data/echo_cine --out docs/figures \
        --method "zero-shot ours=models/model.pt,models/variance.pt" \
        --method "fine-tuned ours=runs/echo_ft_ours/model.pt,runs/echo_ft_ours/variance.pt" \
        --method "zero-shot lowpass=models/lowpass/model.pt,models/lowpass/variance.pt,lowpass" ...

A method is ``name=model.pt,variance.pt[,lowpass]`` (``lowpass``: h_φ with input_smoothing 3, output_smoothing 2, as
configs/variants/loss/ours_lowpass_strong.yaml). Prints a markdown table and writes the figures and a JSON of every
number. Everything is inside the sector (``sector.nii.gz`` of the datalist):

- ``mse``: mean (I_f − Î_f)²; ``ncc``: Pearson correlation of I_f and Î_f; identity: Î_f = I_m.
- ``fold %``: Jacobian determinant ≤ 0.
- ``ic px``: inverse consistency, register A→B and B→A, |z_AB(x) + z_BA(x + z_AB(x))| (px of the 128 grid).
- ``σ̂²/r²(seen)``: mean σ̂² / mean squared residual of the pair h_φ was fed (it sees that residual).
- ``σ̂²/r²(unseen)``: the same σ̂² against residuals h_φ did not see: ED of each training beat registered to the same
  fixed frame by the same network (mean of their squared residuals); ``ρ unseen``: Spearman of σ̂² and that mean,
  both Gaussian-smoothed (σ 2 px), pixels of the sector.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

CH = [16, 32, 32, 32, 32, 32, 32, 32]


def _load(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(), np.float32)


def networks(model_pt, variance_pt, lowpass):
    from scripts.networks import VarianceUNet, VoxelMorphDisplacement

    net = VoxelMorphDisplacement(
        spatial_dims=2, channels=CH, final_conv_channels=[16, 16], integration_steps=7, half_res=True
    )
    net.load_state_dict(torch.load(model_pt, map_location="cpu"))
    var = VarianceUNet(
        spatial_dims=2,
        channels=CH,
        final_conv_channels=[16, 16],
        input_smoothing=3.0 if lowpass else 0.0,
        output_smoothing=2.0 if lowpass else 0.0,
    )
    var.load_state_dict(torch.load(variance_pt, map_location="cpu"))
    return net.eval(), var.eval()


def _t(a):
    return torch.as_tensor(a, dtype=torch.float32)[None, None]


@torch.no_grad()
def register(net, mov, fix):
    from scripts.networks import network_forward

    if net is None:
        return torch.zeros(1, 2, *mov.shape)
    return network_forward(net, torch.cat([_t(mov), _t(fix)], 1))[0]


def warp(img, ddf):
    from monai.networks.blocks import Warp

    return Warp(mode="bilinear", padding_mode="border")(img, ddf)


def ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def fold_pct(ddf, mask):
    from scripts.metrics.deformation import jacobian_determinant

    j = jacobian_determinant(ddf)[0].numpy()
    return float(100.0 * (j[mask] <= 0).mean())


def inverse_consistency(ddf_ab, ddf_ba, mask):
    e = ddf_ab + warp(ddf_ba, ddf_ab)
    return float(e[0].norm(dim=0).numpy()[mask].mean())


def smooth(a, s=2.0):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, s)


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def study(datalist_dir, methods, out, figure_ids=()):
    from scripts.losses.heteroscedastic import snr_weight

    d = Path(datalist_dir)
    dl = json.load(open(d / "datalist.json"))
    info = json.load(open(d / "preprocessing.json"))
    mask = _load(d / "sector.nii.gz") > 0
    frames = {}

    def frame(rel):
        if rel not in frames:
            frames[rel] = _load(d / rel)
        return frames[rel]

    train_eds = [b[0] for b in info["beats"][:-1]]
    ed_path = {f: f"frames/frame_{f:03d}.nii.gz" for f in train_eds}
    rows, maps = {}, {}
    for name, (model_pt, variance_pt, lowpass) in [("identity", (None, None, False))] + list(methods.items()):
        net, var = networks(model_pt, variance_pt, lowpass) if model_pt else (None, None)
        per = []
        for item in dl["test"]:
            mov, fix = frame(item["moving"]), frame(item["fixed"])
            ddf = register(net, mov, fix)
            wrp = warp(_t(mov), ddf)[0, 0].numpy()
            r2 = (fix - wrp) ** 2
            row = {"id": item["id"], "mse": float(r2[mask].mean()), "ncc": ncc(fix[mask], wrp[mask])}
            if net is not None:
                row["fold"] = fold_pct(ddf, mask)
                row["ic"] = inverse_consistency(ddf, register(net, fix, mov), mask)
                with torch.no_grad():
                    lv = var(torch.cat([_t(wrp), _t(fix)], 1))
                s2 = lv.exp()[0, 0].numpy()
                w = snr_weight(_t(fix), lv)[0, 0].numpy()
                unseen = []
                for f in train_eds:  # the same phase (ED) of each training beat, registered to the same fixed frame
                    m2 = frame(ed_path[f])
                    unseen.append(((fix - warp(_t(m2), register(net, m2, fix))[0, 0].numpy()) ** 2))
                u2 = np.mean(unseen, 0)
                row.update(
                    s2=float(s2[mask].mean()),
                    ratio_seen=float(s2[mask].mean() / r2[mask].mean()),
                    ratio_unseen=float(s2[mask].mean() / u2[mask].mean()),
                    rho_seen=spearman(smooth(s2)[mask], smooth(r2)[mask]),
                    rho_unseen=spearman(smooth(s2)[mask], smooth(u2)[mask]),
                    rho_unseen_raw=spearman(s2[mask], u2[mask]),
                    # references: the residual h_φ was fed, and the fixed frame's brightness, as predictors of u2
                    rho_r2_unseen=spearman(smooth(r2)[mask], smooth(u2)[mask]),
                    rho_fixed_unseen=spearman(smooth(fix)[mask], smooth(u2)[mask]),
                )
                # depth profile (thirds of the sector's depth): where σ̂² is high
                ys = np.nonzero(mask.any(1))[0]
                edges = np.linspace(ys.min(), ys.max() + 1, 4).astype(int)
                band = np.zeros_like(mask, int)
                for k in range(3):
                    band[edges[k] : edges[k + 1]] = k
                row["depth_s2"] = [float(s2[mask & (band == k)].mean()) for k in range(3)]
                row["depth_u2"] = [float(u2[mask & (band == k)].mean()) for k in range(3)]
                if item["id"] in figure_ids or (not figure_ids and "ED_ES" in item["id"]):
                    maps.setdefault(item["id"], {})[name] = dict(
                        fix=fix, wrp=wrp, r=np.sqrt(r2), s2=s2, w=w, u2=u2, mov=mov
                    )
            per.append(row)
        rows[name] = per
    summary = {}
    for name, per in rows.items():
        keys = [k for k in per[0] if k not in ("id", "depth_s2", "depth_u2")]
        summary[name] = {k: float(np.mean([p[k] for p in per])) for k in keys}
        ed_es = [p for p in per if "ED_ES" in p["id"]][0]
        summary[name].update({f"ED_ES_{k}": ed_es[k] for k in keys})
        if "depth_s2" in per[0]:
            summary[name]["depth_s2"] = np.mean([p["depth_s2"] for p in per], 0).tolist()
            summary[name]["depth_u2"] = np.mean([p["depth_u2"] for p in per], 0).tolist()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for pid, by_method in maps.items():
        panel(pid, by_method, mask, out / f"real_echo_{pid.replace('echo_', '')}.png")
    return summary, rows


def panel(pid, by_method, mask, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_method)
    cols = ["moving (ED)", "fixed", "warped", "|residual|", "σ̂²", "Eq. 4 weight", "unseen r² (mean, 3 beats)"]
    fig, ax = plt.subplots(len(names), len(cols), figsize=(2.6 * len(cols), 2.7 * len(names)))
    ax = np.atleast_2d(ax)
    vmax_r = max(np.percentile(m["r"][mask], 99) for m in by_method.values())
    vmax_s = max(np.percentile(np.r_[m["s2"][mask], m["u2"][mask]], 99) for m in by_method.values())
    for i, n in enumerate(names):
        m = by_method[n]
        imgs = [m["mov"], m["fix"], m["wrp"], m["r"], m["s2"], m["w"], m["u2"]]
        kw = [dict(cmap="gray", vmin=0, vmax=1)] * 3 + [
            dict(cmap="magma", vmin=0, vmax=vmax_r),
            dict(cmap="magma", vmin=0, vmax=vmax_s),
            dict(cmap="viridis", vmin=0.5, vmax=0.731),
            dict(cmap="magma", vmin=0, vmax=vmax_s),
        ]
        for j, (im, k) in enumerate(zip(imgs, kw)):
            h = ax[i, j].imshow(np.where(mask, im, np.nan) if j >= 3 else im, **k)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if i == 0:
                ax[i, j].set_title(cols[j], fontsize=9)
            if i == len(names) - 1 and j >= 3:
                fig.colorbar(h, ax=ax[:, j], shrink=0.6, fraction=0.05)
        ax[i, 0].set_ylabel(n, fontsize=9)
    fig.suptitle(f"{pid}: rows = weights; σ̂² and the unseen r² on one scale", fontsize=10)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--datalist", required=True)
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--method", action="append", default=[])
    p.add_argument("--figure_ids", default="")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    methods = {}
    for m in a.method:
        name, spec = m.split("=", 1)
        parts = spec.split(",")
        methods[name] = (parts[0], parts[1], len(parts) > 2 and parts[2] == "lowpass")
    ids = [i for i in a.figure_ids.split(",") if i]
    summary, rows = study(a.datalist, methods, a.out, ids)
    hdr = (
        "| weights | MSE | NCC | fold % | IC px | mean σ̂² | σ̂²/r² seen | σ̂²/r² unseen | ρ seen | ρ unseen "
        "| ρ(r², unseen) | ρ(I_f, unseen) |"
    )
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    for n, s in summary.items():
        f = lambda k, fmt: (fmt % s[k]) if k in s else ""  # noqa: E731
        print(
            f"| {n} | {f('mse', '%.5f')} | {f('ncc', '%.3f')} | {f('fold', '%.2f')} | {f('ic', '%.3f')} | "
            f"{f('s2', '%.5f')} | {f('ratio_seen', '%.2f')} | {f('ratio_unseen', '%.2f')} | {f('rho_seen', '%.2f')} | "
            f"{f('rho_unseen', '%.2f')} | {f('rho_r2_unseen', '%.2f')} | {f('rho_fixed_unseen', '%.2f')} |"
        )
    print()
    print("| weights (ED→ES pair) | MSE | NCC | fold % | IC px | σ̂²/r² unseen | ρ unseen |")
    print("|---|---|---|---|---|---|---|")
    for n, s in summary.items():
        f = lambda k, fmt: (fmt % s[k]) if k in s else ""  # noqa: E731
        print(
            f"| {n} | {f('ED_ES_mse', '%.5f')} | {f('ED_ES_ncc', '%.3f')} | {f('ED_ES_fold', '%.2f')} | "
            f"{f('ED_ES_ic', '%.3f')} | {f('ED_ES_ratio_unseen', '%.2f')} | {f('ED_ES_rho_unseen', '%.2f')} |"
        )
    print()
    print("depth thirds (near, mid, far): mean σ̂² | mean unseen r²")
    for n, s in summary.items():
        if "depth_s2" in s:
            print(
                f"  {n}: "
                + ", ".join("%.4f" % v for v in s["depth_s2"])
                + " | "
                + ", ".join("%.4f" % v for v in s["depth_u2"])
            )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"summary": summary, "pairs": rows}, fh, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()


def speckle_width(img, mask, highpass_px):
    """FWHM (px) of the normalised autocorrelation of the in-sector image, high-passed (minus its Gaussian local mean
    of σ ``highpass_px``, normalised in the sector: the anatomy removed, the texture kept), along rows (axial) and
    columns (lateral): the speckle size."""
    from scipy.ndimage import gaussian_filter

    m = mask.astype(np.float64)
    local = gaussian_filter(img * m, highpass_px) / np.maximum(gaussian_filter(m, highpass_px), 1e-6)
    a = np.where(mask, img - local, 0.0)
    f = np.fft.rfft2(a, s=(2 * a.shape[0], 2 * a.shape[1]))
    ac = np.fft.irfft2(np.abs(f) ** 2)[: a.shape[0], : a.shape[1]]
    ac /= ac[0, 0]
    out = []
    for prof in (ac[:, 0], ac[0, :]):
        k = int(np.argmax(prof < 0.5))
        out.append(2 * (k - 1 + (prof[k - 1] - 0.5) / (prof[k - 1] - prof[k])))  # interpolated half width x 2
    return out


def appearance(images, masks, pixel_mm, highpass_mm=4.0):
    """Intensity percentiles in the sector and the speckle FWHM (axial, lateral) in mm, averaged over ``images``
    (``pixel_mm``: (row, column) pixel size)."""
    vals = np.concatenate([i[m] for i, m in zip(images, masks)])
    hp = highpass_mm / float(np.mean(pixel_mm))
    w = np.mean([speckle_width(i, m, hp) for i, m in zip(images, masks)], 0) * np.asarray(pixel_mm)
    return {
        "p10_50_90": np.percentile(vals, [10, 50, 90]).round(3).tolist(),
        "frac_below_0.1": float((vals < 0.1).mean()),
        "speckle_fwhm_mm": w.round(2).tolist(),
    }
