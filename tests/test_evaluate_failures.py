"""Evaluation over many pairs: one pair that cannot be loaded neither stops nor hides the others (metrics.csv
records it as failed, the others are evaluated, the run then ends with an error naming it); eval_fail_fast stops
at once. In-process, on the tiny exact-ground-truth data set of test_evaluate."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from monai.bundle import ConfigParser
from test_evaluate import ROOT, SIZE, _save_untrained, write_tiny_dataset

from scripts.handlers import EvaluationFailures


def _evaluator(data, out, fail_fast=False):
    _save_untrained(out)  # the weights the evaluator's CheckpointLoader handlers read
    p = ConfigParser()
    p.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")])
    p.update(
        {
            "device": "$torch.device('cpu')",
            "dataset_dir": str(data),
            "output_dir": str(out),
            "spatial_size": [SIZE, SIZE],
            "n_panels": 0,
            "sparsification_steps": 10,
            "eval_fail_fast": fail_fast,
            "evaluate#handlers#2#_disabled_": True,  # no progress bar in the test log
        }
    )
    torch.manual_seed(0)
    return p.get_parsed_content("evaluate#evaluator")


@pytest.fixture()
def broken(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    dl = json.loads((data / "datalist.json").read_text())
    bad = dl["test"][1]
    (data / bad["fixed"]).write_bytes((data / bad["fixed"]).read_bytes()[:40])  # truncated .nii.gz
    return data, bad["id"], bad["fixed"], [it["id"] for it in dl["test"]]


def test_a_bad_pair_is_recorded_and_the_others_are_evaluated(broken, tmp_path):
    data, bad_id, bad_file, ids = broken
    out = tmp_path / "run"
    ev = _evaluator(data, out)
    with pytest.raises(EvaluationFailures, match=bad_id) as err:
        ev.run()
    assert bad_file in str(err.value)  # the message names the file
    with open(out / "eval" / "metrics.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert list(rows) == ids  # every pair, in datalist order
    assert rows[bad_id]["status"] == "failed" and bad_file in rows[bad_id]["error"]
    for case in ids:
        if case != bad_id:
            assert rows[case]["status"] == "done" and 0.0 <= float(rows[case]["dice"]) <= 1.0
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == len(ids) - 1 and list(summary["failed_pairs"]) == [bad_id]
    assert summary["metrics"]["dice"]["n"] == len(ids) - 1
    assert "1 pair(s) failed" in (out / "eval" / "summary.md").read_text()


def test_fail_fast_stops_at_the_bad_pair(broken, tmp_path):
    data, bad_id, bad_file, ids = broken
    ev = _evaluator(data, tmp_path / "run", fail_fast=True)
    with pytest.raises(Exception, match="truncated|EOF|corrupt|cannot"):
        ev.run()
    assert ev.state.iteration == ids.index(bad_id)  # the pairs before it were evaluated, none after
