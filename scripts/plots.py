"""Figures of the evaluation (matplotlib, Agg backend): sparsification plots (paper Fig. 3, right) and the
qualitative panel of one case (paper Figs. 2-3: images, residual, sigma^2, weight map, contours, deformation grid).

3D volumes are shown by their middle slice along the first spatial axis (the in-plane displacement components are
the last two channels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_sparsification", "plot_reliability", "plot_panel", "draw_grid", "middle_slice"]


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def middle_slice(x: Any, is_field: bool = False) -> np.ndarray | None:
    """(C, *spatial) or spatial -> 2D image (C=1 squeezed) or (2, H, W) in-plane field for ``is_field``."""
    a = _np(x)
    if a is None:
        return None
    if is_field:
        nd = a.shape[0]
        if nd == 3:
            return a[1:, a.shape[1] // 2]
        return a
    if a.ndim >= 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        a = a[a.shape[0] // 2]
    return a


def plot_sparsification(
    fractions: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    oracle: Sequence[float] | Mapping[str, Sequence[float]] | None,
    path: str | os.PathLike,
    title: str = "Sparsification error",
    ylabel: str = "MSE of the remaining pixels",
) -> str:
    """Mean sparsification curves (one per method/uncertainty in ``curves``) with the oracle(s) dashed."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(fractions, c, "-", color=f"C{i}", label=name)
        o = oracle.get(name) if isinstance(oracle, Mapping) else (oracle if i == 0 else None)
        if o is not None:
            lab = f"{name} oracle" if isinstance(oracle, Mapping) else "oracle"
            ax.plot(fractions, o, "--", color=f"C{i}", label=lab)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8, wrap=True)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_reliability(
    diagram: Mapping[str, Any], path: str | os.PathLike, title: str = "Reliability of $\\hat\\sigma^2$"
) -> str:
    """Reliability diagram (log-log): per bin of predicted σ̂² (``diagram`` = ``ReliabilityDiagram.result()``), the
    observed mean squared residual (dots) and the mean residual_std² of the phantom (squares, when known) against
    the mean predicted σ̂²; the diagonal is perfect calibration. A bar chart below shows the pixel count per bin."""
    pred, obs, target = (np.asarray(diagram[k], dtype=float) for k in ("pred", "observed", "target"))
    count = np.asarray(diagram["count"], dtype=float)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.5, 4.8), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = (pred > 0) & (obs > 0)
    vals = np.concatenate([pred[pred > 0], obs[obs > 0], target[np.isfinite(target) & (target > 0)]])
    if vals.size:
        lo, hi = vals.min() / 2, vals.max() * 2
        ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="calibrated")
    ax.plot(pred[ok], obs[ok], "o-", color="C0", ms=4, label=r"observed $(I_f-\hat I_f)^2$")
    okt = np.isfinite(target) & (target > 0) & (pred > 0)
    if okt.any():
        ax.plot(pred[okt], target[okt], "s--", color="C1", ms=4, label="true residual_std$^2$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("mean per bin")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if pred.size:
        axc.bar(pred, count / max(count.sum(), 1.0), width=pred * 0.25, color="C2")
    axc.set_xscale("log")
    axc.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
    axc.set_xlabel(r"mean predicted $\hat\sigma^2$ of the bin")
    axc.set_ylabel("pixel share", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def draw_grid(ax, ddf2d: np.ndarray, step: int = 4, color: str = "C0", lw: float = 0.6) -> None:
    """Draw phi(x) = x + z(x) of a grid with lines every ``step`` pixels; ``ddf2d`` is (2, H, W) with channel 0
    along rows (y) and channel 1 along columns (x)."""
    H, W = ddf2d.shape[1:]
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    py, px = yy + ddf2d[0], xx + ddf2d[1]
    for i in range(0, H, step):
        ax.plot(px[i, :], py[i, :], color=color, lw=lw)
    for j in range(0, W, step):
        ax.plot(px[:, j], py[:, j], color=color, lw=lw)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")


def plot_panel(case: Mapping[str, Any], path: str | os.PathLike, title: str = "", label: int = 2) -> str:
    """One row of panels for a case: moving, fixed, warped, |residual|, sigma^2, weight map, warped (red) and fixed
    (yellow) myocardium contours over the fixed image, deformation grid. ``case`` holds channel-first tensors or
    arrays of ONE case (keys of the engine output: moving, fixed, warped, ddf, log_var, weight, warped_label,
    fixed_label); missing entries are left blank."""
    mov, fix, war = (middle_slice(case.get(k)) for k in ("moving", "fixed", "warped"))
    lv, w = middle_slice(case.get("log_var")), middle_slice(case.get("weight"))
    wl, fl = middle_slice(case.get("warped_label")), middle_slice(case.get("fixed_label"))
    ddf = middle_slice(case.get("ddf"), is_field=True)
    panels = [
        "moving $I_m$",
        "fixed $I_f$",
        r"warped $\hat I_f$",
        r"$|I_f-\hat I_f|$",
        r"$\hat\sigma^2$",
        "weight map",
        "contours (red: warped, yellow: GT)",
        "deformation",
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), dpi=110)
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=8)
        ax.axis("off")

    def show(ax, img, cmap="gray", vmin=None, vmax=None, bar=False):
        if img is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            return
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
        if bar:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)

    show(axes[0], mov, vmin=0, vmax=1)
    show(axes[1], fix, vmin=0, vmax=1)
    show(axes[2], war, vmin=0, vmax=1)
    show(axes[3], None if fix is None or war is None else np.abs(fix - war), cmap="magma", bar=True)
    show(axes[4], None if lv is None else np.exp(lv), cmap="viridis", bar=True)
    show(axes[5], w, cmap="viridis", bar=True)
    show(axes[6], fix, vmin=0, vmax=1)
    for lab, color in ((fl, "yellow"), (wl, "red")):
        if lab is not None and fix is not None and (np.round(lab) == label).any():
            axes[6].contour((np.round(lab) == label).astype(float), levels=[0.5], colors=color, linewidths=0.8)
    if ddf is not None:
        axes[7].axis("on")
        axes[7].set_xticks([])
        axes[7].set_yticks([])
        draw_grid(axes[7], ddf, step=max(2, ddf.shape[-1] // 24))
    else:
        show(axes[7], None)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
