"""``python -m bundle experiment``: a toy matrix end to end (real training + evaluation subprocesses), the report,
resuming, and the command lines of the full matrix (dry run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bundle.experiment import ROOT, Run, build_runs, config_files, has_oracle, resolve_losses
from bundle.report import changes_only_h_phi, oracle_name, ours_vs_best

LOSS_DIR = ROOT / "configs" / "variants" / "loss"


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "bundle", "experiment", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_losses_and_config_lists():
    assert resolve_losses("all") == ["mse", "ncc", "mi", "nll", "beta_nll", "adareg", "adaframe", "ours"]
    assert resolve_losses(["supp"]) == ["ours_dispunc", "vxm_diff"]
    with pytest.raises(FileNotFoundError):
        resolve_losses("nope")
    files = config_files("phantom_echo", "transmorph", "adareg", evaluate=True)
    names = [Path(f).name for f in files]
    assert names == ["train.yaml", "phantom_echo.yaml", "adareg.yaml", "transmorph.yaml", "evaluate.yaml"]
    assert [Path(f).name for f in config_files("phantom_echo", "voxelmorph", "vxm_diff")][-1] == "vxm_diff.yaml"


@pytest.mark.slow
def test_dry_run_lists_the_whole_matrix(tmp_path):
    res = _cli(
        "--data",
        "phantom_echo",
        "--arch",
        "voxelmorph",
        "transmorph",
        "--loss",
        "all",
        "ours_dispunc",
        "--seeds",
        "2",
        "--gamma_sweep",
        "0",
        "0.5",
        "--max_epochs",
        "3",
        "--out",
        str(tmp_path),
        "--dry_run",
        "true",
        "--num_workers",
        "0",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    trains = [line for line in res.stdout.splitlines() if "] train:" in line]
    # (8 losses + 2 gammas) x 2 archs x 2 seeds + ours_dispunc x voxelmorph only x 2 seeds
    assert len(trains) == (8 + 2) * 2 * 2 + 2
    assert any("transmorph/ours_gamma0.5/seed1" in t and "--gamma 0.5" in t for t in trains)
    assert all("--max_epochs 3" in t and "--num_workers 0" in t for t in trains)
    assert not any("transmorph/ours_dispunc" in t for t in trains)


@pytest.mark.slow
def test_toy_matrix_end_to_end_and_resume(tmp_path):
    out = tmp_path / "runs"
    args = [
        "--data",
        "phantom_echo",
        "--arch",
        "voxelmorph",
        "--loss",
        "mse",
        "ours",
        "--seeds",
        "1",
        "--max_epochs",
        "1",
        "--epoch_length",
        "2",
        "--n_train",
        "4",
        "--n_val",
        "2",
        "--n_test",
        "2",
        "--size",
        "32",
        "--out",
        str(out),
        "--num_workers",
        "0",
        "--n_panels",
        "0",
    ]
    res = _cli(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Table 1: voxelmorph" in report and "## Table 2" in report
    assert "| mse |" in report and "| ours |" in report and "DSC (%)" in report and "**" in report
    for loss in ("mse", "ours"):
        run = out / "phantom_echo" / "voxelmorph" / loss / "seed0"
        assert (run / "eval" / "summary.json").is_file() and (run / "checkpoints" / "checkpoint_final.pt").is_file()
    assert (out / "phantom_echo" / "voxelmorph" / "ours" / "seed0" / "variance.pt").is_file()
    assert not (out / "phantom_echo" / "voxelmorph" / "mse" / "seed0" / "variance.pt").exists()
    status = json.loads((out / "experiment.json").read_text())
    assert not status["failed"] and all(r["state"] == "done" for r in status["runs"])
    # resume: everything evaluated -> nothing is rerun
    log = out / "phantom_echo" / "voxelmorph" / "mse" / "seed0" / "experiment.log"
    before = log.read_text()
    assert _cli(*args, timeout=300).returncode == 0
    assert log.read_text() == before


def test_run_states(tmp_path):
    r = Run("phantom_echo", "voxelmorph", "ours", 0, tmp_path)
    assert r.state() == "new"
    (r.dir / "checkpoints").mkdir(parents=True)
    (r.dir / "checkpoints" / "checkpoint_epoch=3.pt").touch()
    assert r.state() == "partial"
    assert "--resume" in r.commands({}, resume=True)["train"]
    (r.dir / "checkpoints" / "checkpoint_final.pt").touch()
    (r.dir / "model.pt").touch()
    assert r.state() == "trained"
    (r.dir / "eval").mkdir()
    (r.dir / "eval" / "summary.json").write_text("{}")
    (r.dir / "eval" / "metrics.csv").write_text("id\n")
    assert r.state() == "done"


def test_oracle_rows_follow_their_weight_form(tmp_path):
    losses = resolve_losses(["mse", "ours", "ours_literal", "nll", "ours_dispunc", "oracle"])
    runs, skipped, rows = build_runs("phantom_echo", ["voxelmorph", "transmorph"], losses, 2, tmp_path, oracle=True)
    # collaborative variants that learn σ̂ get an oracle row right after them; `--loss oracle` is not run twice
    assert rows == ["mse", "ours", "oracle", "ours_literal", "oracle_literal", "nll", "ours_dispunc"]
    assert not has_oracle("mse") and not has_oracle("nll") and not has_oracle("oracle")
    assert len(runs) == 2 * 2 * 6 + 2 and len({r.dir for r in runs}) == len(runs)
    assert skipped == ["transmorph x ours_dispunc: the displacement-uncertainty head is built on VoxelMorph"]
    lit = next(r for r in runs if r.name == "oracle_literal" and r.arch == "transmorph" and r.seed == 1)
    assert lit.dir == tmp_path / "phantom_echo" / "transmorph" / "oracle_literal" / "seed1"
    for what, cmd in lit.commands({}).items():
        files = [Path(f).name for f in eval(cmd[cmd.index("--config_file") + 1])]
        expected = ["train.yaml", "phantom_echo.yaml", "ours_literal.yaml", "oracle.yaml", "transmorph.yaml"]
        assert files == expected + (["evaluate.yaml"] if what == "evaluate" else [])
    plain, _, rows = build_runs("phantom_echo", ["voxelmorph"], ["ours"], 1, tmp_path)
    assert rows == ["ours"] and [r.name for r in plain] == ["ours"]


def _load(name):
    with open(LOSS_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def test_every_weight_form_has_a_stand_alone_oracle_equal_to_the_overlay():
    overlay = _load("oracle")
    assert overlay == {"mode": "collaborative", "variance_source": "oracle", "variance_def": None}
    # oracle.yaml alone is the authors' form: ours.yaml only restates train.yaml's defaults
    with open(ROOT / "configs" / "train.yaml") as f:
        train = yaml.safe_load(f)
    assert all(train[k] == v for k, v in _load("ours").items())
    forms = sorted(p.stem.removeprefix("oracle_") for p in LOSS_DIR.glob("oracle_*.yaml"))
    assert forms and "literal" in forms
    for form in forms:
        assert _load(f"oracle_{form}") == dict(_load(f"ours_{form}"), **overlay), form
    # and every weight form of ours_<form>.yaml that is collaborative has its stand-alone oracle
    # (a variant that changes only h_φ shares the oracle of ours: the oracle has no h_φ)
    for p in LOSS_DIR.glob("ours_*.yaml"):
        if has_oracle(p.stem) and not changes_only_h_phi(p.stem):
            assert p.stem.removeprefix("ours_") in forms, f"configs/variants/loss/oracle_{p.stem[5:]}.yaml is missing"
    weight_keys = {k: v for k, v in _load("ours_smooth").items() if not k.startswith("variance_def")}
    assert weight_keys == _load("ours")  # the same weight form as ours
    assert changes_only_h_phi("ours_smooth") and oracle_name("ours_smooth") == "oracle"
    for low in ("ours_lowpass", "ours_lowpass_strong"):  # input (and output) smoothing of h_φ: the same oracle
        assert changes_only_h_phi(low) and oracle_name(low) == "oracle", low
    assert not changes_only_h_phi("ours_literal") and oracle_name("ours_literal") == "oracle_literal"
    assert not changes_only_h_phi("ours_gamma0.25")  # a sweep row: no variant file


def test_table2_never_takes_the_oracle_as_the_competitor(tmp_path):
    def csv(name, values):
        path = tmp_path / f"{name}.csv"
        path.write_text("id,dice\n" + "".join(f"c{i},{v}\n" for i, v in enumerate(values)))
        return name, path

    named = [csv("mse", [0.70, 0.72, 0.71]), csv("ours", [0.74, 0.73, 0.75]), csv("oracle", [0.9, 0.91, 0.92])]
    table = ours_vs_best(named, "dice")
    assert "| ours vs mse |" in table and "oracle" not in table


def test_help_prints_the_docstring_and_starts_nothing(tmp_path, capsys):
    from bundle.__main__ import main
    from bundle.experiment import experiment

    out = tmp_path / "never"
    assert experiment(help=True, out=str(out)) == ""  # what python-fire passes for `--help` to **overrides
    assert experiment(h=True, out=str(out), loss="mse") == ""
    assert "Train and evaluate every (architecture, loss variant, seed)" in capsys.readouterr().out
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            main(["experiment", "--out", str(out), flag])
        assert e.value.code == 0
        printed = "".join(capsys.readouterr())  # python-fire writes its help page to stderr
        assert "Train and evaluate every" in printed and "--gamma_sweep" in printed
    assert not out.exists()


def test_unknown_overrides_are_refused_before_anything_starts(tmp_path, capsys):
    from bundle.experiment import experiment

    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"--num_wrkers \(did you mean num_workers"):
        experiment(loss="mse", out=str(out), num_wrkers=0)
    with pytest.raises(ValueError, match="--seed: set by the experiment"):
        experiment(loss="mse", out=str(out), seed=3)
    assert not out.exists()
    # config ids of train.yaml, evaluate.yaml (n_panels) and nested ids pass
    experiment(loss="mse", out=str(out), dry_run=True, num_workers=0, n_panels=0, **{"train#dataloader#shuffle": 0})
    printed = capsys.readouterr().out
    assert "--num_workers 0" in printed and "--train#dataloader#shuffle 0" in printed and not out.exists()


def _fake_run(tmp_path, name, seed, dice, epe):
    r = Run("phantom_echo", "voxelmorph", "ours", seed, tmp_path, name=name)
    (r.dir / "eval").mkdir(parents=True)
    r.summary.write_text("{}")
    rows = "".join(f"c{i},{d},{e}\n" for i, (d, e) in enumerate(zip(dice, epe)))
    r.metrics_csv.write_text("id,dice,epe_heart\n" + rows)
    return r


def test_report_has_paired_tests_over_seeds_and_over_pairs(tmp_path):
    from scipy.stats import ttest_rel

    from bundle.report import write_report

    base = {"mse": 0.70, "ours": 0.72, "oracle": 0.75}
    shift = [0.0, 0.01, -0.02]  # seed effect shared by the methods
    noise = {"mse": [0.0, 0.0, 0.0], "ours": [0.004, -0.003, 0.001], "oracle": [0.01, 0.0, -0.004]}
    values = {}  # (name, metric) -> [seed][case]
    runs = []
    for name, b in base.items():
        for k in range(3):
            m = b + shift[k] + noise[name][k]
            dice = [m - 0.01, m, m + 0.01, m + 0.004 * (k + 1)]
            epe = [3 - 2 * d + 0.01 * i * k for i, d in enumerate(dice)]
            values.setdefault((name, "dice"), []).append(dice)
            values.setdefault((name, "epe_heart"), []).append(epe)
            runs.append(_fake_run(tmp_path, name, k, dice, epe))
    report = write_report(
        runs, tmp_path, "phantom_echo", ["voxelmorph"], list(base), [], ["dice", "epe_heart"], "dice", 3, [], [], {}
    ).read_text()
    assert "## Table 1: voxelmorph" in report and "| ours vs mse | dice |" in report  # Table 2 kept
    assert "Per-seed mean dice (voxelmorph):" in report and "Per-seed mean epe_heart (voxelmorph):" in report
    section = report.split("## Paired tests over seeds and over pairs, voxelmorph")[1]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in section.splitlines() if " vs " in line}
    pairs = (("ours", "mse"), ("oracle", "ours"))
    assert set(rows) == {(f"{a} vs {b}", m) for a, b in pairs for m in ("dice", "epe_heart")}
    for a, b in pairs:
        for metric in ("dice", "epe_heart"):
            cells = [c.strip() for c in rows[(f"{a} vs {b}", metric)].split("|")[1:-1]]
            xa, xb = ([sum(v) / 4 for v in values[(n, metric)]] for n in (a, b))  # per-seed means
            fmt = (lambda v: f"{100 * v:.2f}") if metric == "dice" else (lambda v: f"{v:.3f}")
            assert cells[2] == fmt(sum(xa) / 3) and cells[3] == fmt(sum(xb) / 3)
            assert cells[5] == ", ".join(f"s{k}: {fmt(x - y)}" for k, (x, y) in enumerate(zip(xa, xb)))
            assert float(cells[6]) == pytest.approx(ttest_rel(xa, xb).pvalue, rel=2e-3, abs=1e-3) and cells[7] == "3"
            # over pairs: the per-case values averaged over the seeds, paired by case
            va, vb = values[(a, metric)], values[(b, metric)]
            ca, cb = ([sum(v[k][i] for k in range(3)) / 3 for i in range(4)] for v in (va, vb))
            assert float(cells[8]) == pytest.approx(ttest_rel(ca, cb).pvalue, rel=2e-3, abs=1e-3) and cells[9] == "4"
    assert "With 3 seed(s) the test over seeds is weak (2 degree(s) of freedom" in section


def test_dry_run_in_process_regroups_multi_value_flags(tmp_path, monkeypatch, capsys):
    """The matrix of the dry run above, through `python -m bundle`'s main and python-fire, without a subprocess."""
    from bundle.__main__ import main

    argv = ["experiment", "--arch", "voxelmorph", "transmorph", "--loss", "mse", "ours", "--seeds", "2"]
    argv += ["--gamma_sweep", "0", "0.5", "--out", str(tmp_path), "--dry_run", "true", "--num_workers", "0"]
    monkeypatch.setattr(sys, "argv", ["bundle"] + argv)  # python-fire's extra values are regrouped from sys.argv
    main(argv)
    trains = [line for line in capsys.readouterr().out.splitlines() if "] train:" in line]
    assert len(trains) == (2 + 2) * 2 * 2
    assert any("transmorph/ours_gamma0.5/seed1" in t and "--gamma 0.5" in t for t in trains)
    assert all("--num_workers 0" in t for t in trains) and not any(tmp_path.iterdir())
