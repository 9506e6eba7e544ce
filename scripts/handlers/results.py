"""The results of the evaluation that are not metrics: the per-pair table, the summary and the figures.

:class:`RegistrationResultsWriter` assembles ``metrics.csv`` (one row per pair, failed pairs included) and
``summary.json`` / ``summary.md`` from the metric handlers' per-pair values (``engine.state.metric_details``, see
:mod:`scripts.handlers.metric_handlers`), and draws ``sparsification.png``, ``reliability.png`` and the panels.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import min_version, optional_import

from scripts import metrics as M
from scripts.data import FAILED_KEY
from scripts.handlers._output import _get, _ids, _plain, case_spacings, n_pairs, squared_residual
from scripts.handlers.metric_handlers import IDENTITY_PREFIX, fov_mask, metric_rows

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"  # per-case table read by `python -m bundle compare`
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SPARSIFICATION_PNG = "sparsification.png"
RELIABILITY_PNG = "reliability.png"
RELIABILITY_NPZ = "reliability.npz"
RELIABILITY_FOV = "reliability_fov"  # .png / .npz: the same over the field of view (fov_mask)
PANEL_DIR = "panels"
PANEL_KEYS = ("moving", "fixed", "warped", "ddf", "log_var", "weight", "moving_label", "fixed_label", "warped_label")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path`` (same extension, for matplotlib and ``np.savez``), then
    ``os.replace`` it over ``path``: a failure (disk full, killed) leaves the previous file or none, never a partial
    one. An ``OSError`` is re-raised naming ``path`` ("cannot write PATH: No space left on device"), with its errno."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the permissions of a normally created file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and str(path) not in str(e):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e} (no partial file left)") from e
        raise
    return path


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """mean, std (population, ddof=0), median over the finite values, n (finite values) and n_failed (NaN/inf
    values) of every numeric column."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if _isnum(v) and k not in keys and k not in ("n_failed",)]
    out = {}
    for k in keys:
        vals = np.array([float(r[k]) if _isnum(r.get(k)) else np.nan for r in rows], dtype=np.float64)
        ok = vals[np.isfinite(vals)]
        out[k] = {
            "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan,
            "median": float(np.median(ok)) if ok.size else math.nan,
            "n": int(ok.size),
            "n_failed": int(vals.size - ok.size),
        }
    return out


class RegistrationResultsWriter:
    """The evaluation's files under ``output_dir``, from the metric handlers of :func:`evaluation_metrics`.

    At every ITERATION_COMPLETED it records each pair of the batch (``engine.state.output`` of docs/CONTRACTS.md):
    ``id``, ``spacing`` and ``status`` (``done``, or ``failed`` with the ``error`` for a pair that could not be
    loaded, scripts.data.TolerantDataset), pools σ̂² against the squared residual for the reliability diagram
    (:class:`scripts.metrics.ReliabilityDiagram`) and keeps the images of the panel cases.

    At COMPLETED (after the metric handlers have left their per-pair values in ``engine.state.metric_details``):
    ``metrics.csv`` (one row per pair: every available one-column metric, ``n_failed`` and ``failed``, the names of
    the metrics that could not be computed, i.e. are NaN), ``summary.json`` (mean, std, median, n, n_failed per
    metric over the done pairs; ``failed_pairs``; ``calibration``: the pooled ratios and ZMS of the reliability
    diagrams, ``*_fov`` over the field of view),
    ``summary.md``, ``sparsification.png`` (+ ``.npz``: mean curves of σ̂², of the true residual_std when known,
    and the error oracle, from the ``sparsification*`` handlers), ``reliability.png`` (+ ``.npz``) and
    ``panels/<id>.png`` for ``panel_ids`` (or the first ``n_panels`` cases). Then, if some pairs failed, it raises
    :class:`EvaluationFailures` naming them.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        label: int = M.MYOCARDIUM,
        spacing: Sequence[float] | None = None,
        steps: int = 50,
        n_panels: int = 4,
        panel_ids: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label = int(label)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.steps = int(steps)
        self.n_panels = int(n_panels)
        self.panel_ids = None if panel_ids is None else [str(i) for i in panel_ids]
        self.name = name or self.output_dir.name
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.done: list[int] = []  # index in self.rows of each evaluated pair, in the metric handlers' row order
        self.reliability = M.ReliabilityDiagram()
        self.reliability_fov = M.ReliabilityDiagram()
        self.panel_cases: list[tuple[int, dict]] = []
        self.panels_written: list[str] = []

    # ------------------------------------------------------------------------------------------------- ignite
    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine) -> None:
        self.record(engine.state.output, getattr(engine.state, "batch", None))

    def completed(self, engine) -> dict:
        state = engine.state
        return self.finalize(getattr(state, "metric_details", {}), getattr(state, "metric_available", {}))

    # --------------------------------------------------------------------------------------------------- rows
    def record(self, output: Mapping[str, Any], batch: Mapping[str, Any] | None = None) -> None:
        """The rows of one batch (values come at :meth:`finalize`), the reliability sums and the panel cases."""
        self.rows += [{"id": str(i), "status": "failed", "error": str(m)} for i, m in (_get(output, FAILED_KEY) or [])]
        n = n_pairs(output)
        if n == 0:
            return
        ids = _ids(output, batch, n, len(self.rows))
        spacings = case_spacings(output, batch, self.spacing)
        lv, rs = _get(output, "log_var"), _get(output, "residual_std")
        sq = squared_residual(output)
        fov = fov_mask(output) if lv is not None else None
        for b in range(n):
            sp = spacings[b]
            row = {"id": ids[b] if b < len(ids) else f"case{len(self.rows):04d}", "status": "done"}
            row["spacing"] = "" if sp is None else " ".join(f"{v:g}" for v in sp)
            self.done.append(len(self.rows))
            self.rows.append(row)
            if lv is not None:
                r = _plain(rs[b]).float() if rs is not None else None
                self.reliability.update(_plain(lv[b]).float(), sq[b], None if r is None else r**2)
                self.reliability_fov.update(_plain(lv[b]).float(), sq[b], None if r is None else r**2, fov[b])
            if self._want_panel(row["id"]):
                case = {k: _plain(_get(output, k)) for k in PANEL_KEYS}
                self.panel_cases.append((len(self.rows) - 1, {k: _case(v, b) for k, v in case.items()}))

    def _want_panel(self, case_id: str) -> bool:
        if self.panel_ids is not None:
            return case_id in self.panel_ids
        return len(self.panel_cases) < self.n_panels

    def _panel(self, case: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        from scripts.plots import plot_panel

        d = self.output_dir / PANEL_DIR
        d.mkdir(parents=True, exist_ok=True)
        title = f"{row['id']}"
        if "dice" in row:
            title += f"  Dice {row['dice']:.3f} (identity {row.get(IDENTITY_PREFIX + 'dice', math.nan):.3f})"
        path = d / f"{_safe(row['id'])}.png"
        write_atomic(path, lambda t: plot_panel(case, t, title=title, label=self.label))
        self.panels_written.append(str(path))

    def fill(self, details: Mapping[str, torch.Tensor], available: Mapping[str, Sequence[bool]]) -> None:
        """Put the metric handlers' per-pair values into the rows; ``n_failed`` / ``failed`` name the NaN ones."""
        values = metric_rows(details, available)
        if values and len(values) != len(self.done):
            raise RuntimeError(
                f"the metric handlers hold {len(values)} rows for {len(self.done)} evaluated pairs: attach every "
                "metric handler to the engine this writer is attached to, and nothing else that adds rows."
            )
        for i, vals in zip(self.done, values):
            self.rows[i].update(vals)
        for i in self.done:
            row = self.rows[i]
            failed = [k for k, v in row.items() if _isnum(v) and not math.isfinite(float(v))]
            row["n_failed"] = len(failed)
            row["failed"] = ";".join(failed)

    # ------------------------------------------------------------------------------------------------- output
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        # failure bookkeeping last
        tail = ("n_failed", "failed", "status", "error")
        return [c for c in cols if c not in tail] + [c for c in tail if c in cols or c in ("n_failed", "failed")]

    def write_csv(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / CSV_NAME
        cols = self.columns()

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, restval="nan")
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: (_fmt(v) if _isnum(v) else v) for k, v in r.items()})

        return write_atomic(path, write)

    def finalize(
        self, details: Mapping[str, torch.Tensor] | None = None, available: Mapping[str, Sequence[bool]] | None = None
    ) -> dict:
        """Fill the rows from the handlers' ``details`` / ``available`` and write every file; returns the summary."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        details, available = details or {}, available or {}
        self.fill(details, available)
        for i, case in self.panel_cases:
            self._panel(case, self.rows[i])
        curves = _mean_curves(details, available, "sparsification")
        curves_std = _mean_curves(details, available, "sparsification_residual_std")
        self.write_csv()
        done = [r for r in self.rows if r.get("status") != "failed"]
        failed = [r for r in self.rows if r.get("status") == "failed"]
        summary = summarize(done)
        rel = self.reliability.result() if curves is not None else None
        rel_fov = self.reliability_fov.result() if curves is not None else None
        pooled = ("pooled_var_ratio_residual", "pooled_var_ratio_residual_std", "pooled_zms", "pooled_zms_ref")
        calibration = {k: rel[k] for k in pooled} if rel else {}
        calibration.update({k + "_fov": rel_fov[k] for k in pooled} if rel_fov else {})
        summary_json = {
            "n_cases": len(done),
            "failed_pairs": {r["id"]: r["error"] for r in failed},
            "metrics": summary,
            "calibration": calibration,
        }
        write_atomic(
            self.output_dir / SUMMARY_JSON,
            lambda t: t.write_text(json.dumps(summary_json, indent=2, allow_nan=True)),
        )
        md = summary_markdown(summary, len(done), self.name)
        if failed:
            md += f"\n**{len(failed)} pair(s) failed** and are not in the statistics (metrics.csv, column error):\n"
            md += "".join(f"- {r['id']}: {r['error']}\n" for r in failed)
        if calibration:
            md += (
                f"\nPooled over all pixels: mean sigma^2 / mean squared residual = "
                f"{calibration['pooled_var_ratio_residual']:.4g}, / mean residual_std^2 = "
                f"{calibration['pooled_var_ratio_residual_std']:.4g} (reliability diagram: {RELIABILITY_PNG}); "
                f"pooled ZMS = mean r^2/sigma^2 = {calibration['pooled_zms']:.4g}, in the field of view "
                f"{calibration['pooled_zms_fov']:.4g} (residual_std^2/sigma^2: "
                f"{calibration['pooled_zms_ref_fov']:.4g}; "
                f"{RELIABILITY_FOV}.png).\n"
            )
        write_atomic(self.output_dir / SUMMARY_MD, lambda t: t.write_text(md))
        if curves is not None:
            from scripts.plots import plot_reliability, plot_sparsification

            n_curves, c, o = curves
            x = np.array([t / (c.size - 1) for t in range(c.size)])
            plotted, extra = {r"$\hat\sigma^2$": c}, {}
            title = f"Sparsification ({self.name}, n={n_curves}, AUSE {summary['ause']['mean']:.2e}"
            if curves_std is not None:  # the oracle estimator sigma = residual_std (phantom)
                extra["curve_residual_std"] = plotted["true residual_std"] = curves_std[1]
                title += f"; residual_std {summary['ause_residual_std']['mean']:.2e}"
            write_atomic(
                self.output_dir / SPARSIFICATION_PNG, lambda t: plot_sparsification(x, plotted, o, t, title=title + ")")
            )
            write_atomic(
                self.output_dir / "sparsification.npz", lambda t: np.savez(t, fractions=x, curve=c, oracle=o, **extra)
            )
            write_atomic(
                self.output_dir / RELIABILITY_NPZ, lambda t: np.savez(t, **{k: np.asarray(v) for k, v in rel.items()})
            )
            title_rel = (
                f"Reliability of $\\hat\\sigma^2$ ({self.name}); pooled mean ratio "
                f"{rel['pooled_var_ratio_residual']:.3g} (residual), {rel['pooled_var_ratio_residual_std']:.3g} "
                "(residual_std)"
            )
            write_atomic(self.output_dir / RELIABILITY_PNG, lambda t: plot_reliability(rel, t, title=title_rel))
            write_atomic(
                self.output_dir / f"{RELIABILITY_FOV}.npz",
                lambda t: np.savez(t, **{k: np.asarray(v) for k, v in rel_fov.items()}),
            )
            title_fov = (
                f"Reliability of $\\hat\\sigma^2$ in the field of view ({self.name}); ZMS "
                f"{rel_fov['pooled_zms']:.3g} (residual), {rel_fov['pooled_zms_ref']:.3g} (residual_std)"
            )
            write_atomic(
                self.output_dir / f"{RELIABILITY_FOV}.png", lambda t: plot_reliability(rel_fov, t, title=title_fov)
            )
        logger.info("evaluation of %d cases written to %s", len(done), self.output_dir)
        if failed:
            raise EvaluationFailures(
                f"{len(failed)} of {len(self.rows)} pairs failed (the other {len(done)} are evaluated in "
                f"{self.output_dir / CSV_NAME} and {SUMMARY_MD}):\n"
                + "\n".join(f"  {r['id']}: {r['error']}" for r in failed)
            )
        return summary


class EvaluationFailures(RuntimeError):
    """Raised after the evaluation of every other pair is written, naming the pairs that could not be loaded."""


def _fmt(v: Any) -> str:
    f = float(v)
    return "nan" if math.isnan(f) else repr(f) if isinstance(v, float) else str(v)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


SUMMARY_ORDER = (
    "dice",
    "hd",
    "hd95",
    "asd",
    "asd_rev",
    "assd",
    "dice_mm",
    "hd_mm",
    "hd95_mm",
    "asd_mm",
    "asd_rev_mm",
    "assd_mm",
    "mse",
    "epe",
    "epe_heart",
    "epe_mm",
    "epe_heart_mm",
    "fold_frac",
    "std_log_jac",
    "ause",
    "aurg",
    "ause_norm",
    "aurg_norm",
    "nll",
    "spearman_noise",
    "spearman_noise_fov",
    "var_ratio_residual",
    "var_ratio_residual_std",
    "spearman_residual_std",
    "spearman_residual_std_fov",
    "nll_residual_std",
    "ause_residual_std",
    *(k + f for k in M.SIGMA_KEYS + M.REF_KEYS for f in ("", "_fov")),
    "qc_score",
)


def summary_markdown(summary: Mapping[str, Mapping[str, float]], n_cases: int, name: str = "") -> str:
    """Markdown table: one row per metric, registration vs identity (mean ± std, median, n, failed)."""
    lines = [
        f"# Evaluation {name}".rstrip(),
        "",
        f"{n_cases} cases; mean ± std (population) over the cases where "
        "the metric could be computed; 'failed' counts the others.",
        "",
        "| metric | registration | identity | median | n | failed |",
        "|---|---|---|---|---|---|",
    ]
    keys = [k for k in SUMMARY_ORDER if k in summary] + sorted(
        k for k in summary if k not in SUMMARY_ORDER and not k.startswith(IDENTITY_PREFIX)
    )
    for k in keys:
        s, i = summary[k], summary.get(IDENTITY_PREFIX + k)
        ident = f"{i['mean']:.4g} ± {i['std']:.3g}" if i else ""
        lines.append(
            f"| {k} | {s['mean']:.4g} ± {s['std']:.3g} | {ident} | {s['median']:.4g} | {s['n']} | " f"{s['n_failed']} |"
        )
    return "\n".join(lines) + "\n"


def _mean_curves(details: Mapping, available: Mapping, name: str) -> tuple[int, np.ndarray, np.ndarray] | None:
    """``(number of pairs, mean curve, mean oracle)`` of a sparsification handler's rows, None without any."""
    rows = [r for r, ok in zip(np.asarray(details.get(name, [])), available.get(name, [])) if ok]
    if not rows:
        return None
    mean = np.nanmean(np.stack(rows).astype(np.float64), 0)
    half = mean.size // 2
    return len(rows), mean[:half], mean[half:]


def _case(v: Any, b: int) -> Any:
    return v[b].detach().cpu() if isinstance(v, torch.Tensor) else None


def evaluate_outputs(
    outputs: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    label: int = M.MYOCARDIUM,
    spacing: Sequence[float] | None = None,
    steps: int = 50,
    **writer_kwargs: Any,
) -> dict:
    """Run :func:`evaluation_metrics` and a :class:`RegistrationResultsWriter` over ready engine outputs (one per
    iteration, docs/CONTRACTS.md) on an Ignite engine, as configs/evaluate.yaml does; returns the engine's state
    (``metrics``, ``metric_details``). For tests and for outputs computed elsewhere."""
    from ignite.engine import Engine

    from scripts.handlers.metric_handlers import evaluation_metrics

    engine = Engine(lambda e, i: outputs[i])
    for name, handler in evaluation_metrics(label, spacing, steps).items():
        handler.attach(engine, name)
    RegistrationResultsWriter(output_dir, label, spacing, steps, **writer_kwargs).attach(engine)
    engine.run(list(range(len(outputs))), max_epochs=1)
    return engine.state
