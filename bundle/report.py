"""The Markdown report of ``python -m bundle experiment`` (``<out>/report.md``).

Per architecture:

- Table 1: mean ± std over the test cases of the per-case value averaged over the seeds, per method (best in bold,
  second best †; :func:`bundle.compare.to_markdown`);
- Table 2: paired t-test over the test pairs of ours vs the best other method (the oracle is a bound, never the
  competitor);
- the per-seed means of the tested metrics;
- paired tests over seeds and over pairs (:func:`seed_tests`) for every ``ours*`` row vs ``mse`` and every oracle row
  vs the method whose weight form it computes from the true ``residual_std``: over seeds, ``scipy.stats.ttest_rel``
  of the per-seed means (the test cases' mean of the metric in each seed), paired by seed; over pairs,
  ``ttest_rel`` of the per-case values averaged over the seeds, paired by case;
- with ``--gamma_sweep``, Table 4 (γ of Eq. 4).

The runs are duck-typed: anything with ``arch``, ``name``, ``seed``, ``dir``, ``summary`` and ``metrics_csv``
(:class:`bundle.experiment.Run`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

OURS = "ours"
MSE = "mse"
ORACLE_OVERLAY = "oracle"  # configs/variants/loss/oracle.yaml: variance_source oracle, no variance network
LOSS_VARIANTS = Path(__file__).resolve().parents[1] / "configs" / "variants" / "loss"
SEED_TEST_METRICS = ("dice", "epe_heart")  # the metrics of the paired tests over seeds
WEAK_SEEDS = 5  # below this many seeds a paired t-test over seeds is flagged as weak


@functools.lru_cache(maxsize=None)
def changes_only_h_phi(loss: str) -> bool:
    """Whether the loss variant ``ours_<x>`` differs from ``ours`` only in the variance network (its
    ``variance_def…`` keys, e.g. ``ours_smooth``): the oracle replaces h_φ, so such a variant shares the oracle of
    ours. False for every other name, and for names without a variant file (e.g. the γ sweep's rows)."""
    import yaml

    if not loss.startswith(OURS + "_") or not (LOSS_VARIANTS / f"{loss}.yaml").is_file():
        return False
    weight_form = {}
    for name in (loss, OURS):
        with open(LOSS_VARIANTS / f"{name}.yaml") as f:
            cfg = yaml.safe_load(f) or {}
        weight_form[name] = {k: v for k, v in cfg.items() if not k.startswith("variance_def")}
    return weight_form[loss] == weight_form[OURS]


def oracle_name(loss: str) -> str:
    """Row name of a loss variant's oracle: ``oracle`` for ``ours``, ``oracle_<form>`` for ``ours_<form>`` (the names
    of the stand-alone configs/variants/loss/oracle*.yaml; ``oracle`` too where :func:`changes_only_h_phi`),
    else ``<loss>_oracle``."""
    if loss == OURS or changes_only_h_phi(loss):
        return ORACLE_OVERLAY
    if loss.startswith(OURS + "_"):
        return ORACLE_OVERLAY + loss.removeprefix(OURS)
    return f"{loss}_{ORACLE_OVERLAY}"


def is_oracle_row(name: str) -> bool:
    return name == ORACLE_OVERLAY or name.startswith(ORACLE_OVERLAY + "_") or name.endswith("_" + ORACLE_OVERLAY)


def oracle_method(name: str) -> str:
    """The row an oracle row bounds (the inverse of :func:`oracle_name`): ``oracle`` -> ``ours``."""
    if name == ORACLE_OVERLAY:
        return OURS
    if name.startswith(ORACLE_OVERLAY + "_"):
        return OURS + name.removeprefix(ORACLE_OVERLAY)
    return name.removesuffix("_" + ORACLE_OVERLAY)


def comparisons(rows: Sequence[str]) -> list[tuple[str, str]]:
    """``(a, b)`` pairs of the tests over seeds: every ``ours*`` row vs ``mse``, every oracle row vs its method."""
    out = [(r, MSE) for r in rows if r.startswith(OURS) and MSE in rows]
    out += [(r, oracle_method(r)) for r in rows if is_oracle_row(r) and oracle_method(r) in rows]
    return out


def _fmt(v: float, metric: str) -> str:
    if math.isnan(v):
        return "nan"
    return f"{100 * v:.2f}" if metric == "dice" else f"{v:.3f}"


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def _finite_mean(xs) -> float:
    xs = [x for x in xs if isinstance(x, float) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def seed_mean_csv(run_group: Sequence, dest: Path) -> Path | None:
    """Per-case mean over the seeds of one method (cases present in every seed), written as a metrics.csv."""
    from bundle.compare import read_run

    tables = [read_run(r.metrics_csv) for r in run_group if r.metrics_csv.is_file()]
    if not tables:
        return None
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    cols = [c for c in tables[0][ids[0]]] if ids else []
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w") as f:
        f.write(",".join(["id"] + cols) + "\n")
        for i in ids:
            vals = []
            for c in cols:
                m = _finite_mean([t[i].get(c, math.nan) for t in tables])
                vals.append("nan" if math.isnan(m) else repr(m))
            f.write(",".join([i] + vals) + "\n")
    return dest


def per_seed_means(run_group: Sequence, metric: str) -> dict[int, float]:
    """``{seed: mean over the test cases of metric}`` of the evaluated runs of one method (NaN cases left out)."""
    from bundle.compare import read_run

    out = {}
    for r in sorted(run_group, key=lambda r: r.seed):
        if r.summary.is_file() and r.metrics_csv.is_file():
            out[r.seed] = _finite_mean([v.get(metric, math.nan) for v in read_run(r.metrics_csv).values()])
    return out


def table(named_csvs: list[tuple[str, Path]], metrics: Sequence[str], key: str) -> tuple[str, dict | None]:
    from bundle.compare import compare_runs, to_markdown

    if not named_csvs:
        return "(no evaluated run)\n", None
    try:
        res = compare_runs([f"{n}={p}" for n, p in named_csvs], metrics=list(metrics), key=key)
    except (KeyError, ValueError) as e:
        return f"(table not available: {e})\n", None
    return to_markdown(res), res


def _pair_test(a: Path, b: Path, metric: str) -> tuple[float, int]:
    """Paired t-test over the cases of two per-case CSVs: ``(p, pairs)`` (NaN, 0 when not available)."""
    from bundle.compare import compare_runs

    try:
        s = compare_runs([f"a={a}", f"b={b}"], metrics=[metric], key=metric)["stats"][metric]
    except (KeyError, ValueError):
        return math.nan, 0
    return s["p"], s["n_pairs"]


def ours_vs_best(named_csvs: list[tuple[str, Path]], key: str) -> str:
    """Table 2: paired t-test of ours vs the best other method (by mean of the key metric)."""
    from bundle.compare import compare_runs, higher_is_better

    named_csvs = [(n, p) for n, p in named_csvs if not is_oracle_row(n)]  # a bound, not a competitor
    names = dict(named_csvs)
    if OURS not in names or len(names) < 2:
        return "(needs 'ours' and at least one other method)\n"
    res = compare_runs([f"{n}={p}" for n, p in named_csvs], metrics=[key], key=key)
    st = res["stats"][key]
    others = [i for i, n in enumerate(res["names"]) if n != OURS and not math.isnan(st["mean"][i])]
    if not others:
        return "(no other evaluated method)\n"
    pick = max if higher_is_better(key) else min
    best_other = pick(others, key=lambda i: st["mean"][i])
    other = res["names"][best_other]
    pair = compare_runs([f"{OURS}={names[OURS]}", f"{other}={names[other]}"], metrics=[key], key=key)
    s = pair["stats"][key]
    return (
        "| comparison | metric | ours | other | p-value (paired t-test) | pairs |\n|---|---|---|---|---|---|\n"
        f"| ours vs {other} | {key} | {_fmt(s['mean'][0], key)} | {_fmt(s['mean'][1], key)} | "
        f"{_fmt_p(s['p'])} | {s['n_pairs']} |\n"
    )


def seed_test(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired t-test over seeds of two ``{seed: per-seed mean}``: ``{"seeds", "a", "b", "diff", "p"}`` on the seeds
    where both are finite (``p`` NaN with fewer than 2 seeds, 1.0 when every difference is 0)."""
    from scipy.stats import ttest_rel

    seeds = sorted(k for k in set(a) & set(b) if math.isfinite(a[k]) and math.isfinite(b[k]))
    xa, xb = [a[k] for k in seeds], [b[k] for k in seeds]
    diff = [x - y for x, y in zip(xa, xb)]
    p = math.nan
    if len(seeds) >= 2:
        p = 1.0 if all(d == 0 for d in diff) else float(ttest_rel(xa, xb).pvalue)
    return {"seeds": seeds, "a": xa, "b": xb, "diff": diff, "p": p}


def seed_tests(
    by_name: dict[str, list], csvs: dict[str, Path], rows: Sequence[str], metrics: Sequence[str] = SEED_TEST_METRICS
) -> str:
    """The table of paired tests over seeds and over pairs for :func:`comparisons` of ``rows``.

    ``by_name``: row name -> its runs (one per seed); ``csvs``: row name -> its seed-mean per-case CSV.
    """
    pairs = [(a, b) for a, b in comparisons(rows) if a in by_name and b in by_name]
    if not pairs:
        return "(needs 'ours' and 'mse', or an oracle row and its method)\n"
    lines = [
        "| comparison | metric | A | B | A − B | per seed: A − B | p over seeds | seeds | p over pairs | pairs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_min = math.inf
    for a, b in pairs:
        for m in metrics:
            t = seed_test(per_seed_means(by_name[a], m), per_seed_means(by_name[b], m))
            if not t["seeds"]:
                continue
            n_min = min(n_min, len(t["seeds"]))
            ma, mb = sum(t["a"]) / len(t["a"]), sum(t["b"]) / len(t["b"])
            per_seed = ", ".join(f"s{k}: {_fmt(d, m)}" for k, d in zip(t["seeds"], t["diff"]))
            p_pairs, n_pairs = _pair_test(csvs[a], csvs[b], m) if a in csvs and b in csvs else (math.nan, 0)
            lines.append(
                f"| {a} vs {b} | {m} | {_fmt(ma, m)} | {_fmt(mb, m)} | {_fmt(ma - mb, m)} | {per_seed} | "
                f"{_fmt_p(t['p'])} | {len(t['seeds'])} | {_fmt_p(p_pairs)} | {n_pairs} |"
            )
    if len(lines) == 2:
        return f"(no evaluated seed has {', '.join(metrics)})\n"
    lines += [
        "",
        "A, B: mean over the seeds of the per-seed mean over the test cases (DSC in %). p over seeds: "
        "scipy.stats.ttest_rel of the per-seed means, paired by seed; p over pairs: ttest_rel of the per-case "
        "values averaged over the seeds, paired by test case. The oracle rows are bounds, not competitors.",
    ]
    if n_min < WEAK_SEEDS:
        lines.append(
            f"With {n_min} seed(s) the test over seeds is weak ({max(n_min - 1, 0)} degree(s) of freedom; n/a below "
            "2 seeds): read it with the per-seed differences, and the test over pairs as the within-seed evidence."
        )
    return "\n".join(lines) + "\n"


def _per_seed_table(by_name: dict[str, list], names: Sequence[str], metric: str, seeds: int, arch: str) -> list[str]:
    rows = []
    for name in names:
        vals = per_seed_means(by_name.get(name, []), metric)
        if vals:
            cells = [f"{vals[k]:.4f}" if k in vals else "-" for k in range(seeds)]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows or seeds <= 1:
        return []
    head = ["| method | " + " | ".join(f"seed {k}" for k in range(seeds)) + " |", "|---|" + "---|" * seeds]
    return [f"Per-seed mean {metric} ({arch}):", ""] + head + rows + [""]


def write_report(
    runs: Sequence,
    out: Path,
    data: str,
    archs: Sequence[str],
    losses: Sequence[str],
    sweep_names: Sequence[tuple[str, float]],
    metrics: Sequence[str],
    key: str,
    seeds: int,
    failed: Sequence[tuple],
    skipped: Sequence[str],
    settings: dict,
) -> Path:
    """Write ``<out>/report.md`` (see the module docstring) and return its path; ``losses`` are the table rows."""
    lines = [
        f"# Experiment report: {data}",
        "",
        f"Architectures: {', '.join(archs)}; loss variants: {', '.join(losses)}; seeds: {seeds}.",
        "Each cell is the mean ± std over the test cases of the per-case value averaged over the seeds "
        "(best in **bold**, second best †). DSC in %, HD / ASD in voxels unless the evaluation reports mm "
        "(docs/evaluation.md).",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None),
        "",
    ]
    agg_dir = out / data / "_seed_mean"
    for arch in archs:
        by_name: dict[str, list] = {}
        for r in runs:
            if r.arch == arch:
                by_name.setdefault(r.name, []).append(r)
        csvs = {}
        for loss in losses:
            if by_name.get(loss):
                csv = seed_mean_csv(by_name[loss], agg_dir / arch / f"{loss}.csv")
                if csv is not None:
                    csvs[loss] = csv
        named = list(csvs.items())
        lines += [
            f"## Table 1: {arch}",
            "",
            table(named, metrics, key)[0],
            "",
            f"## Table 2: paired t-test, {arch}",
            "",
            ours_vs_best(named, key),
            "",
        ]
        # per-seed means (seed variability): the key metric, then the other metrics of the tests over seeds
        for m in dict.fromkeys([key, *SEED_TEST_METRICS]):
            lines += _per_seed_table(by_name, losses, m, seeds, arch)
        lines += [f"## Paired tests over seeds and over pairs, {arch}", "", seed_tests(by_name, csvs, losses), ""]
        if sweep_names:
            sweep = []
            for name, g in sweep_names:
                if by_name.get(name):
                    csv = seed_mean_csv(by_name[name], agg_dir / arch / f"{name}.csv")
                    if csv is not None:
                        sweep.append((f"γ={g:g}", csv))
            lines += [f"## Table 4: effect of γ (Eq. 4), {arch}", "", table(sweep, metrics, key)[0], ""]
    if skipped:
        lines += ["## Skipped combinations", ""] + [f"- {s}" for s in skipped] + [""]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r.dir}: {why} (log: {r.dir / 'experiment.log'})" for r, why in failed]
        lines += [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
