"""``python -m bundle curves RUN_DIR [RUN_DIR ...] [--labels a b] [--plot out.png] [--md out.md]``

Learning curves of training runs, read from the TensorBoard event files that training writes under ``<run>/logs``
(configs/train.yaml): the validation metrics of every epoch (``val_myo_dice``, ``val_epe_heart``, ``val_var_ratio``,
``val_spearman_std``, ...), the training losses (every ``tensorboard_every`` iterations) and the learning rates
(``<optimizer>/lr/group_<i>`` at every epoch start, :class:`scripts.tracking.LearningRateLogger`).

The x axis is the training iteration: a validation logged at epoch ``e`` is at iteration ``e × epoch_length`` (the
end of the epoch), a learning rate logged at epoch ``e`` at ``(e − 1) × epoch_length`` (its start). The epoch length
is the one the trainer ran with: the ``trainer`` state of the run's latest checkpoint, else ``epoch_length`` of a
saved config (``<run>/config*.json|yaml``), else the events: the last training-loss step logged before the
validation of epoch ``e`` lies in ``(e·L − tensorboard_every, e·L]``, so ``L = ceil(step / e)`` at the latest
validation (exact once ``e > tensorboard_every``). Without any of these the x axis is the epoch.

The Markdown has one table per validation metric (rows: the iterations of the validations, columns: the runs) with a
plateau line per run: the first validation after which the metric stays within a relative tolerance of its final
value, ``|v_j − v_final| ≤ tol · |v_final|`` for every later validation ``j`` (``--tol_dice`` 1 %, ``--tol_epe``
5 %, ``--tol`` for the others); then the training losses (mean over each epoch's logged iterations) and the learning
rates at the same iterations. The plot has one panel per metric, loss and learning rate (matplotlib, Agg).

Example (two finished trainings)::

    python -m bundle curves runs/curves/lr1e-3/phantom_echo/voxelmorph/mse/seed0 \\
        runs/curves/lr1e-3/phantom_echo/voxelmorph/ours/seed0 --labels mse ours --plot curves.png --md curves.md
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

VAL_PREFIX = "val_"
LR_MARK = "/lr/"
# the order of the tables and panels (other validation metrics follow, sorted)
VAL_ORDER = ("val_myo_dice", "val_epe_heart", "val_var_ratio", "val_var_ratio_std", "val_spearman_std", "val_ause")


def kind(tag: str) -> str:
    """``'val'`` (epoch end), ``'lr'`` (epoch start) or ``'train'`` (step = iteration) for an event tag."""
    if tag.startswith(VAL_PREFIX):
        return "val"
    return "lr" if LR_MARK in tag else "train"


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float, float]]]:
    """``{tag: [(step, wall_time, value)]}`` of every scalar in the event files of ``log_dir``, sorted by step; a
    step logged twice (a resumed run) keeps its later value."""
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event file (events.out.tfevents.*).")
    from tensorboard.backend.event_processing import event_accumulator as ea

    merged: dict[str, list] = {}
    for f in files:
        acc = ea.EventAccumulator(str(f), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    out = {}
    for tag, events in merged.items():
        last = {step: (step, wall, value) for step, wall, value in sorted(events)}
        out[tag] = [last[s] for s in sorted(last)]
    return out


def _checkpoint_epoch_length(run_dir: Path) -> tuple[int, str] | None:
    ckpt = run_dir / "checkpoints"
    epochs = sorted(ckpt.glob("checkpoint_epoch=*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for p in [ckpt / "checkpoint_final.pt"] + epochs[::-1]:
        if not p.is_file():
            continue
        try:
            import torch

            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("trainer", {})
            return int(state["epoch_length"]), str(p.relative_to(run_dir))
        except Exception:  # noqa: BLE001 (an unreadable checkpoint: the next source)
            continue
    return None


def _config_epoch_length(run_dir: Path) -> tuple[int, str] | None:
    for p in sorted(run_dir.glob("config*.json")) + sorted(run_dir.glob("config*.y*ml")):
        try:
            if p.suffix == ".json":
                cfg = json.loads(p.read_text())
            else:
                import yaml

                cfg = yaml.safe_load(p.read_text())
            value = cfg.get("epoch_length") if isinstance(cfg, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, p.name
        except Exception:  # noqa: BLE001 (not a config: the next source)
            continue
    return None


def _events_epoch_length(scalars: dict) -> tuple[int, str] | None:
    train = sorted((w, s) for t, ev in scalars.items() if kind(t) == "train" for s, w, _ in ev)
    vals = sorted((s, w) for t, ev in scalars.items() if kind(t) == "val" for s, w, _ in ev)
    for epoch, wall in sorted(set(vals), reverse=True):  # the latest validation with a training step before it
        before = [s for w, s in train if w <= wall]
        if before and epoch > 0:
            return math.ceil(max(before) / epoch), f"events (last training step before the validation of epoch {epoch})"
    return None


def epoch_length(run_dir: str | os.PathLike, scalars: dict | None = None) -> tuple[int | None, str]:
    """``(epoch length, where it was read)`` of a run (see the module docstring); ``(None, reason)`` if unknown."""
    run_dir = Path(run_dir)
    found = _checkpoint_epoch_length(run_dir) or _config_epoch_length(run_dir)
    if found is None and scalars is not None:
        found = _events_epoch_length(scalars)
    return found if found is not None else (None, "unknown: x axis in epochs")


def _log_dir(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder.")
    return run_dir / "logs" if (run_dir / "logs").is_dir() else run_dir


def default_label(run_dir: str | os.PathLike) -> str:
    """``<loss>/seed<k>`` for an experiment run folder, else the folder name."""
    p = Path(run_dir).resolve()
    return f"{p.parent.name}/{p.name}" if p.name.startswith("seed") else p.name


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> dict:
    """A run's curves: ``{"label", "dir", "epoch_length", "source", "unit", "series": {tag: [(x, value)]}}`` with x
    the iteration (or the epoch when the epoch length is unknown)."""
    run_dir = Path(run_dir)
    scalars = read_scalars(_log_dir(run_dir))
    length, source = epoch_length(run_dir, scalars)
    series = {}
    for tag, events in scalars.items():
        k = kind(tag)
        if length is None:
            pts = [(s, v) for s, _, v in events] if k != "train" else []
        elif k == "val":
            pts = [(s * length, v) for s, _, v in events]
        elif k == "lr":
            pts = [((s - 1) * length, v) for s, _, v in events]
        else:
            pts = [(s, v) for s, _, v in events]
        if pts:
            series[tag] = pts
    return {
        "label": label or default_label(run_dir),
        "dir": str(run_dir),
        "epoch_length": length,
        "source": source,
        "unit": "iteration" if length is not None else "epoch",
        "series": series,
    }


def tolerance(tag: str, tol_dice: float = 0.01, tol_epe: float = 0.05, tol: float = 0.05) -> float:
    return tol_dice if "dice" in tag else tol_epe if "epe" in tag else tol


def plateau(points: Sequence[tuple[float, float]], rel_tol: float) -> dict | None:
    """The first point after which every value stays within ``rel_tol × |final|`` of the final value.

    Returns ``{"x", "index", "n", "final"}`` over the finite points (``index`` 0-based; ``index == n - 1``: only the
    final point, no plateau yet), ``None`` without a finite point."""
    pts = [(x, v) for x, v in points if math.isfinite(v)]
    if not pts:
        return None
    final = pts[-1][1]
    i = len(pts) - 1
    while i > 0 and abs(pts[i - 1][1] - final) <= rel_tol * abs(final):
        i -= 1
    return {"x": pts[i][0], "index": i, "n": len(pts), "final": final}


def _fmt(v: float) -> str:
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    a = abs(v)
    return f"{v:.3e}" if a != 0 and (a < 1e-2 or a >= 1e4) else f"{v:.4f}"


def _has_finite(runs: Sequence[dict], tag: str) -> bool:
    return any(math.isfinite(v) for r in runs for _, v in r["series"].get(tag, ()))


def tags(runs: Sequence[dict], metrics: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{"val", "train", "lr"}`` tags with a finite value in some run (``metrics`` restricts the validation ones)."""
    every = {t for r in runs for t in r["series"]}
    val = sorted(
        (t for t in every if kind(t) == "val"),
        key=lambda t: (t not in VAL_ORDER, VAL_ORDER.index(t) if t in VAL_ORDER else 0, t),
    )
    if metrics:
        missing = [m for m in metrics if m not in every]
        if missing:
            raise KeyError(f"metric(s) {missing} not in any run's events (validation tags: {val}).")
        val = [t for t in val if t in metrics]
    out = {
        "val": val,
        "train": sorted(t for t in every if kind(t) == "train"),
        "lr": sorted(t for t in every if kind(t) == "lr"),
    }
    return {k: [t for t in v if _has_finite(runs, t)] for k, v in out.items()}


def _epoch_means(points: Sequence[tuple[float, float]], ends: Sequence[float]) -> dict[float, float]:
    """Mean of the finite values in each ``(previous end, end]``."""
    out, prev = {}, -math.inf
    for end in ends:
        xs = [v for x, v in points if prev < x <= end and math.isfinite(v)]
        out[end] = sum(xs) / len(xs) if xs else math.nan
        prev = end
    return out


def _grid(runs: Sequence[dict], values: Sequence[dict], unit: str, title: str) -> list[str]:
    rows = sorted({x for v in values for x in v})
    lines = [title, "", f"| {unit} | " + " | ".join(r["label"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {x:,} | " + " | ".join(_fmt(v.get(x)) for v in values) + " |" for x in rows]
    return lines + [""]


def to_markdown(runs: Sequence[dict], metrics=None, tol_dice=0.01, tol_epe=0.05, tol=0.05) -> str:
    t = tags(runs, metrics)
    unit = runs[0]["unit"] if len({r["unit"] for r in runs}) == 1 else "iteration or epoch"
    lines = ["# Learning curves", ""]
    for r in runs:
        n_val = max((len(r["series"].get(m, ())) for m in t["val"]), default=0)
        lines.append(
            f"- {r['label']}: `{r['dir']}`, epoch length {r['epoch_length']} ({r['source']}), {n_val} validations"
        )
    lines.append("")
    for m in t["val"]:
        rel = tolerance(m, tol_dice, tol_epe, tol)
        lines += _grid(runs, [dict(r["series"].get(m, ())) for r in runs], unit, f"## {m}")
        lines.append(f"Plateau: the first validation after which {m} stays within {100 * rel:g} % of its final value:")
        lines.append("")
        for r in runs:
            p = plateau(r["series"].get(m, ()), rel)
            if p is None:
                lines.append(f"- {r['label']}: n/a (no finite value)")
            elif p["index"] == p["n"] - 1:
                lines.append(
                    f"- {r['label']}: no plateau yet (the validation before the last differs by more than "
                    f"{100 * rel:g} %; final {_fmt(p['final'])})"
                )
            else:
                at = f"validation {p['index'] + 1} of {p['n']}"
                lines.append(f"- {r['label']}: {unit} {p['x']:,} ({at}; final {_fmt(p['final'])})")
        lines.append("")
    ends = [sorted({x for m in t["val"] for x, _ in r["series"].get(m, ())}) for r in runs]
    for tag in t["train"]:
        values = [_epoch_means(r["series"].get(tag, ()), e) for r, e in zip(runs, ends)]
        lines += _grid(runs, values, unit, f"## {tag} (training, mean over the epoch ending at the row's {unit})")
    for tag in t["lr"]:
        lines += _grid(runs, [dict(r["series"].get(tag, ())) for r in runs], unit, f"## {tag} (at the epoch start)")
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], path: str | os.PathLike, metrics=None) -> str:
    """One panel per validation metric, training loss and learning rate; one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = tags(runs, metrics)
    panels = t["val"] + t["train"] + t["lr"]
    if not panels:
        raise ValueError("no finite scalar to plot in the runs' events.")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.3 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes.flat, panels):
        for i, r in enumerate(runs):
            pts = [(x, v) for x, v in r["series"].get(tag, ()) if math.isfinite(v)]
            if not pts:
                continue
            xs, vs = zip(*pts)
            c = colours[i % len(colours)]
            if kind(tag) == "train":
                w = max(1, len(vs) // 50)  # running mean over ~2 % of the run
                smooth = [
                    sum(vs[max(0, j - w + 1) : j + 1]) / len(vs[max(0, j - w + 1) : j + 1]) for j in range(len(vs))
                ]
                ax.plot(xs, vs, color=c, alpha=0.2, lw=0.5)
                ax.plot(xs, smooth, color=c, lw=1.2, label=r["label"])
            elif kind(tag) == "lr":  # each value holds for its epoch
                xs, vs = xs + (xs[-1] + (r["epoch_length"] or 1),), vs + (vs[-1],)
                ax.step(xs, vs, where="post", color=c, label=r["label"])
            else:
                ax.plot(xs, vs, "o-", ms=3, color=c, label=r["label"])
        if kind(tag) != "val" and all(v > 0 for r in runs for _, v in r["series"].get(tag, ()) if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_title(tag)
        ax.set_xlabel(runs[0]["unit"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _regroup_labels(runs: Sequence, labels, argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """python-fire binds ``--labels a b`` as ``labels='a'`` and appends ``b`` to the runs: take them back from argv."""
    runs = [str(r) for r in runs]
    if labels is None:
        return runs, None
    if isinstance(labels, (list, tuple)):
        return runs, [str(x) for x in labels]
    given = []
    if "--labels" in argv:
        for tok in list(argv)[list(argv).index("--labels") + 1 :]:
            if tok.startswith("--"):
                break
            given.append(tok)
    for extra in given[1:]:
        if extra in runs:
            runs.remove(extra)
    return runs, (given if len(given) > 1 else [s.strip() for s in str(labels).split(",")])


def curves(
    *runs: str,
    labels=None,
    plot: str | None = None,
    md: str | None = None,
    metrics=None,
    tol_dice: float = 0.01,
    tol_epe: float = 0.05,
    tol: float = 0.05,
) -> None:
    """Learning curves of training runs from their TensorBoard events: a Markdown table per validation metric with
    each run's plateau, the training losses and learning rates, and a plot.

    Args:
        runs: run folders (holding logs/events.out.tfevents.*), or the log folders themselves.
        labels: one name per run (default: <loss>/seed<k> of an experiment run folder, else the folder name).
        plot: write the figure (one panel per metric) to this PNG.
        md: also write the Markdown to this file.
        metrics: comma-separated validation tags to show (default: every one with a finite value).
        tol_dice, tol_epe, tol: relative tolerance of the plateau for Dice, EPE and the other metrics.
    """
    runs, labels = _regroup_labels(runs, labels, sys.argv)
    if not runs:
        raise ValueError("give at least one run folder.")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--labels: {len(labels)} label(s) {labels} for {len(runs)} run(s) {runs}.")
    if isinstance(metrics, str):
        metrics = [s.strip() for s in metrics.split(",") if s.strip()]
    loaded = [load_run(r, labels[i] if labels else None) for i, r in enumerate(runs)]
    text = to_markdown(loaded, metrics, float(tol_dice), float(tol_epe), float(tol))
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(text)
    if plot:
        plot_curves(loaded, plot, metrics)
        text += f"\nFigure: {plot}\n"
    print(text)
