"""``python -m bundle instance_bench``: what test-time instance optimisation buys, per number of Adam steps.

    python -m bundle instance_bench --weights models --datalist data/phantom_echo2d_v2 --split test --n 50 \\
        --steps 0 10 50 [--lr 1e-4] [--field 10,25,50 --field_lr 0.1 --grid 16 --field_lambda 0.02] \\
        [--md docs/results/instance_echo2d.md] [--json rows.json]

For each of the first ``n`` pairs of ``split`` and each step count (0 = the network alone), the pair is registered
with :func:`scripts.instance_optimisation.optimise_pair`, the networks, the loss (``sim_loss``, ``reg_loss``,
``lambda_reg``) and the warp being those of the training config (``configs/train.yaml`` plus ``--variants``), the
weights ``WEIGHTS/model.pt`` and ``WEIGHTS/variance.pt``. Reported per step count, as the evaluation computes them:
Dice and HD95 of the config's ``label`` (the myocardium; Sunnybrook's variant: the LV cavity) of the moving label
warped with nearest interpolation (the evaluator's default ``label_protocol``,
:meth:`scripts.evaluator.RegistrationEvaluator.warp_label`; :func:`scripts.metrics.myocardium_metrics`), end-point
error in the heart (``fixed_label > 0``) against the phantom's ground-truth DDF in pixels
(:func:`scripts.metrics.end_point_error`; NaN on real data without one), folding fraction
(:func:`scripts.metrics.jacobian_stats`), and the median wall and CPU time per pair. The step counts are
**interleaved pair by pair** (their order rotating from one pair to the next), so a load change on the shared machine
hits each alike. The paired difference to the network
alone (Δ Dice, Δ EPE, wins, paired t-test p) is given for every step count.

``--field`` adds field-level instance optimisation (:func:`scripts.instance_optimisation.optimise_field`) methods,
interleaved with the others: each entry is a step count (with ``--field_lr``, ``--grid``, ``--field_weight``,
``--field_lambda``, ``--field_every``) or a spec ``STEPS:key=value:...`` overriding them (keys ``lr``, ``grid``,
``weight``, ``lam``, ``every``), e.g. ``--field "25,25:lr=0.2:grid=16,25:weight=snr:every=5"``. The rows are named
``w<steps>`` (weights; ``net`` for 0) and ``f<spec>``. ``--classical convexadam,elastix_bspline`` adds classical
methods (:func:`scripts.classical.register_pair_timed`, their defaults, one thread) evaluated the same way.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

LOAD_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf")


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v for v in value.replace("[", " ").replace("]", " ").replace(",", " ").split() if v]
    return [value]


def _parts(configs: Sequence[str], device: torch.device) -> dict:
    """Networks (not loaded yet), loss parts and warp of the training config (plus variants merged after it)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["device"] = f"$torch.device('{device}')"
    get = lambda k: parser.get_parsed_content(k, instantiate=True, lazy=False)  # noqa: E731
    return {
        "network": get("network_def"),
        "variance": get("variance_def"),
        "sim_loss": get("sim_loss"),
        "reg_loss": get("reg_loss"),
        "lambda_reg": float(get("lambda_reg")),
        "warp": get("warp"),
        "spatial_size": list(get("spatial_size")),
        "mode": get("mode"),
        "label": int(get("label")) if "label" in parser else 2,
    }


def _loss_parts(parts: dict) -> dict:
    """The keyword arguments of :func:`scripts.instance_optimisation.optimise_pair` that come from the config."""
    return {k: parts[k] for k in ("warp", "sim_loss", "reg_loss", "lambda_reg")}


def _load_pairs(datalist: str, split: str, n: int, spatial_size: Sequence[int]) -> list[dict]:
    from scripts.data import load_datalist, paired_transforms

    items = load_datalist(datalist, split)
    if n is not None and int(n) > 0:
        items = items[: int(n)]
    keys = [k for k in LOAD_KEYS if all(k in it for it in items)]
    if "fixed_label" not in keys or "moving_label" not in keys:
        raise ValueError(
            f"{datalist} ({split}): instance_bench needs labels for every pair (and a ground-truth 'ddf' for the EPE: "
            f"a phantom datalist); found the keys {keys}."
        )
    if "ddf" not in keys:
        logger.info("%s (%s): no ground-truth DDF (real data): the EPE column is NaN", datalist, split)
    xform = paired_transforms(spatial_size, keys=keys)
    pairs = []
    for it in items:
        d = xform({k: it[k] for k in keys})
        d = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)).float()[None] for k, v in d.items()}
        d["id"] = it.get("id", Path(it["moving"]).parent.name)
        pairs.append(d)
    return pairs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "nan"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


def instance_bench(*more_steps, **kwargs) -> None:
    """Command line: ``python -m bundle instance_bench --weights models --datalist DIR --split test --n 50 --steps 0 10
    50 [--lr 1e-4] [--md FILE]``; see :func:`measure` for the arguments."""
    measure(*more_steps, **kwargs)


def measure(
    *more_steps,
    weights: str = "models",
    datalist: str = "data/phantom_echo2d_v2",
    split: str = "test",
    n: int = 50,
    steps=(0, 10, 50),
    lr: float = 1e-4,
    field=(),
    field_lr: float = 0.1,
    grid: int = 16,
    field_weight: str = "mse",
    field_lambda: float | None = 0.02,
    field_every: int = 0,
    classical=(),
    weight_every: int = 1,
    seed: int = 0,
    configs=("configs/train.yaml",),
    variants=(),
    device: str | None = None,
    threads: int | None = None,
    md: str | None = None,
    json: str | None = None,
    progress: bool = True,
) -> dict:
    """Dice / HD95 / EPE / folding / time per pair at each number of instance-optimisation steps.

    Args:
        weights: folder with ``model.pt`` and ``variance.pt`` (as saved by training), e.g. ``models/mri2d``.
        datalist: a phantom data set folder (or its datalist JSON).
        split: the split to use (``validation`` to choose ``lr``, ``test`` to report).
        n: the first ``n`` pairs of the split (0: all).
        steps: step counts: ``--steps 0 10 50`` (the counts after the first arrive as ``more_steps``) or
            ``--steps "[0,10,50]"``.
        lr, weight_every, seed: of :func:`scripts.instance_optimisation.optimise_pair`.
        field: field-IO methods (step counts or ``STEPS:key=value`` specs, see the module docstring); ``field_lr``,
            ``grid``, ``field_weight``, ``field_lambda`` (``None``: the config's ``lambda_reg``), ``field_every``:
            their defaults, those of configs/inference.yaml (:func:`scripts.instance_optimisation.optimise_field`).
        classical: classical methods of :mod:`scripts.classical` (e.g. ``convexadam``), run on CPU, one thread.
        configs: the training config(s) the networks and the loss come from; ``variants``: merged after them.
        device: "cpu" or "cuda" (default: cuda when available). threads: torch CPU threads.
        md: write the table as Markdown to this file. json: write the per-pair rows of every method as JSON.

    Returns the report (per step count: the summaries, the paired differences and the per-pair rows).
    """
    from monai.utils import str2bool

    from scripts.checkpoint import load_weights
    from scripts.evaluator import RegistrationEvaluator
    from scripts.instance_optimisation import optimise_field, optimise_pair
    from scripts.metrics import end_point_error, jacobian_stats, myocardium_metrics

    given = _as_list(steps) + list(more_steps)
    try:
        steps = [int(s) for s in given]
    except (TypeError, ValueError):
        steps = []
    if not steps or any(s < 0 for s in steps) or any(float(s) != int(float(s)) for s in given):
        raise ValueError(f"--steps must be integers >= 0 (e.g. --steps 0 10 50), got {given}.")
    if len(set(steps)) != len(steps):
        raise ValueError(f"--steps has repeated values: {steps}.")
    defaults = dict(lr=float(field_lr), grid=int(grid), weight=str(field_weight), every=int(field_every))
    if field_lambda is not None:
        defaults["lam"] = float(field_lambda)
    methods = {("net" if s == 0 else f"w{s}"): dict(kind="weights", steps=s) for s in steps}
    methods.update({f"f{spec}": dict(kind="field", **_field_spec(spec, defaults)) for spec in _as_list(field)})
    methods.update({str(c): dict(kind="classical") for c in _as_list(classical)})
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = _as_list(configs) + _as_list(variants)
    parts = _parts(cfg, dev)
    wdir = Path(weights)
    network = load_weights(parts["network"], wdir / "model.pt", "network", map_location=dev).to(dev).eval()
    variance = None
    if parts["variance"] is not None and parts["mode"] != "vanilla":
        variance = load_weights(parts["variance"], wdir / "variance.pt", "variance", map_location=dev).to(dev).eval()
    for p in list(network.parameters()) + (list(variance.parameters()) if variance is not None else []):
        p.requires_grad_(False)
    label_warp = RegistrationEvaluator(dev, [], network).warp_label  # the evaluation's default: nearest, border
    pairs = _load_pairs(datalist, split, n, parts["spatial_size"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    load0 = os.getloadavg()
    logger.info(
        "instance_bench: %d pairs of %s (%s), steps %s, lr %g, %s", len(pairs), datalist, split, steps, lr, name
    )
    rows = {m: [] for m in methods}
    info = dict(datalist=datalist, split=split, n_planned=len(pairs), lr=lr, weights=str(weights), device=name)
    info.update(configs=cfg, weight_every=weight_every, field_defaults=defaults)
    it = pairs
    if str2bool(progress) if isinstance(progress, str) else bool(progress):
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc="instance_bench", unit="pair")
    for i, pr in enumerate(it):
        moving, fixed = pr["moving"].to(dev), pr["fixed"].to(dev)
        names = list(methods)
        k = i % len(names)
        for s in names[k:] + names[:k]:  # interleaved: the order rotates from pair to pair
            m = methods[s]
            _sync(dev)
            w0, c0 = time.perf_counter(), time.process_time()
            if m["kind"] == "classical":
                ddf = _classical(s, moving, fixed)
            elif m["kind"] == "field":
                loss = dict(_loss_parts(parts), lambda_reg=m.get("lam", parts["lambda_reg"]))
                ddf = optimise_field(
                    network,
                    variance,
                    moving,
                    fixed,
                    steps=m["steps"],
                    lr=m["lr"],
                    grid=m["grid"],
                    instance_weight=m["weight"],
                    weight_every=m["every"],
                    progress=False,
                    **loss,
                )
            else:
                ddf = optimise_pair(
                    network,
                    variance,
                    moving,
                    fixed,
                    steps=m["steps"],
                    lr=lr,
                    weight_every=int(weight_every),
                    seed=seed,
                    **_loss_parts(parts),
                )
            _sync(dev)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            ddf = ddf.float()
            with torch.no_grad():
                warped_label = label_warp(pr["moving_label"].to(dev), ddf)
            myo = myocardium_metrics(warped_label[0].cpu(), pr["fixed_label"][0], label=parts["label"])
            heart = pr["fixed_label"] > 0
            gt = pr.get("ddf")
            rows[s].append(
                {
                    "id": pr["id"],
                    "dice": myo["dice"],
                    "hd95": myo["hd95"],
                    "epe_heart": math.nan if gt is None else float(end_point_error(ddf.cpu(), gt, mask=heart)[0]),
                    "fold_frac": float(jacobian_stats(ddf.cpu())["fold_frac"][0]),
                    "wall_ms": 1000 * wall,
                    "cpu_ms": 1000 * cpu,
                }
            )
        if md and i + 1 < len(pairs):  # a partial table after every pair: a stopped run still leaves its figures
            _write(md, _summary(rows, list(methods), info, load0, i + 1))
    report = _summary(rows, list(methods), info, load0, len(pairs))
    text = _markdown(report)
    print(text)
    if md:
        _write(md, report)
    if json:
        import json as _json

        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(_json.dumps({"info": info, "rows": rows}, indent=1), encoding="utf-8")
    return report


def _classical(method: str, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The DDF (1, ndim, *spatial) of a classical method (its defaults, one thread) on one pair."""
    from scripts.classical import register_pair

    ddf, _ = register_pair(moving[0, 0].cpu().numpy(), fixed[0, 0].cpu().numpy(), method=method, num_threads=1)
    return torch.as_tensor(ddf)[None].to(moving.device)


def _field_spec(spec, defaults: dict) -> dict:
    """``STEPS[:key=value...]`` -> the field method's settings (``defaults`` for the keys not given)."""
    head, *kvs = str(spec).split(":")
    out = dict(defaults, steps=int(head))
    cast = dict(lr=float, grid=int, weight=str, lam=float, every=int)
    for kv in kvs:
        key, _, value = kv.partition("=")
        if key not in cast:
            raise ValueError(f"--field {spec!r}: unknown key {key!r} (known: {sorted(cast)}).")
        out[key] = cast[key](value)
    return out


def _write(md: str, report: dict) -> None:
    Path(md).parent.mkdir(parents=True, exist_ok=True)
    Path(md).write_text(_markdown(report) + "\n", encoding="utf-8")


def _summary(rows: dict, steps: Sequence[int], info: dict, load0, done: int) -> dict:
    rows = {s: r[:done] for s, r in rows.items()}
    rep = _report(rows, steps, dict(info, n=done))
    rep.update(load_before=load0[:3], load_after=os.getloadavg()[:3])
    return rep


def _ttest(a: Sequence[float], b: Sequence[float]) -> float:
    """Paired t-test p-value (scipy.stats.ttest_rel) over the finite pairs; nan when undefined."""
    from scipy.stats import ttest_rel

    ok = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(ok) < 2 or all(x == y for x, y in ok):
        return float("nan")
    return float(ttest_rel([x for x, _ in ok], [y for _, y in ok]).pvalue)


def _report(rows: dict, steps: Sequence, info: dict) -> dict:
    base = rows["net"] if "net" in rows else rows[steps[0]]
    out = dict(info, steps={})
    for s in steps:
        r = rows[s]
        col = lambda k: [x[k] for x in r]  # noqa: E731
        d_dice = [a["dice"] - b["dice"] for a, b in zip(r, base)]
        d_epe = [a["epe_heart"] - b["epe_heart"] for a, b in zip(r, base)]
        out["steps"][s] = {
            "dice": _fmt(col("dice")),
            "hd95": _fmt(col("hd95"), 2),
            "epe_heart": _fmt(col("epe_heart")),
            "fold_pct": f"{100 * np.mean(col('fold_frac')):.3f}",
            "wall_ms": statistics.median(col("wall_ms")),
            "cpu_ms": statistics.median(col("cpu_ms")),
            "d_dice": float(np.nanmean(d_dice)),
            "dice_wins": int(sum(x > 0 for x in d_dice)),
            "d_epe": float(np.nanmean(d_epe)),
            "epe_wins": int(sum(x < 0 for x in d_epe)),
            "p_dice": _ttest(col("dice"), [x["dice"] for x in base]),
            "p_epe": _ttest(col("epe_heart"), [x["epe_heart"] for x in base]),
            "rows": r,
        }
    return out


def _markdown(rep: dict) -> str:
    n = rep["n"]
    partial = f" (PARTIAL: {n} of {rep['n_planned']} pairs done)" if n < rep["n_planned"] else ""
    lines = [
        f"Instance optimisation{partial} on {n} pairs of `{rep['datalist']}` ({rep['split']}), "
        f"weights `{rep['weights']}`, weight-IO (w<steps>) lr {rep['lr']:g}, weight refreshed every "
        f"{rep['weight_every']} step(s); field-IO (f<spec>) defaults {rep.get('field_defaults')}; "
        f"{rep['device']}; load average "
        f"{rep['load_before'][0]:.2f} before, {rep['load_after'][0]:.2f} after.",
        "",
        "| method | Dice | HD95 (px) | EPE heart (px) | folding % | ms/pair wall (median) | ms/pair CPU (median) "
        "| Δ Dice vs net | Dice wins | p Dice | Δ EPE vs net | EPE wins | p EPE |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, v in rep["steps"].items():
        lines.append(
            f"| {s} | {v['dice']} | {v['hd95']} | {v['epe_heart']} | {v['fold_pct']} | {v['wall_ms']:.0f} | "
            f"{v['cpu_ms']:.0f} | {v['d_dice']:+.4f} | {v['dice_wins']}/{n} | {v['p_dice']:.2g} | "
            f"{v['d_epe']:+.4f} | {v['epe_wins']}/{n} | {v['p_epe']:.2g} |"
        )
    if not str(rep["device"]).startswith("CPU"):  # on a GPU: the throughput (pairs one at a time)
        rates = ", ".join(f"{s} {1000 / max(v['wall_ms'], 1e-9):.1f}" for s, v in rep["steps"].items())
        lines += ["", f"pairs/s (1 / median wall time, one pair at a time): {rates}"]
    return "\n".join(lines)
