"""``python -m bundle compare RUN_A RUN_B [...] [--metric dice] [--metrics dice,hd,asd] [--out table.md]``

Reads the per-case table of each evaluated run (``RUN/metrics.csv``, ``RUN/eval/metrics.csv`` or a CSV path; name a
run with ``name=path``; pool the folds of a cross-validation as one run with ``name=fold1+fold2+fold3``), keeps the
cases present in every run (matched by ``id``) and prints a Markdown table in the style of the paper's Tables 1-2:
mean ± std per metric and run, the best run in bold, the second best marked †, and a paired t-test
(``scipy.stats.ttest_rel``) of the best against the second best per metric, on the cases where both have a value
(``--reference NAME``: also each run against that one).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CSV_NAME = "metrics.csv"  # = scripts.handlers.CSV_NAME (not imported: keeps `compare` free of torch)
HIGHER_IS_BETTER = {
    "dice",
    "aurg",
    "aurg_norm",
    "spearman_noise",
    "spearman_noise_fov",
    "spearman_residual_std",
    "spearman_residual_std_fov",
}
PERCENT = {"dice"}  # shown ×100 like the paper's DSC (%)
DEFAULT_METRICS = ("dice", "hd", "hd95", "asd", "asd_rev", "assd", "epe_heart", "fold_frac", "ause")


def _base(metric: str) -> str:
    m = metric[len("identity_") :] if metric.startswith("identity_") else metric
    return m[:-3] if m.endswith("_mm") else m


def higher_is_better(metric: str) -> bool:
    return _base(metric) in HIGHER_IS_BETTER


def _resolve(run: str) -> tuple[str, list[Path]]:
    """``(name, [csv, ...])`` of ``[name=]path[+path...]`` (several paths: the folds of one run, pooled)."""
    name, _, paths = str(run).rpartition("=") if "=" in str(run) else ("", "", str(run))
    found = [_resolve_one(p) for p in paths.split("+")]
    if not name:
        folder = found[0].parent
        name = folder.parent.name if folder.name == "eval" else folder.name
    return name, found


def _resolve_one(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for cand in (p / CSV_NAME, p / "eval" / CSV_NAME):
            if cand.is_file():
                p = cand
                break
        else:
            raise FileNotFoundError(f"{path}: no {CSV_NAME} (looked in the folder and in its eval/ subfolder).")
    elif not p.is_file():
        raise FileNotFoundError(f"{path}: no such run folder or CSV file.")
    return p


def read_run(path: str | os.PathLike | Sequence) -> dict[str, dict[str, float]]:
    """``{case id: {metric: value}}`` of a per-case CSV (non-numeric cells and 'nan' become NaN); a list of CSVs
    (the folds of one run) is pooled, a case id found twice is an error."""
    if isinstance(path, (list, tuple)):
        pooled: dict[str, dict[str, float]] = {}
        for p in path:
            part = read_run(p)
            twice = sorted(set(part) & set(pooled))
            if twice:
                raise ValueError(f"{p}: case id(s) {twice[:3]} also in another fold of the same run.")
            pooled.update(part)
        return pooled
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cid = row.get("id")
            if cid is None:
                raise ValueError(f"{path}: no 'id' column.")
            vals = {}
            for k, v in row.items():
                if k in ("id", "failed", "spacing"):
                    continue
                try:
                    vals[k] = float(v)
                except (TypeError, ValueError):
                    vals[k] = math.nan
            out[cid] = vals
    return out


def _as_list(x) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return [str(s) for s in x]


def _paired_p(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Paired t-test p-value of two rows over the cases where both are finite, and the number of those cases."""
    from scipy.stats import ttest_rel

    both = np.isfinite(a) & np.isfinite(b)
    n = int(both.sum())
    if n < 2:
        return math.nan, n
    return (1.0 if np.all(a[both] == b[both]) else float(ttest_rel(a[both], b[both]).pvalue)), n


def compare_runs(
    runs: Sequence[str], metrics: Sequence[str] | None = None, key: str = "dice", reference: str | None = None
) -> dict:
    """Statistics behind the table. Returns ``{"names", "ids", "metrics", "stats": {metric: {...}}, ...}`` where
    ``stats[m]`` has ``mean``/``std``/``n`` per run (population std over the finite values), ``best``,
    ``second`` (run indices), ``p`` (paired t-test best vs second) and ``n_pairs``; with ``reference`` (a run's
    name) also ``p_ref``: each run's paired t-test p-value against that run."""
    if len(runs) < 1:
        raise ValueError("give at least one run.")
    resolved = [_resolve(r) for r in runs]
    names = [n for n, _ in resolved]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    data = [read_run(p) for _, p in resolved]
    common = set(data[0])
    for d in data[1:]:
        common &= set(d)
    ids = sorted(common)
    if not ids:
        raise ValueError("the runs have no case id in common.")
    dropped = {names[i]: len(d) - len(ids) for i, d in enumerate(data) if len(d) != len(ids)}
    available = [m for m in data[0][ids[0]] if all(m in d[ids[0]] for d in data)]
    metrics = _as_list(metrics) or [m for m in DEFAULT_METRICS if m in available]
    if key and key not in metrics and key in available:
        metrics = [key] + metrics
    missing = [m for m in metrics if m not in available]
    if missing:
        raise KeyError(f"metric(s) {missing} not in every run (common columns: {available}).")
    if reference is not None and reference not in names:
        raise ValueError(f"--reference {reference!r} is not a run name ({names}).")
    stats = {}
    for m in metrics:
        arr = np.array([[d[i].get(m, math.nan) for i in ids] for d in data], dtype=np.float64)  # (runs, cases)
        finite = np.isfinite(arr)
        mean = [float(a[f].mean()) if f.any() else math.nan for a, f in zip(arr, finite)]
        std = [float(a[f].std()) if f.any() else math.nan for a, f in zip(arr, finite)]
        n = [int(f.sum()) for f in finite]
        valid = [i for i in range(len(data)) if not math.isnan(mean[i])]
        order = sorted(valid, key=lambda i: -mean[i] if higher_is_better(m) else mean[i])
        best = order[0] if order else None
        second = order[1] if len(order) > 1 else None
        p, n_pairs = _paired_p(arr[best], arr[second]) if second is not None else (math.nan, 0)
        stats[m] = {
            "mean": mean,
            "std": std,
            "n": n,
            "n_failed": [len(ids) - k for k in n],
            "best": best,
            "second": second,
            "p": p,
            "n_pairs": n_pairs,
        }
        if reference is not None:
            r = names.index(reference)
            stats[m]["p_ref"] = [_paired_p(arr[i], arr[r])[0] if i != r else math.nan for i in range(len(data))]
    return {
        "names": names,
        "paths": [[str(x) for x in p] for _, p in resolved],
        "ids": ids,
        "metrics": metrics,
        "stats": stats,
        "dropped": dropped,
        "key": key,
        "reference": reference,
    }


def _fmt(v: float, m: str) -> str:
    if math.isnan(v):
        return "nan"
    if _base(m) in PERCENT:
        return f"{100 * v:.2f}"
    a = abs(v)
    return f"{v:.2e}" if (a != 0 and (a < 1e-2 or a >= 1e4)) else f"{v:.3f}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def to_markdown(res: dict) -> str:
    names, metrics, stats = res["names"], res["metrics"], res["stats"]
    head = [
        f"{'DSC (%)' if _base(m) in PERCENT and m == 'dice' else m} {'↑' if higher_is_better(m) else '↓'}"
        for m in metrics
    ]
    lines = [f"| run | {' | '.join(head)} |", "|---|" + "---|" * len(metrics)]
    for i, name in enumerate(names):
        cells = []
        for m in metrics:
            s = stats[m]
            c = f"{_fmt(s['mean'][i], m)} ± {_fmt(s['std'][i], m)}"
            if s["n_failed"][i]:
                c += f" ({s['n_failed'][i]} failed)"
            if i == s["best"]:
                c = f"**{c}**"
            elif i == s["second"]:
                c = f"{c} †"
            cells.append(c)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "Paired t-test (scipy.stats.ttest_rel) of the best (**bold**) vs the second best (†) run:",
        "",
        "| metric | best | second † | p-value | pairs |",
        "|---|---|---|---|---|",
    ]
    for m in metrics:
        s = stats[m]
        b = names[s["best"]] if s["best"] is not None else "-"
        sec = names[s["second"]] if s["second"] is not None else "-"
        lines.append(f"| {m} | {b} | {sec} | {_fmt_p(s['p'])} | {s['n_pairs']} |")
    if res.get("reference") is not None:
        lines += ["", f"Paired t-test p-value of each run against {res['reference']}:", ""]
        lines += [f"| run | {' | '.join(metrics)} |", "|---|" + "---|" * len(metrics)]
        for i, name in enumerate(names):
            if name != res["reference"]:
                lines.append(f"| {name} | {' | '.join(_fmt_p(stats[m]['p_ref'][i]) for m in metrics)} |")
    note = f"\n{len(res['ids'])} cases common to all runs"
    if res["dropped"]:
        note += "; cases dropped because other runs lack them: " + ", ".join(
            f"{k}: {v}" for k, v in res["dropped"].items()
        )
    note += ". Mean ± std (population) over the cases where the metric could be computed."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_runs_sparsification(res: dict, path: str | os.PathLike) -> str | None:
    """One figure with the mean sparsification curve of σ̂² of every run that has one (``sparsification.npz``
    next to its metrics.csv) and each run's oracle dashed (the paper's Fig. 3). Returns the path, or ``None``
    when no run has a variance estimate."""
    from scripts.plots import plot_sparsification

    curves, oracles, x = {}, {}, None
    for name, csv_path in zip(res["names"], res["paths"]):
        npz = Path(csv_path[0]).with_name("sparsification.npz")
        if npz.is_file():
            with np.load(npz) as z:
                x, curves[name], oracles[name] = z["fractions"], z["curve"], z["oracle"]
    if not curves:
        return None
    return plot_sparsification(x, curves, oracles, path, title="Sparsification error of the variance estimate")


def compare(
    *runs: str,
    metric: str = "dice",
    metrics=None,
    out: str | None = None,
    plot: str | None = None,
    reference: str | None = None,
) -> None:
    """Compare evaluated runs: Markdown table of mean ± std per metric, best in bold, second best †, paired t-test
    p-value of best vs second best.

    Args:
        runs: run folders (holding metrics.csv or eval/metrics.csv) or CSV files; ``name=path`` sets the row name.
        metric: the key metric (listed first; the paper's Table 2 tests DSC).
        metrics: comma-separated columns to show (default: dice, hd, hd95, asd, assd, epe_heart, fold_frac, ause
            where present in every run).
        out: also write the table to this file.
        plot: also write the runs' sparsification curves with their oracles to this PNG.
        reference: a run's name: add each run's paired t-test p-value against it.
    """
    if isinstance(metric, (list, tuple)):  # fire parses "a,b" as a tuple
        metrics = list(metric) + _as_list(metrics)
        metric = metrics[0]
    res = compare_runs(runs, metrics=metrics, key=metric, reference=reference)
    md = to_markdown(res)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(md)
    if plot and plot_runs_sparsification(res, plot) is None:
        print(f"(no run has sparsification.npz: {plot} not written)")
    print(md)  # returns None so that fire does not print the table twice
