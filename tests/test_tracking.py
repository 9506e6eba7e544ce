"""Tracking: TensorBoard images and learning rates (scripts/tracking.py), MLflow through `--tracking mlflow`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from scripts.tracking import LearningRateLogger, RegistrationImageHandler, decollated_view

ROOT = Path(__file__).resolve().parents[1]


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def _decode(image_event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string))).astype(np.float64)


def _output(epoch: int, with_variance: bool = True) -> dict:
    g = torch.Generator().manual_seed(epoch)
    img = lambda: torch.rand(2, 1, 8, 8, generator=g)  # noqa: E731
    out = {"moving": img(), "fixed": img(), "warped": img(), "log_var": None, "weight": None}
    if with_variance:
        out["log_var"] = torch.randn(2, 1, 8, 8, generator=g)
        out["weight"] = torch.sigmoid(torch.randn(2, 1, 8, 8, generator=g))
    return out


def test_image_handler_writes_every_validation(tmp_path):
    outputs = {}

    def step(engine, batch):
        out = _output(engine.state.epoch * 10 + engine.state.iteration)
        outputs.setdefault(engine.state.epoch, out)  # the first iteration of each run is the one shown
        return out

    evaluator = Engine(step)
    RegistrationImageHandler(log_dir=str(tmp_path), index=1).attach(evaluator)
    evaluator.run([0, 1, 2], max_epochs=2)
    ea = _events(tmp_path)
    tags = {f"val/{k}_HW_0" for k in ("moving", "fixed", "warped", "sigma2", "weight")}
    assert tags <= set(ea.Tags()["images"])
    for t in tags:
        assert [e.step for e in ea.Images(t)] == [1, 2]
    # the sigma^2 image of epoch 2 is exp(log_var) of item 1 of the first batch, min-max scaled to 0..255
    s2 = torch.exp(outputs[2]["log_var"][1, 0]).numpy()
    expected = (s2 - s2.min()) / (s2.max() - s2.min()) * 255
    got = _decode(ea.Images("val/sigma2_HW_0")[1])
    got = got[..., 0] if got.ndim == 3 else got
    assert np.abs(got - expected).max() <= 1.0


def test_image_handler_without_variance(tmp_path):
    evaluator = Engine(lambda e, b: _output(1, with_variance=False))
    RegistrationImageHandler(log_dir=str(tmp_path)).attach(evaluator)
    evaluator.run([0], max_epochs=1)
    assert set(_events(tmp_path).Tags()["images"]) == {f"val/{k}_HW_0" for k in ("moving", "fixed", "warped")}
    with pytest.raises(ValueError, match="unknown image keys"):
        RegistrationImageHandler(log_dir=str(tmp_path), keys=("ddf",))


def test_learning_rates_of_both_optimizers(tmp_path):
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt1, opt2 = torch.optim.Adam([w1], lr=1e-3), torch.optim.Adam([w2], lr=2e-4)
    trainer = Engine(lambda e, b: None)
    LearningRateLogger(str(tmp_path), {"displacement": opt1, "variance": opt2, "none": None}).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def halve(_):
        for g in opt1.param_groups:
            g["lr"] *= 0.5

    trainer.run([0, 1], max_epochs=3)
    ea = _events(tmp_path)
    d = [(e.step, e.value) for e in ea.Scalars("displacement/lr/group_0")]
    v = [(e.step, e.value) for e in ea.Scalars("variance/lr/group_0")]
    assert [s for s, _ in d] == [1, 2, 3]
    np.testing.assert_allclose([x for _, x in d], [1e-3, 5e-4, 2.5e-4], rtol=1e-6)
    np.testing.assert_allclose([x for _, x in v], [2e-4] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="no optimizer"):
        LearningRateLogger(str(tmp_path), {"variance": None})


@pytest.mark.slow
def test_mlflow_tracking(tmp_path):
    """`monai.bundle run --config_file configs/train.yaml --tracking mlflow`: MONAI's DEFAULT_MLFLOW_SETTINGS add
    MLFlowHandlers to train#handlers and validate#handlers; the store is the local file output_dir/mlruns.db
    (MLflow >= 3 refuses the plain-folder `file:` store)."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install .[tracking])")
    from monai.bundle import run

    out = tmp_path / "run"
    run(
        run_id="run",
        config_file=str(ROOT / "configs" / "train.yaml"),
        bundle_root=str(ROOT),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(out),
        phantom={"kind": "echo2d", "n_train": 2, "n_val": 2, "n_test": 2, "seed": 0},
        max_epochs=2,
        epoch_length=2,
        num_workers=0,
        tracking="mlflow",
        experiment_name="bundle_test",
    )
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("bundle_test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    assert len(client.get_metric_history(rid, "train_loss")) == 4  # every iteration
    dice = [m.step for m in client.get_metric_history(rid, "val_myo_dice")]
    assert dice == [1, 2]  # every validation
    assert list(out.glob("config_*.json")), "the executed config is saved (and logged as an artifact)"


@pytest.mark.slow
def test_decollated_view_wraps_mlflow_handlers_only(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install .[tracking])")
    from monai.handlers import MLFlowHandler, StatsHandler, from_engine

    ml = MLFlowHandler(
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", output_transform=from_engine(["loss"], first=True)
    )
    stats = StatsHandler(output_transform=lambda x: x)
    before = stats.output_transform
    out = decollated_view([stats, ml, None])
    assert out[0].output_transform is before and out[2] is None
    loss = torch.tensor(0.25)
    assert ml.output_transform({"loss": loss, "ddf": torch.zeros(1)}) is loss  # the dict output of the trainer
    assert ml.output_transform([{"loss": loss}]) is loss  # a decollated output is passed through
    wrapped = ml.output_transform
    decollated_view([ml])
    assert ml.output_transform is wrapped  # applied once
