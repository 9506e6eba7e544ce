"""`python -m bundle compare` on synthetic per-case CSVs with known answers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

from bundle.compare import compare, compare_runs, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


@pytest.fixture
def runs(tmp_path):
    ids = [f"c{i}" for i in range(6)]
    a_d = np.array([0.80, 0.82, 0.78, 0.85, 0.81, 0.79])
    b_d = a_d - np.array([0.02, 0.01, 0.03, 0.02, 0.015, 0.025])  # second best
    c_d = a_d - 0.2
    hd_a, hd_b, hd_c = np.array([3.0] * 6), np.array([2.0, 2.5, 2.0, 2.2, 2.1, 2.4]), np.array([5.0] * 6)
    hd_b[5] = np.nan  # a failed case
    mk = lambda d, h: [{"id": i, "dice": d[k], "hd": h[k], "failed": ""} for k, i in enumerate(ids)]  # noqa: E731
    a = _write(tmp_path / "ours", mk(a_d, hd_a))
    b = _write(tmp_path / "mse" / "eval", mk(b_d, hd_b))
    # run c has its rows shuffled and one extra case: matching is by id
    rows_c = mk(c_d, hd_c)[::-1] + [{"id": "extra", "dice": 0.1, "hd": 9.0, "failed": ""}]
    c = _write(tmp_path / "nll", rows_c)
    return (a, b.parent, c), (a_d, b_d, c_d), (hd_a, hd_b, hd_c)


def test_compare_known_answer(runs, tmp_path):
    folders, dice, hd = runs
    res = compare_runs([str(f) for f in folders], metrics="dice,hd")
    assert res["names"] == ["ours", "mse", "nll"]
    assert res["ids"] == [f"c{i}" for i in range(6)]
    assert res["dropped"] == {"nll": 1}
    s = res["stats"]["dice"]
    assert s["best"] == 0 and s["second"] == 1
    np.testing.assert_allclose(s["mean"], [d.mean() for d in dice])
    np.testing.assert_allclose(s["std"], [d.std() for d in dice])
    assert s["p"] == pytest.approx(ttest_rel(dice[0], dice[1]).pvalue)
    h = res["stats"]["hd"]  # lower is better: mse best (with one failed case), ours second
    assert h["best"] == 1 and h["second"] == 0
    assert h["n_failed"] == [0, 1, 0] and h["n_pairs"] == 5
    assert h["mean"][1] == pytest.approx(np.nanmean(hd[1]))
    assert h["p"] == pytest.approx(ttest_rel(hd[1][:5], hd[0][:5]).pvalue)
    md = to_markdown(res)
    ours_row = next(line for line in md.splitlines() if line.startswith("| ours"))
    assert f"**{100 * dice[0].mean():.2f} ± {100 * dice[0].std():.2f}**" in ours_row
    assert "3.000 ± 0.000 †" in ours_row
    mse_row = next(line for line in md.splitlines() if line.startswith("| mse"))
    assert f"{100 * dice[1].mean():.2f} ± {100 * dice[1].std():.2f} †" in mse_row and "(1 failed)" in mse_row


@pytest.mark.slow
def test_compare_cli(runs, tmp_path):
    folders, dice, _ = runs
    out = tmp_path / "table.md"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bundle",
            "compare",
            f"A={folders[0]}",
            str(folders[1] / "eval" / "metrics.csv"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "| A |" in md and "| eval |" not in md and "| mse |" in md
    assert r.stdout.count("Paired t-test") == 1
    p = ttest_rel(dice[0], dice[1]).pvalue
    assert f"| dice | A | mse | {p:.2e} | 6 |" in md or f"| dice | A | mse | {p:.3f} | 6 |" in md


def test_compare_command_line_in_process(runs, tmp_path, capsys):
    """The same command line through ``bundle.__main__.main`` (fire), without a subprocess: the fast tier's copy."""
    from bundle.__main__ import main

    folders, dice, _ = runs
    out = tmp_path / "table.md"
    main(["compare", f"A={folders[0]}", str(folders[1] / "eval" / "metrics.csv"), "--out", str(out)])
    md = out.read_text()
    assert "| A |" in md and "| eval |" not in md and "| mse |" in md
    assert capsys.readouterr().out.count("Paired t-test") == 1
    p = ttest_rel(dice[0], dice[1]).pvalue
    assert f"| dice | A | mse | {p:.2e} | 6 |" in md or f"| dice | A | mse | {p:.3f} | 6 |" in md


def test_compare_errors(tmp_path, runs):
    folders, _, _ = runs
    with pytest.raises(FileNotFoundError):
        compare(str(tmp_path / "nope"))
    with pytest.raises(KeyError):
        compare_runs([str(folders[0])], metrics="epe")


def test_sparsification_plot_of_runs_with_a_variance_estimate(runs, tmp_path):
    a, b, c = runs[0]
    x = np.linspace(0, 1, 51)
    np.savez(Path(a) / "sparsification.npz", fractions=x, curve=1 - x, oracle=(1 - x) ** 3)
    out = tmp_path / "sp.png"
    compare(str(a), str(b), str(c), plot=str(out))
    assert out.is_file() and out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    # no run with a variance estimate: no figure, and a note instead of an error
    out2 = tmp_path / "none.png"
    compare(str(b), str(c), plot=str(out2))
    assert not out2.exists()
