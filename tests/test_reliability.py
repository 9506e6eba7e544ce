"""Reliability (issue 23): every output folder owned by one run, misspelt options refused, values checked where they
enter, non-finite metric inputs failed rather than scored, variant names that are names (docs/reliability.md).

Each case asserts a clear outcome (the error names the file / option and the problem) and that no input file changed
and nothing appeared outside the output folder (SHA-256 of the test folder before and after)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.data import DataError
from scripts.run_folder import (
    LOCK_NAME,
    SETTINGS_NAME,
    RunFolderError,
    _proc_start,
    claim_training_folder,
    current_settings,
    make_folder,
    release_lock,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"learning_rate": 0.0001, "batch_size": 1, "seed": 0, "network_def": {"_target_": "A", "channels": [8]}}


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` -> its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _used_run(folder: Path) -> Path:
    """A folder holding another run's results."""
    run = folder / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.pt").write_bytes(b"old model")
    (run / "variance.pt").write_bytes(b"old variance")
    (run / "checkpoints" / "checkpoint_epoch=3.pt").write_bytes(b"old epoch 3")
    (run / SETTINGS_NAME).write_text(json.dumps({"settings": SETTINGS, "changes": []}))
    return run


def _claim(run: Path, **kw):
    kw.setdefault("settings", SETTINGS)
    try:
        return claim_training_folder(str(run), str(run / "checkpoints"), str(run / "logs"), **kw)
    finally:
        release_lock(run)


# ------------------------------------------------------------------------------------------------ 1. ownership
def test_new_run_into_a_used_folder_is_refused_and_nothing_changes(tmp_path):
    run = _used_run(tmp_path)
    before = tree_hash(tmp_path)
    with pytest.raises(RunFolderError) as e:
        _claim(run)
    msg = str(e.value)
    assert f"--output_dir {run} already holds another run's results" in msg
    assert "model.pt" in msg and "checkpoints/checkpoint_epoch=3.pt" in msg
    assert "--resume true" in msg and "--overwrite true" in msg and "another --output_dir" in msg
    assert tree_hash(tmp_path) == before and not (run / LOCK_NAME).exists()


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path, caplog):
    run = _used_run(tmp_path)
    (run / "notes.txt").write_text("mine")  # a user's file: stays where it is
    before = tree_hash(run)
    with caplog.at_level(logging.WARNING, logger="scripts.run_folder"):
        _claim(run, overwrite="true", settings={**SETTINGS, "learning_rate": 0.001})
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and "moved aside" in caplog.text
    moved = tree_hash(aside[0])
    assert {k: v for k, v in before.items() if k != "notes.txt"} == moved  # every old result, byte for byte
    assert (run / "notes.txt").read_text() == "mine" and not (run / "model.pt").exists()
    record = json.loads((run / SETTINGS_NAME).read_text())
    assert record["settings"]["learning_rate"] == 0.001
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r", aside[0].name])  # nothing else outside


def test_a_failed_run_without_results_is_replaced_silently(tmp_path):
    """A run that failed before its first checkpoint (settings record and logs only) does not block a rerun."""
    run = tmp_path / "r"
    (run / "logs").mkdir(parents=True)
    (run / SETTINGS_NAME).write_text(json.dumps({"settings": {"seed": 9}}))
    _claim(run)
    assert json.loads((run / SETTINGS_NAME).read_text())["settings"] == SETTINGS


def test_resume_with_a_changed_command_line_is_refused_listing_the_differences(tmp_path):
    run = _used_run(tmp_path)
    before = tree_hash(tmp_path)
    changed = {**SETTINGS, "learning_rate": 0.5, "batch_size": 2, "network_def": {"_target_": "A", "channels": [4]}}
    with pytest.raises(RunFolderError) as e:
        _claim(run, resume=True, settings=changed)
    msg = str(e.value)
    assert f"settings differ from those of the run that wrote {run}" in msg and SETTINGS_NAME in msg
    assert "learning_rate: 0.0001 (recorded) -> 0.5 (now)" in msg and "batch_size: 1 (recorded) -> 2 (now)" in msg
    assert "network_def:" in msg and "--resume_allow_changes" in msg
    assert tree_hash(tmp_path) == before
    # the same settings resume; an allowed change is applied and recorded
    _claim(run, resume=True)
    _claim(run, resume=True, settings={**SETTINGS, "learning_rate": 0.5}, allow_changes="['learning_rate']")
    record = json.loads((run / SETTINGS_NAME).read_text())
    assert record["settings"]["learning_rate"] == 0.5
    assert record["changes"][-1]["changed"] == {"learning_rate": {"from": 0.0001, "to": 0.5}}
    with pytest.raises(RunFolderError, match="contradict"):
        _claim(run, resume=True, overwrite=True)


def test_allowed_learning_rate_is_set_in_the_restored_optimizer(tmp_path):
    import torch
    from ignite.engine import Engine

    from scripts.checkpoint import ResumeFromLatest
    from scripts.run_folder import allowed_learning_rates

    net = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    done = Engine(lambda e, b: None)
    done.run([0], max_epochs=1)
    torch.save({"network": net.state_dict(), "optimizer": opt.state_dict(), "trainer": done.state_dict()},
               tmp_path / "checkpoint_epoch=1.pt")  # fmt: skip
    rates = allowed_learning_rates(["learning_rate"], optimizer=0.5, optimizer_variance=0.7)
    assert rates == {"optimizer": 0.5}
    opt2 = torch.optim.Adam(net.parameters(), lr=0.5)
    engine = Engine(lambda e, b: None)
    ResumeFromLatest(
        str(tmp_path), {"network": net, "optimizer": opt2, "trainer": engine}, learning_rates=rates
    ).attach(engine)
    engine.run([0], max_epochs=2)
    assert opt2.param_groups[0]["lr"] == 0.5  # not the checkpoint's 1e-4


def test_a_second_training_into_a_locked_folder_names_the_pid(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = os.getppid()  # a live process other than this one
    lock = {"pid": holder, "host": socket.gethostname(), "start": _proc_start(holder), "what": "training",
            "since": "2026-01-01T00:00:00", "command": "monai.bundle run training --output_dir r"}  # fmt: skip
    (run / LOCK_NAME).write_text(json.dumps(lock))
    before = tree_hash(tmp_path)
    with pytest.raises(RunFolderError) as e:
        _claim(run)
    assert f"{run} is in use: process {holder}" in str(e.value) and LOCK_NAME in str(e.value)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("stale", ["dead", "reused", "garbled"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, stale):
    run = tmp_path / "r"
    run.mkdir()
    if stale == "garbled":
        (run / LOCK_NAME).write_text("{not json")
    else:
        pid, start = (2**30, None) if stale == "dead" else (os.getppid(), "1")  # no such PID / PID reused
        (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": start}))
    with caplog.at_level(logging.WARNING, logger="scripts.run_folder"):
        claim_training_folder(str(run), settings=SETTINGS)
    assert "taking over the stale lock" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_lock(run)
    assert not (run / LOCK_NAME).exists()


def test_folder_option_given_a_file_says_so(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match=r"--output_dir .*a_file: it is a file, not a folder"):
        make_folder(str(f))
    with pytest.raises(RunFolderError, match=r"--eval_dir .*its parent .*a_file is a file"):
        make_folder(str(f / "eval"), "--eval_dir")
    assert f.read_text() == "x"


def test_settings_are_read_from_the_config_without_building_anything(tmp_path):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(
        [str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "variants" / "arch" / "transmorph.yaml")]
    )
    p.update({"bundle_root": str(ROOT), "dataset_dir": str(tmp_path / "data"), "learning_rate": 0.002})
    p.parse()
    s = current_settings(p)
    assert s["learning_rate"] == 0.002 and s["variance_learning_rate"] == 0.002  # references resolved
    assert s["dataset_dir"] == str((tmp_path / "data").resolve()) and s["batch_size"] == 1
    assert "transmorph" in json.dumps(s["network_def"]).lower()  # the variant's network, as written
    assert not (tmp_path / "data").exists()  # nothing instantiated, no phantom written


# --------------------------------------------------------------------------------------------- 2. unknown ids
def _ids(*files: str):
    from monai.bundle import ConfigParser

    from scripts.overrides import config_ids

    return config_ids(ConfigParser.load_config_files([str(ROOT / "configs" / f) for f in files]))


def test_unknown_override_ids_suggest_the_closest_id():
    from scripts.overrides import unknown_override_ids

    ids = _ids("train.yaml")
    errors = unknown_override_ids(["max_epoch", "lerning_rate", "max_epochs", "netwrk_def#channels"], ids)
    assert errors[0] == "unknown option --max_epoch; did you mean --max_epochs?"
    assert errors[1].startswith("unknown option --lerning_rate; did you mean --learning_rate")
    assert "did you mean --network_def#channels" in errors[2] and len(errors) == 3
    ok = ["network_def#channels", "network_def#dropout", "train#handlers#1#_disabled_", "validate#key_metric",
          "workflow_type", "allow_unknown_ids"]  # fmt: skip
    assert unknown_override_ids(ok, ids) == []
    # ids of the variant files and of evaluate.yaml count when those files are merged
    assert unknown_override_ids(["eval_split", "ddf_dir"], _ids("train.yaml", "evaluate.yaml")) == []
    assert unknown_override_ids(["eval_split"], ids) != []


def test_monai_bundle_run_refuses_a_misspelt_option_before_writing(tmp_path, monkeypatch):
    from monai.bundle import run

    before = set(tmp_path.iterdir())
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception) as e:
        run("training", config_file=str(ROOT / "configs" / "train.yaml"), logging_file=False,
            output_dir=str(tmp_path / "r"), max_epoch=1, dataset_dir=str(tmp_path / "none"))  # fmt: skip
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("unknown option --max_epoch; did you mean --max_epochs?" in m for m in chain), chain
    assert set(tmp_path.iterdir()) == before  # no run folder, no phantom
    monkeypatch.setenv("BUNDLE_ALLOW_UNKNOWN_IDS", "1")  # the opt-out: the same call gets past the id check
    with pytest.raises(Exception) as e:  # (phantom "null": it stops at the missing datalist, writing no phantom)
        run("training", config_file=str(ROOT / "configs" / "train.yaml"), logging_file=False, phantom="null",
            output_dir=str(tmp_path / "r"), max_epoch=1, dataset_dir=str(tmp_path / "none"))  # fmt: skip
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert not any("unknown option" in m for m in chain) and any("datalist" in m for m in chain), chain


# ------------------------------------------------------------------------------------------------- 3. phantom
def test_phantom_refuses_a_foreign_datalist_and_bad_counts(tmp_path):
    from bundle.phantom_cli import phantom

    own = tmp_path / "mine"
    own.mkdir()
    (own / "datalist.json").write_text(json.dumps({"training": [{"moving": "a.nii.gz", "fixed": "b.nii.gz"}]}))
    (tmp_path / "a_file").write_text("x")
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError) as e:
        phantom(str(own), n_train=1, n_val=0, n_test=0, size=16)
    assert f"{own / 'datalist.json'} (not a phantom datalist written by this command)" in str(e.value)
    assert "--overwrite true" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match=r"already holds notes.txt"):
        phantom(str(tmp_path / "other"), n_train=1, n_val=0, n_test=0, size=16)
    for kw, needle in (({"n_train": -5}, "--n_train must be a whole number >= 0"),
                       ({"n_val": 2.5}, "--n_val must be a whole number"),
                       ({"n_train": 0, "n_val": 0, "n_test": 0}, "nothing to write")):  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            phantom(str(tmp_path / "new"), **{"n_train": 1, "n_val": 0, "n_test": 0, **kw})
    with pytest.raises(ValueError, match="a file, not a folder"):
        phantom(str(tmp_path / "a_file"), n_train=1, n_val=0, n_test=0)
    assert tree_hash(tmp_path) == before and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_phantom_rewrites_its_own_folder_and_overwrite_replaces_a_foreign_datalist(tmp_path):
    from bundle.phantom_cli import phantom

    out = tmp_path / "ph"
    phantom(str(out), n_train=1, n_val=0, n_test=0, size=16)
    phantom(str(out), n_train=1, n_val=0, n_test=0, size=16)  # its own phantom: rewritten without asking
    (out / "datalist.json").write_text("{}")
    phantom(str(out), n_train=1, n_val=0, n_test=0, size=16, overwrite="true")
    assert "phantom" in json.loads((out / "datalist.json").read_text())


# ---------------------------------------------------------------------------------------------- 4. metric inputs
@pytest.mark.parametrize(
    "spacing, needle",
    [([0, -1], "got [0, -1]"), ([1e9, 1e9], "got [1000000000.0"), ("abc", "got 'abc'"), ([1, 1, 1, 1], "got [1, 1"),
     ([True, 1], "got [True, 1]"), (["1", "1"], "got ['1', '1']"), ([float("nan"), 1], "got [nan, 1]")],
)  # fmt: skip
def test_datalist_spacing_is_checked_where_it_enters(tmp_path, spacing, needle):
    from scripts.data import load_datalist

    for n in ("m.nii.gz", "f.nii.gz"):
        (tmp_path / n).write_bytes(b"x")
    items = [{"id": "ok", "moving": "m.nii.gz", "fixed": "f.nii.gz", "spacing": [1.5, 1]},
             {"id": "bad", "moving": "m.nii.gz", "fixed": "f.nii.gz", "spacing": spacing}]  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}, allow_nan=True))
    before = tree_hash(tmp_path)
    with pytest.raises(DataError) as e:
        load_datalist(tmp_path / "datalist.json", "test")
    msg = str(e.value)
    assert f"{tmp_path / 'datalist.json'} ('test' item 1), key 'spacing'" in msg and needle in msg
    assert "2 or 3 finite numbers in (0, 1000] mm" in msg
    assert tree_hash(tmp_path) == before
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items[:1]}))
    assert load_datalist(tmp_path / "datalist.json", "test")[0]["spacing"] == [1.5, 1.0]


def test_non_finite_outputs_make_their_pair_failed():
    import torch

    from scripts.evaluator import _select, non_finite_pairs

    ddf = torch.zeros(3, 2, 4, 4)
    ddf[1, 0, 0, 0] = float("nan")
    log_var = torch.zeros(3, 1, 4, 4)
    log_var[2] = float("inf")
    out = {"ddf": ddf, "log_var": log_var, "meta": {"id": ["a", "b", "c"], "spacing": None}}
    bad = non_finite_pairs(out, {"b": "/ddfs/b_ddf.nii.gz"})
    assert [(i, c) for i, c, _ in bad] == [(1, "b"), (2, "c")]
    assert "1 of 32 values of the DDF are NaN or inf (/ddfs/b_ddf.nii.gz)" in bad[0][2]
    assert "16 of 16 values of the log sigma^2" in bad[1][2]
    kept = _select(out, [0], 3)
    assert kept["ddf"].shape[0] == 1 and kept["meta"]["id"] == ["a"]
    assert non_finite_pairs({"ddf": torch.zeros(1, 2, 4, 4), "log_var": None}) == []


@pytest.mark.slow  # in-process, but builds the evaluation workflow (several seconds)
def test_nan_ddfs_from_ddf_dir_are_failed_pairs_not_numbers(tmp_path):
    import nibabel as nib
    from monai.bundle import ConfigParser
    from test_evaluate import SIZE, write_tiny_dataset

    from scripts.handlers import EvaluationFailures

    data = write_tiny_dataset(tmp_path / "data")
    dl = json.loads((data / "datalist.json").read_text())
    ddfs = tmp_path / "ddfs"
    ddfs.mkdir()
    for k, it in enumerate(dl["test"]):
        a = np.zeros((SIZE, SIZE, 2), np.float32)
        if k == 1:
            a[:] = np.nan
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(ddfs / f"{it['id']}_ddf.nii.gz"))
    bad_id = dl["test"][1]["id"]
    before = tree_hash(tmp_path)
    p = ConfigParser()
    p.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")])
    p.update({"device": "$torch.device('cpu')", "dataset_dir": str(data), "output_dir": str(tmp_path / "run"),
              "spatial_size": [SIZE, SIZE], "n_panels": 0, "sparsification_steps": 10, "ddf_dir": str(ddfs),
              "evaluate#handlers#2#_disabled_": True})  # fmt: skip
    with pytest.raises(EvaluationFailures, match=bad_id):
        p.get_parsed_content("evaluate#evaluator").run()
    with open(tmp_path / "run" / "eval" / "metrics.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert rows[bad_id]["status"] == "failed" and "NaN or inf" in rows[bad_id]["error"]
    assert f"{bad_id}_ddf.nii.gz" in rows[bad_id]["error"] and rows[bad_id].get("dice", "") in ("", "nan")
    assert all(r["status"] == "done" for i, r in rows.items() if i != bad_id)
    after = tree_hash(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("run/")} == before  # inputs unchanged


# --------------------------------------------------------------------------------------- 5. names, expressions
def test_variant_names_are_names_not_paths(tmp_path):
    from bundle.experiment import _variant, experiment, resolve_losses

    for bad in ("../x", "../../configs/train", "a/b", "..", ".hidden", "x\\y"):
        with pytest.raises(ValueError, match="not a path"):
            resolve_losses(bad)
        with pytest.raises(ValueError, match="not a path"):
            _variant("data", bad)
    assert resolve_losses("ours") == ["ours"]
    with pytest.raises(ValueError, match=r"--loss '\.\./x'"):
        experiment(loss="../x", out=str(tmp_path / "o"), dry_run=True)
    assert not (tmp_path / "o").exists()


def test_experiment_refuses_expressions_in_forwarded_values_unless_allowed(tmp_path):
    from bundle.experiment import check_override_values, experiment

    with pytest.raises(ValueError) as e:
        experiment(loss="ours", out=str(tmp_path / "o"), dry_run=True, pair_id="$__import__('os').getcwd()")
    assert "--pair_id" in str(e.value) and "--allow_expressions true" in str(e.value)
    with pytest.raises(ValueError, match="'%'"):
        check_override_values({"network_def": "%/tmp/other.yaml"})
    check_override_values({"learning_rate": 0.001, "tag": "a$b"})
    check_override_values({"x": "$1 + 1"}, allow_expressions="true")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------- the campaign, end to end (CLI)
@pytest.mark.slow
def test_campaign_training_folder_cases_through_the_cli(tmp_path):
    """`monai.bundle run training`: a second fresh run into a used folder is refused (model.pt unchanged), a
    misspelt option is refused with a suggestion, --resume true with another learning rate lists the difference,
    --overwrite true moves the old run aside."""
    from scripts.data import prepare_dataset

    data = tmp_path / "ph"
    prepare_dataset(str(data), {"kind": "echo2d", "n_train": 2, "n_val": 1, "n_test": 1, "seed": 0, "size": 32})
    out = tmp_path / "r"
    base = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.yaml",
        "--dataset_dir",
        str(data),
        "--spatial_size",
        "[32,32]",
        "--epoch_length",
        "1",
        "--val_max_pairs",
        "1",
        "--output_dir",
        str(out),
        "--max_epochs",
        "1",
        "--schedule",
        "paper",
    ]  # fmt: skip (paper: lr 1e-4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(*extra):
        p = subprocess.run(base + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        return p.returncode, p.stdout + p.stderr

    rc, log = run()
    assert rc == 0, log[-3000:]
    model = (out / "model.pt").read_bytes()
    assert not (out / LOCK_NAME).exists()  # released at the end
    rc, log = run("--learning_rate", "0.001")
    assert rc != 0 and "already holds another run's results" in log and "--overwrite true" in log
    rc, log = run("--lerning_rate", "0.5")
    assert rc != 0 and "unknown option --lerning_rate; did you mean --learning_rate?" in log
    rc, log = run("--resume", "true", "--max_epochs", "2", "--learning_rate", "0.5")
    assert rc != 0 and "learning_rate: 0.0001 (recorded) -> 0.5 (now)" in log
    assert (out / "model.pt").read_bytes() == model
    rc, log = run("--overwrite", "true")
    assert rc == 0, log[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and (aside[0] / "model.pt").read_bytes() == model


# ---------------------------------------------------------------------------------------------------- 9. smaller
def test_non_ascii_ids_are_kept_and_paths_still_removed(tmp_path):
    from scripts.data import load_datalist
    from scripts.data.contracts import safe_id

    assert safe_id("\u043f\u0430\u0442ient_1") == "\u043f\u0430\u0442ient_1"  # was cut to 'ient_1'
    assert safe_id("\u60a3\u800501") == "\u60a3\u800501"
    assert safe_id("../../x") == "x" and safe_id("/abs/y") == "abs_y" and safe_id("..\\x") == "x"
    with pytest.raises(DataError, match="not usable as a file name"):
        safe_id("../..")
    for n in ("m.nii.gz", "f.nii.gz"):
        (tmp_path / n).write_bytes(b"x")
    item = {"id": "\u043f\u0430\u0442ient_1", "moving": "m.nii.gz", "fixed": "f.nii.gz"}
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [item]}, ensure_ascii=False), encoding="utf-8")
    assert load_datalist(tmp_path / "datalist.json", "test")[0]["id"] == "\u043f\u0430\u0442ient_1"


def test_disk_full_during_a_checkpoint_save_names_the_path_and_keeps_the_old_file(tmp_path):
    import errno

    import torch

    from scripts.checkpoint import AtomicDiskSaver

    saver = AtomicDiskSaver(str(tmp_path), filename="model.pt")
    saver({"w": torch.ones(1)}, "ignored.pt")
    before = tree_hash(tmp_path)

    def full(obj, f, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        saver._save_func({"w": torch.ones(1)}, tmp_path / "model.pt", full)
    assert f"cannot write {tmp_path / 'model.pt'}: No space left on device" in str(e.value)
    assert e.value.errno == errno.ENOSPC and tree_hash(tmp_path) == before  # old file kept, no temporary left


def test_dataset_dir_given_a_file_says_so(tmp_path):
    from scripts.data import prepare_dataset

    f = tmp_path / "images.nii.gz"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match=r"dataset_dir .*images.nii.gz: a file, not a folder"):
        prepare_dataset(str(f), {"kind": "echo2d", "n_train": 1, "n_val": 0, "n_test": 0})
    assert f.read_bytes() == b"x" and sorted(tmp_path.iterdir()) == [f]


def test_resume_of_a_run_that_wrote_its_own_phantom_is_not_refused(tmp_path):
    """The fresh run recorded no datalist digest (the phantom did not exist yet): the resume compares the rest."""
    run = _used_run(tmp_path)
    _claim(run, resume=True, settings={**SETTINGS, "datalist_sha256": "0123abcd"})
    assert json.loads((run / SETTINGS_NAME).read_text())["settings"]["datalist_sha256"] == "0123abcd"  # recorded now
    with pytest.raises(RunFolderError, match=r"datalist_sha256: \"0123abcd\" \(recorded\) -> \"ffff\" \(now\)"):
        _claim(run, resume=True, settings={**SETTINGS, "datalist_sha256": "ffff"})
    with pytest.raises(RunFolderError, match=r"--resume_allow_changes \"\['dataset_dir'\]\""):
        _claim(run, resume=True, settings={**SETTINGS, "datalist_sha256": "ffff"})
    _claim(run, resume=True, settings={**SETTINGS, "datalist_sha256": "ffff"}, allow_changes=["dataset_dir"])


# ------------------------------------------------------------------------------------- 9. leftovers (issue 23)
def test_results_writer_disk_full_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from scripts.handlers import results as R

    writer = R.RegistrationResultsWriter(tmp_path / "ev")
    writer.rows = [{"id": "a", "status": "done", "dice": 0.5}]

    def full(self, row):
        self.writer.writerow(["partial"])  # something reached the file before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "ev" / R.CSV_NAME
    with monkeypatch.context() as m:
        m.setattr(R.csv.DictWriter, "writerow", full)
        with pytest.raises(OSError) as e:
            writer.write_csv()
    assert f"cannot write {path}: No space left on device" in str(e.value) and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == []  # no 0-byte metrics.csv, no temporary
    writer.write_csv()  # a complete table; a later failure keeps it as it was
    before = tree_hash(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(R.csv.DictWriter, "writerow", full)
        with pytest.raises(OSError, match="cannot write .*metrics.csv"):
            writer.write_csv()
    umask = os.umask(0)
    os.umask(umask)
    assert tree_hash(tmp_path) == before and path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_pairs_csv_listing_one_pair_twice_is_refused_with_the_rows(tmp_path):
    from scripts.data.builders.pairs import build_pairs

    (tmp_path / "pairs.csv").write_text("moving,fixed\nm.nii.gz,f.nii.gz\nm2.nii.gz,f2.nii.gz\n./m.nii.gz,f.nii.gz\n")
    before = tree_hash(tmp_path)
    with pytest.raises(DataError) as e:
        build_pairs(tmp_path / "pairs.csv", tmp_path / "out")
    msg = str(e.value)
    assert f"{tmp_path / 'pairs.csv'}: rows 1 and 3 list the same pair" in msg and "m.nii.gz" in msg
    assert tree_hash(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_folder_fifo_or_device_as_an_image_says_what_it_is(tmp_path):
    from scripts.data import load_datalist
    from scripts.data.builders.io import read_image
    from scripts.data.contracts import not_a_file
    from scripts.inference import RegistrationInferer

    (tmp_path / "f.nii.gz").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "fifo")
    assert not_a_file(tmp_path / "f.nii.gz") is None
    assert not_a_file(tmp_path / "folder") == "is a folder, not a file"
    assert not_a_file(tmp_path / "fifo") == "is not a regular file (a FIFO)"
    assert not_a_file(tmp_path / "none") == "does not exist"
    if Path("/dev/zero").exists():
        assert not_a_file("/dev/zero") == "is not a regular file (a character device)"
    for moving, needle in (("folder", "is a folder, not a file"), ("fifo", r"is not a regular file \(a FIFO\)")):
        m = str(tmp_path / moving)
        with pytest.raises(DataError, match=rf"{m}: 'moving' {needle}"):  # inference (--moving)
            RegistrationInferer.load(None, {"moving": m, "fixed": str(tmp_path / "f.nii.gz")})
        with pytest.raises(DataError, match=rf"{m}: {needle}"):  # the data builders
            read_image(m)
        (tmp_path / "datalist.json").write_text(json.dumps({"test": [{"moving": moving, "fixed": "f.nii.gz"}]}))
        with pytest.raises(DataError, match=rf"{m}: file listed in .*key 'moving'\) {needle}"):
            load_datalist(tmp_path / "datalist.json", "test")
    with pytest.raises(FileNotFoundError, match="'moving' file does not exist"):
        RegistrationInferer.load(None, {"moving": str(tmp_path / "none"), "fixed": str(tmp_path / "f.nii.gz")})


def test_weights_a_folder_or_a_torchscript_archive_say_so(tmp_path):
    import torch

    from scripts.checkpoint import CorruptCheckpointError, read_checkpoint
    from scripts.inference_weights import WeightsLoader

    net = torch.nn.Linear(1, 1)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        WeightsLoader(str(run), {"network": net})._check_file()
    assert f"--ckpt_path {run}: a folder, not a weights file" in str(e.value) and "did you mean" not in str(e.value)
    torch.save(net.state_dict(), run / "model.pt")
    with pytest.raises(IsADirectoryError, match=rf"did you mean --ckpt_path {run / 'model.pt'}\? \(.pt files in it"):
        WeightsLoader(str(run), {"network": net})._check_file()
    with pytest.raises(IsADirectoryError, match="a folder, not a checkpoint file"):
        read_checkpoint(run)
    torch.jit.script(net).save(str(tmp_path / "model.ts"))
    for name in ("model.ts", "weights.pt"):
        (tmp_path / name).write_bytes((tmp_path / "model.ts").read_bytes())
        with pytest.raises(CorruptCheckpointError) as e:
            read_checkpoint(tmp_path / name)
        assert f"{tmp_path / name}: a TorchScript archive" in str(e.value) and "not a state dict" in str(e.value)
        assert "truncated" not in str(e.value)


def test_pack_names_a_weights_file_that_is_not_a_state_dict(tmp_path):
    import torch

    from bundle.pack import pack
    from scripts.checkpoint import CorruptCheckpointError

    root = tmp_path / "b"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = {"name": "x", "version": "0.1.0", "changelog": {"0.1.0": "first"}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save({"w": torch.ones(1)}, root / "models" / "variance.pt")
    torch.save({"where": Path("x")}, root / "models" / "model.pt")  # a pickled Python object
    before = tree_hash(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=rf"{root / 'models' / 'model.pt'}: not a weights-only"):
        pack(out_dir=str(tmp_path / "dist"), bundle_root=str(root), weights_url="https://example.org/w")
    assert tree_hash(tmp_path) == before and not (tmp_path / "dist").exists()


def test_inference_yaml_refuses_a_misspelt_option_before_writing(tmp_path, monkeypatch):
    from monai.bundle import run

    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception) as e:
        run(config_file=str(ROOT / "configs" / "inference.yaml"), logging_file=False, movng="m.nii.gz",
            fixed="f.nii.gz", output_dir=str(tmp_path / "out"))  # fmt: skip
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("unknown option --movng; did you mean --moving" in m for m in chain), chain
    assert list(tmp_path.iterdir()) == []
