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

__all__ = [
    "plot_sparsification",
    "plot_reliability",
    "plot_panel",
    "panel_figure",
    "label_dice",
    "draw_grid",
    "middle_slice",
]


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


def label_dice(warped_label: Any, fixed_label: Any, label: int | None = None) -> list[tuple[int, float | None, str]]:
    """Dice of the warped moving label against the fixed label over the whole volume (not only the shown slice):
    ``[(label, dice, note)]`` for ``label``, or for every foreground value (> 0) of either map when ``label`` is
    None. A label absent from one of the two maps has ``dice`` None and a note saying which map lacks it (e.g. the
    myocardium drawn at end-diastole only); absent from both, it is left out."""
    wl, fl = _np(warped_label), _np(fixed_label)
    if wl is None or fl is None:
        return []
    wl, fl = np.rint(wl).astype(np.int64), np.rint(fl).astype(np.int64)
    if wl.shape != fl.shape:
        return []
    values = [int(label)] if label is not None else sorted(int(v) for v in set(np.unique(wl)) | set(np.unique(fl)))
    out = []
    for v in values:
        if v <= 0:
            continue
        a, b = wl == v, fl == v
        na, nb = int(a.sum()), int(b.sum())
        if na == 0 and nb == 0:
            continue
        if na == 0 or nb == 0:
            out.append((v, None, "not in the moving label" if na == 0 else "not in the fixed label"))
            continue
        out.append((v, 2.0 * float((a & b).sum()) / (na + nb), ""))
    return out


def dice_text(dices: Sequence[tuple[int, float | None, str]], label: int | None = None) -> str:
    """One title line for :func:`label_dice`'s result: which labels, their Dice, and the ones without a Dice."""
    if not dices:
        return ""
    parts = [f"label {v}: {d:.3f}" if d is not None else f"label {v}: {note}, no Dice" for v, d, note in dices]
    which = f"label {label}" if label is not None else "every foreground label > 0"
    return f"Dice(warped moving label, fixed label) [{which}]: " + "; ".join(parts)


def _field_slice(x: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(in-plane (2, H, W) field of the shown slice, |z| (H, W) over all components of that slice)."""
    a = _np(x)
    if a is None:
        return None, None
    full = a[:, a.shape[1] // 2] if a.shape[0] == 3 else a
    return middle_slice(a, is_field=True), np.sqrt((full.astype(np.float64) ** 2).sum(0))


def _grid_step(width: int) -> int:
    """About 16-24 grid lines across the shown slice, on a round number of pixels."""
    raw = max(2, width // 20)
    for s in (2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100):
        if s >= raw:
            return s
    return raw


def panel_figure(
    case: Mapping[str, Any],
    title: str = "",
    label: int | None = 2,
    spacing: Sequence[float] | None = None,
    panel_in: float = 4.0,
    dpi: int = 110,
):
    """The figure of :func:`plot_panel` (open; the caller saves and closes it). 3 x 3 panels of ``panel_in`` inches:
    moving, fixed, warped (one shared [0, 1] grey bar); |residual|, σ̂², weight map (a colour bar each); label
    contours, |z| (px) and the deformation grid, whose title gives the grid spacing (px, and mm with ``spacing``)
    and max / mean |z|. With both labels, the title adds their Dice (:func:`label_dice`) for ``label`` (None: every
    foreground label), unless ``title`` already states a Dice (the evaluation's panels)."""
    mov, fix, war = (middle_slice(case.get(k)) for k in ("moving", "fixed", "warped"))
    lv, w = middle_slice(case.get("log_var")), middle_slice(case.get("weight"))
    wl, fl = middle_slice(case.get("warped_label")), middle_slice(case.get("fixed_label"))
    ddf, mag = _field_slice(case.get("ddf"))
    is3d = ddf is not None and _np(case.get("ddf")).shape[0] == 3
    if spacing is not None:
        spacing = [float(v) for v in spacing][-2:]  # the in-plane axes of the shown slice
    names = [
        ["moving $I_m$", "fixed $I_f$", r"warped $\hat I_f$"],
        [r"$|I_f-\hat I_f|$", r"$\hat\sigma^2$", "weight map (Eq. 4)"],
        ["contours over $I_f$\nred: warped moving, yellow: fixed", "|z| (px)", "deformation"],
    ]
    fig, axes = plt.subplots(3, 3, figsize=(3 * panel_in + 1.6, 3 * panel_in + 1.2), dpi=dpi, layout="constrained")
    for row, rnames in zip(axes, names):
        for ax, name in zip(row, rnames):
            ax.set_title(name, fontsize=10)
            ax.axis("off")

    def show(ax, img, cmap="gray", vmin=None, vmax=None, bar=True, unit=""):
        if img is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, fontsize=12)
            return None
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if bar:
            cb = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
            cb.ax.tick_params(labelsize=8)
            if unit:
                cb.set_label(unit, fontsize=8)
        return im

    grey = [show(axes[0, i], img, vmin=0, vmax=1, bar=False) for i, img in enumerate((mov, fix, war))]
    grey = next((g for g in grey if g is not None), None)
    if grey is not None:  # one bar for the three images (same [0, 1] scale)
        fig.colorbar(grey, ax=list(axes[0]), shrink=0.85, pad=0.01).ax.tick_params(labelsize=8)
    show(axes[1, 0], None if fix is None or war is None else np.abs(fix - war), cmap="magma")
    show(axes[1, 1], None if lv is None else np.exp(lv), cmap="viridis", unit="intensity$^2$")
    show(axes[1, 2], w, cmap="viridis")
    show(axes[2, 0], fix, vmin=0, vmax=1, bar=False)
    maps = [(np.rint(lab), color) for lab, color in ((fl, "yellow"), (wl, "red")) if lab is not None]
    if label is not None:
        values = [int(label)]
    else:
        values = sorted({int(v) for lab, _ in maps for v in np.unique(lab) if v > 0})
    styles = {v: ("solid", "dashed", "dotted", "dashdot")[i % 4] for i, v in enumerate(values)}
    if fix is not None:
        for lab, color in maps:
            for v in values:
                if (lab == v).any():
                    axes[2, 0].contour(
                        (lab == v).astype(float), levels=[0.5], colors=color, linewidths=1.0, linestyles=styles[v]
                    )
    if len(values) == 1:
        axes[2, 0].set_title(
            f"contours of label {values[0]} over $I_f$\nred: warped moving, yellow: fixed", fontsize=10
        )
    elif values:
        axes[2, 0].set_title(
            "contours over $I_f$: red warped moving, yellow fixed\n"
            + ", ".join(f"{st} label {v}" for v, st in styles.items()),
            fontsize=10,
        )
    show(axes[2, 1], mag, cmap="inferno", vmin=0, unit="px")
    if ddf is not None:
        ax = axes[2, 2]
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        step = _grid_step(ddf.shape[-1])
        draw_grid(ax, ddf, step=step)
        mm, zmm = "", ""
        if spacing is not None:
            sy, sx = (step * s for s in spacing)
            iso = np.isclose(spacing[0], spacing[1], rtol=1e-3)
            mm = f" = {sx:.3g} mm" if iso else f" = {sx:.3g} x {sy:.3g} mm (x, y)"
            zmm = f" ({mag.max() * spacing[0]:.3g} mm)" if iso and not is3d else ""
        ax.set_title(
            f"deformation $\\phi(x)=x+z(x)$\ngrid lines every {step} px{mm}\n"
            f"|z|{' (slice)' if is3d else ''}: max {mag.max():.2f} px{zmm}, mean {mag.mean():.2f} px",
            fontsize=10,
        )
    else:
        show(axes[2, 2], None)
    lines = [title] if title else []
    if "dice" not in title.lower():
        dt = dice_text(label_dice(case.get("warped_label"), case.get("fixed_label"), label), label)
        if dt:
            lines.append(dt + (" (whole volume)" if is3d else ""))
    if lines:
        fig.suptitle("\n".join(lines), fontsize=11)
    return fig


def plot_panel(
    case: Mapping[str, Any],
    path: str | os.PathLike,
    title: str = "",
    label: int | None = 2,
    spacing: Sequence[float] | None = None,
) -> str:
    """The qualitative panel of one case (:func:`panel_figure`), saved as ``path``. ``case`` holds channel-first
    tensors or arrays of ONE case (keys of the engine output: moving, fixed, warped, ddf, log_var, weight,
    warped_label, fixed_label); missing entries are left blank. ``label``: the label whose contours and Dice are
    shown (None: every foreground label); ``spacing``: the pixel size in mm (grid spacing in mm)."""
    fig = panel_figure(case, title=title, label=label, spacing=spacing)
    fig.savefig(path)
    plt.close(fig)
    return str(path)
