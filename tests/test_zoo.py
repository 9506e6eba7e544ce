"""The bundle as the MONAI ecosystem consumes it: ConfigWorkflow properties (in the style of the model zoo's
ci/unit_tests/test_<bundle>.py), monai.bundle.load on the bundle folder, and the JSON configs generated from the YAML.

See docs/zoo.md for the zoo's own ci/verify_bundle.py run on this bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow

from bundle.configs_json import COMMAND, configs_json, stale

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# a tiny built-in phantom (written into dataset_dir by the config itself) and a two-iteration training
TEST_CASE_TRAIN = {
    "bundle_root": str(ROOT),
    "phantom": {"kind": "echo2d", "n_train": 2, "n_val": 2, "n_test": 2, "seed": 0},
    "max_epochs": 1,
    "epoch_length": 2,
    "num_workers": 0,
    "n_panels": 1,
    "sparsification_steps": 5,
}
TEST_CASE_INFER = {"bundle_root": str(ROOT), "overlay": False}


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False) -> None:
    """As the zoo's ci/unit_tests/utils.py: initialize, check the properties, run, finalize."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()


def _workflow(workflow_type: str, files, **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(CONFIGS / f) for f in files],
        logging_file=str(CONFIGS / "logging.conf"),
        meta_file=str(CONFIGS / "metadata.json"),
        **override,
    )


def _eval_run_id() -> str:
    """The evaluation run list of configs/evaluate.yaml (`evaluating`, or `run` when evaluate.yaml defines it)."""
    content = yaml.safe_load((CONFIGS / "evaluate.yaml").read_text())
    return "run" if "run" in content else "evaluating"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train, then evaluate, through ConfigWorkflow on the JSON configs (as the zoo's unit tests do)."""
    base = tmp_path_factory.mktemp("zoo")
    override = {**TEST_CASE_TRAIN, "dataset_dir": str(base / "data"), "output_dir": str(base / "run")}
    trainer = _workflow("train", ["train.json"], **override)
    check_workflow(trainer, check_properties=True)
    # evaluate.json is merged after train.json, so the workflow type stays "train" (as in the zoo's tests)
    validator = _workflow("train", ["train.json", "evaluate.json"], run_id=_eval_run_id(), **override)
    check_workflow(validator, check_properties=True)
    return base


@pytest.mark.slow
def test_train_eval_config(trained):
    run = trained / "run"
    assert (run / "model.pt").is_file() and (run / "variance.pt").is_file()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary, "evaluation wrote an empty summary"


@pytest.mark.slow
def test_infer_config(trained, tmp_path):
    """Inference properties, then a run over the test split of the phantom written by training (`dataset_dir`)."""
    override = {
        **TEST_CASE_INFER,
        "dataset_dir": str(trained / "data"),
        "output_dir": str(tmp_path / "out"),
        "ckpt_path": str(trained / "run" / "model.pt"),
    }
    inferrer = _workflow("infer", ["inference.json"], **override)
    check_workflow(inferrer, check_properties=True)
    test_ids = [it["id"] for it in inferrer.dataset.data]
    assert len(test_ids) == 2
    for i in test_ids:
        assert (tmp_path / "out" / f"{i}_ddf.nii.gz").is_file(), i


def test_train_handlers_are_components():
    """MONAI's ConfigWorkflow.check_properties reads ``h["_target_"]`` of every item of ``train#handlers`` (to find
    the ValidationHandler): an item written as a reference or expression string makes it raise TypeError."""
    handlers = yaml.safe_load((CONFIGS / "train.yaml").read_text())["train"]["handlers"]
    bad = [(i, h) for i, h in enumerate(handlers) if not isinstance(h, dict)]
    assert not bad, (
        f"configs/train.yaml train#handlers items {bad} are strings: define them as components ({{_target_: ...}}) "
        "or append the object in train#trainer#train_handlers (as train#rng_state is)"
    )


@pytest.mark.parametrize(
    "workflow_type,files",
    [
        pytest.param("train", ["train.yaml"], marks=pytest.mark.slow),  # writes a phantom: seconds
        pytest.param("train", ["train.yaml", "evaluate.yaml"], marks=pytest.mark.slow),
        ("infer", ["inference.yaml"]),
    ],
)
def test_properties_yaml(workflow_type, files, tmp_path):
    """The YAML sources satisfy MONAI's TrainProperties / InferProperties (required and optional ids)."""
    override = {"bundle_root": str(ROOT)}
    if workflow_type == "train":
        override.update(dataset_dir=str(tmp_path / "data"), phantom=TEST_CASE_TRAIN["phantom"])
    else:
        import nibabel as nib

        img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
        for k, a in (("moving", img), ("fixed", np.roll(img, 2, 0))):
            nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / f"{k}.nii.gz"))
            override[k] = str(tmp_path / f"{k}.nii.gz")
    wf = _workflow(workflow_type, files, **override)
    wf.initialize()
    assert wf.check_properties() == []
    assert isinstance(wf.network_def, torch.nn.Module)
    if workflow_type == "train":
        from monai.inferers import SimpleInferer

        # schedule: auto -> the paper's 300 epochs with CUDA, the CPU schedule's 8 without (scripts/schedule.py)
        assert wf.max_epochs == (300 if torch.cuda.is_available() else 8) and len(wf.train_dataset) == 2
        assert isinstance(wf.train_inferer, SimpleInferer)
        assert type(wf.evaluator).__name__ == "RegistrationEvaluator"
    else:
        assert type(wf.evaluator).__name__ == "Evaluator" and wf.handlers == [] and len(wf.dataset) == 1


# ----------------------------------------------------------------------------------------- monai.bundle.load
@pytest.mark.parametrize("workflow_type", ["inference", "train"])
def test_load_returns_network_with_weights(workflow_type, tmp_path, monkeypatch):
    """monai.bundle.load on the bundle folder (no download: models/model.pt exists) builds network_def from
    configs/<workflow_type>.json and loads the shipped weights into it."""
    from monai.bundle import load

    monkeypatch.chdir(tmp_path)  # a second pipeline elsewhere; only the bundle folder is on sys.path
    net = load(name=ROOT.name, bundle_dir=str(ROOT.parent), workflow_type=workflow_type, device="cpu", progress=False)
    assert isinstance(net, torch.nn.Module), f"load() returned {type(net).__name__}, not the network"
    ref = torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = net.state_dict()
    assert set(state) == set(ref), "network_def and models/model.pt have different parameters"
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k
    if workflow_type == "inference":
        assert not any(tmp_path.iterdir()), "monai.bundle.load(workflow_type='inference') wrote into the cwd"


@pytest.mark.slow
def test_second_pipeline_forward(trained):
    """Another MONAI pipeline: the network from monai.bundle.load, MONAI's LoadImage and Warp, on a test pair of the
    phantom written by the training above: the myocardium overlap and the image residual improve over identity."""
    from monai.bundle import load
    from monai.networks.blocks import Warp
    from monai.transforms import LoadImage

    net = load(name=ROOT.name, bundle_dir=str(ROOT.parent), workflow_type="inference", device="cpu", progress=False)
    data = trained / "data"
    item = json.loads((data / "datalist.json").read_text())["test"][0]
    read = LoadImage(image_only=True, ensure_channel_first=True)
    m, f, ml, fl = (read(str(data / item[k]))[None].float() for k in ("moving", "fixed", "moving_label", "fixed_label"))
    with torch.no_grad():
        ddf = net.eval()(torch.cat([m, f], 1))
    assert ddf.shape == (1, 2, 128, 128)

    def dice(a, b):
        a, b = a.round() == 2, b.round() == 2
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    warped, warped_label = Warp("bilinear", "border")(m, ddf), Warp("nearest", "border")(ml, ddf)
    assert dice(warped_label, fl) > dice(ml, fl) + 0.15, (dice(warped_label, fl), dice(ml, fl))
    assert float(((warped - f) ** 2).mean()) < 0.8 * float(((m - f) ** 2).mean())


# ------------------------------------------------------------------------------------------------ JSON twins
def test_json_configs_equal_yaml():
    bad = stale()
    assert not bad, f"{bad} differ from their YAML source: run `{COMMAND}` (the YAML is the source of truth)."
    for y in sorted(CONFIGS.glob("*.yaml")):
        assert json.loads(y.with_suffix(".json").read_text()) == yaml.safe_load(y.read_text()), y.name


def test_configs_json_detects_and_fixes_stale(tmp_path):
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    configs_json(str(cfg))  # the copy up to date, whatever the state of the working tree
    assert stale(cfg) == []
    text = (cfg / "inference.yaml").read_text().replace("uncertainty: false", "uncertainty: true", 1)
    (cfg / "inference.yaml").write_text(text)
    assert stale(cfg) == ["inference.json"]
    with pytest.raises(SystemExit, match="configs_json"):
        configs_json(str(cfg), check=True)
    configs_json(str(cfg))
    assert stale(cfg) == []
    assert json.loads((cfg / "inference.json").read_text())["uncertainty"] is True


# ------------------------------------------------------------------------------------------- the zoo's own CI
@pytest.mark.slow
def test_model_zoo_verify_bundle_full(tmp_path):
    """The model zoo's ci/verify_bundle.py -m full, unmodified, offline (python -m bundle zoo_ci; docs/zoo.md)."""
    import os
    import subprocess
    import sys

    zoo = os.environ.get("MODEL_ZOO")
    if not zoo:
        pytest.skip("set MODEL_ZOO to a Project-MONAI/model-zoo checkout or bare git dir to run the zoo's CI")
    cmd = [sys.executable, "-m", "bundle", "zoo_ci", "--zoo", zoo, "--mode", "full", "--work_dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "data shape is verified correctly." in r.stdout and "verify_bundle.py -m full: OK" in r.stdout
