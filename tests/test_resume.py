"""Checkpoints and resume (scripts/checkpoint.py, configs/train.yaml): atomic saves, the newest intact checkpoint,
an exact resume, the best model kept across resumes, keep-last-N across resumes, and kill tests in a subprocess."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.bundle import ConfigParser

from scripts.checkpoint import (
    AtomicDiskSaver,
    CheckpointSaver,
    CorruptCheckpointError,
    ResumeFromLatest,
    ValidationState,
    load_weights,
    newest_intact_checkpoint,
    read_checkpoint,
)
from scripts.data import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "spatial_size": [64, 64],
    "phantom#size": 64,
    "phantom#n_train": 4,
    "phantom#n_val": 2,
    "phantom#n_test": 2,
    "epoch_length": 2,  # 4 training pairs, 2 per epoch: one pass over the data spans two epochs
    "num_workers": 0,
    "log_every": 1,
    "device": "$torch.device('cpu')",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    ds = tmp_path_factory.mktemp("resume") / "phantom"
    prepare_dataset(str(ds), {"kind": "echo2d", "n_train": 4, "n_val": 2, "n_test": 2, "seed": 0, "size": 64})
    return ds


def train(out: Path, dataset: Path, max_epochs: int, resume: bool = False, **overrides) -> ConfigParser:
    """configs/train.yaml's `initialize` then `training` in this process (as `monai.bundle run training` does), with
    the tiny settings."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    settings = {"bundle_root": str(ROOT), "dataset_dir": str(dataset), "output_dir": str(out), **TINY}
    settings.update(max_epochs=max_epochs, resume=resume, **overrides)
    for k, v in settings.items():
        parser[k] = v
    parser.parse()
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("training")
    return parser


def max_weight_diff(a: Path, b: Path, keys=("network", "variance")) -> float:
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return max((ca[k][n].double() - cb[k][n].double()).abs().max().item() for k in keys for n in ca[k])


def epochs_on_disk(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in ckpt_dir.glob("checkpoint_epoch=*.pt"))


# ------------------------------------------------------------------------------------------------ exact resume
@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run in this process (checkpoint_epoch=2.pt, =3.pt and checkpoint_final.pt)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(out, dataset, 3)
    return out


def test_resumed_run_equals_the_uninterrupted_one(dataset, uninterrupted, tmp_path, caplog):
    res, ctl = tmp_path / "resumed", tmp_path / "no_rng"
    train(res, dataset, 1)
    shutil.copytree(res, ctl)
    with caplog.at_level(logging.INFO, logger="scripts.checkpoint"):
        train(res, dataset, 2, resume=True)
    assert "resumed from" in caplog.text and "checkpoint_epoch=1.pt" in caplog.text
    assert "data order restored (2 batches" in caplog.text  # epoch 2 continues the pass epoch 1 began
    ref, final = uninterrupted / "checkpoints" / "checkpoint_epoch=2.pt", res / "checkpoints" / "checkpoint_final.pt"
    assert max_weight_diff(ref, final) <= 1e-6
    st_ref, st_res = (torch.load(f, weights_only=True) for f in (ref, final))
    assert st_ref["validation"] == st_res["validation"] and st_ref["validation"]["best_metric_epoch"] >= 1
    assert st_ref["optimizer"]["state"][0]["step"] == st_res["optimizer"]["state"][0]["step"] == 4

    # control: the same resume without the RNG entry draws other batches and ends elsewhere
    without_rng = (
        "$scripts.checkpoint.checkpoint_dict(network=@network, variance=@variance_net, optimizer=@optimizer, "
        "optimizer_variance=@variance_optimizer, trainer=@train#trainer, validation=@validate#state)"
    )
    train(ctl, dataset, 2, resume=True, **{"train#checkpoint_dict": without_rng})
    assert max_weight_diff(ref, ctl / "checkpoints" / "checkpoint_final.pt") > 1e-5


def test_keep_last_n_holds_across_resumes(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns("logs"))
    ckpt = out / "checkpoints"
    assert epochs_on_disk(ckpt) == [2, 3]  # n_saved: 2
    # an older file that the new process does not know of (before this fix: never removed)
    shutil.copy(ckpt / "checkpoint_epoch=2.pt", ckpt / "checkpoint_epoch=1.pt")
    train(out, dataset, 4, resume=True)
    assert epochs_on_disk(ckpt) == [3, 4]


def test_truncated_and_empty_newest_checkpoints_are_skipped_and_named(uninterrupted, tmp_path, caplog):
    data = (uninterrupted / "checkpoints" / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(data)
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(data[: len(data) // 2])  # a save killed half-way (in place)
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"")  # a save killed before its first byte
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="scripts.checkpoint"):
        path, obj, skipped = newest_intact_checkpoint(tmp_path, ["network", "trainer", "no_such_entry"])
    assert path is None and len(skipped) == 4 and "missing entries ['no_such_entry']" in skipped[0][1]
    (tmp_path / "checkpoint_epoch=4.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="scripts.checkpoint"):
        path, obj, skipped = newest_intact_checkpoint(tmp_path, ["network", "trainer"])
    assert path.name == "checkpoint_epoch=1.pt" and obj["trainer"]["iteration"] == 4
    assert [p.name for p, _ in skipped] == ["checkpoint_epoch=3.pt", "checkpoint_epoch=2.pt"]
    assert "empty (0 bytes)" in skipped[0][1] and "truncated or corrupt" in skipped[1][1]
    assert "skipping" in caplog.text and "checkpoint_epoch=2.pt: truncated or corrupt" in caplog.text


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint_epoch=N.pt.*\n.*checkpoint_epoch=1.pt.*0 bytes"):
        ResumeFromLatest(str(tmp_path), {"network": torch.nn.Linear(1, 1)}).attach(Engine(lambda e, b: None))
    # disabled: nothing is read
    ResumeFromLatest(str(tmp_path), {"network": torch.nn.Linear(1, 1)}, enabled="false").attach(Engine(lambda e, b: 0))


def test_resume_beyond_max_epochs_is_a_clear_error(tmp_path):
    done = Engine(lambda e, b: None)
    done.run([0, 0], max_epochs=3)
    torch.save({"trainer": done.state_dict()}, tmp_path / "checkpoint_epoch=3.pt")
    engine = Engine(lambda e, b: None)
    ResumeFromLatest(str(tmp_path), {"trainer": engine}).attach(engine)
    with pytest.raises(ValueError, match=r"checkpoint_epoch=3.pt is at epoch 3, beyond max_epochs=2: pass a larger"):
        engine.run([0, 0], max_epochs=2)


# --------------------------------------------------------------------------------------------- best model.pt
def _validation(tmp_path: Path, scores: list[float], state: dict | None = None):
    """A validation engine whose i-th epoch has the key metric scores[i] and a network whose weight is that score,
    with a model.pt saver, optionally restored from ``state`` (a ValidationState dict)."""
    net = torch.nn.Linear(1, 1, bias=False)
    evaluator = Engine(lambda e, b: None)
    saver = CheckpointSaver(str(tmp_path), {"network": net}, save_key_metric=True, key_metric_name="dice",
                            key_metric_filename="model.pt")  # fmt: skip
    runs = iter(range(len(scores)))

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):
        i = next(runs)
        net.weight.data.fill_(scores[i])
        engine.state.metrics = {"dice": scores[i]}

    saver.attach(evaluator)
    vstate = ValidationState(evaluator, [None, saver])
    if state is not None:
        vstate.load_state_dict(state)
    return evaluator, vstate


def _weight(tmp_path: Path) -> float:
    return torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item()


def test_best_model_is_never_replaced_by_a_worse_epoch_after_resume(tmp_path):
    ev, vstate = _validation(tmp_path, [0.8])
    ev.run([0], max_epochs=1)
    assert _weight(tmp_path) == pytest.approx(0.8)
    state = vstate.state_dict()
    assert state["savers"]["model.pt"]["_saved"][0][0] == pytest.approx(0.8)
    # the resumed process: a worse epoch (0.5) keeps model.pt, a better one (0.9) replaces it
    ev, _ = _validation(tmp_path, [0.5, 0.9], state)
    ev.run([0], max_epochs=1)
    assert _weight(tmp_path) == pytest.approx(0.8)
    ev.run([0], max_epochs=2)
    assert _weight(tmp_path) == pytest.approx(0.9)
    # control: without the restored state the worse epoch overwrites the best model (the bug of issue 12)
    ev, _ = _validation(tmp_path / "ctl", [0.8])
    ev.run([0], max_epochs=1)
    ev, _ = _validation(tmp_path / "ctl", [0.5])
    ev.run([0], max_epochs=1)
    assert _weight(tmp_path / "ctl") == pytest.approx(0.5)


def test_no_variance_network_saves_nothing_for_it_and_resumes_without_it(tmp_path):
    """``variance_def: null``: the savers, the validation state and the resume take ``None`` entries as absent."""
    net = torch.nn.Linear(1, 1, bias=False)
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "metrics", {"dice": 0.5}))
    savers = [
        CheckpointSaver(str(tmp_path), {"network": net}, save_key_metric=True, key_metric_name="dice",
                        key_metric_filename="model.pt"),
        CheckpointSaver(str(tmp_path), {"variance": None}, save_key_metric=True, key_metric_name="dice",
                        key_metric_filename="variance.pt"),
    ]  # fmt: skip
    assert [s.enabled for s in savers] == [True, False] and savers[1].key_metric_filename is None
    for s in savers:
        s.attach(evaluator)
    vstate = ValidationState(evaluator, savers)
    evaluator.run([0], max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # variance.pt is simply not written
    assert sorted(vstate.state_dict()["savers"]) == ["model.pt"]
    # the training checkpoint: None entries are dropped, and the resume loads the others
    trainer = Engine(lambda e, b: None)
    opt = torch.optim.Adam(net.parameters())
    save_dict = {"network": net, "variance": None, "optimizer": opt, "optimizer_variance": None, "trainer": trainer}
    ckpt = CheckpointSaver(str(tmp_path / "ck"), save_dict, save_interval=1, n_saved=2)
    assert sorted(ckpt.save_dict) == ["network", "optimizer", "trainer"]
    ckpt.attach(trainer)
    trainer.run([0, 0], max_epochs=1)
    assert sorted(torch.load(tmp_path / "ck" / "checkpoint_epoch=1.pt", weights_only=True)) == [
        "network", "optimizer", "trainer"
    ]  # fmt: skip
    resumed = Engine(lambda e, b: None)
    loader = ResumeFromLatest(str(tmp_path / "ck"), {**save_dict, "trainer": resumed})
    loader.attach(resumed)
    assert loader.required_keys == ["network", "optimizer", "trainer"]
    resumed.run([0, 0], max_epochs=2)
    assert resumed.state.epoch == 2 and resumed.state.iteration == 4


# ------------------------------------------------------------------------------------------------ atomic saves
def test_atomic_save_keeps_the_previous_file_when_a_save_fails(tmp_path):
    good = {"w": torch.arange(10.0)}
    bad = {"w": torch.zeros(100_000), "x": lambda: None}  # torch.save writes the tensor, then fails to pickle
    plain = DiskSaver(tmp_path / "plain", atomic=False, require_empty=False)  # MONAI's saver: in place
    plain(good, "c.pt")
    with pytest.raises(Exception):
        plain(bad, "c.pt")
    with pytest.raises(CorruptCheckpointError, match="c.pt"):  # the in-place write left a damaged file
        read_checkpoint(tmp_path / "plain" / "c.pt")

    atomic = AtomicDiskSaver(tmp_path / "atomic")
    atomic(good, "c.pt")
    with pytest.raises(Exception):
        atomic(bad, "c.pt")
    assert torch.equal(read_checkpoint(tmp_path / "atomic" / "c.pt")["w"], good["w"])
    assert sorted(p.name for p in (tmp_path / "atomic").iterdir()) == ["c.pt"]  # no temporary left
    assert (tmp_path / "atomic" / "c.pt").stat().st_mode & 0o044 == (0o644 & ~_umask()) & 0o044


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_best_model_file_exists_at_every_moment_of_its_replacement(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"w": torch.ones(1)}, "network_key_metric=0.5.pt")
    saver.remove("network_key_metric=0.5.pt")  # what Ignite does before writing a better one
    assert (tmp_path / "model.pt").is_file()
    saver({"w": torch.full((1,), 2.0)}, "network_key_metric=0.7.pt")
    assert read_checkpoint(tmp_path / "model.pt")["w"].item() == 2.0
    # the train config writes every checkpoint through it
    saver = CheckpointSaver(str(tmp_path), {"n": torch.nn.Linear(1, 1)}, save_final=True, save_key_metric=True,
                            key_metric_filename="model.pt", save_interval=1, n_saved=2)  # fmt: skip
    for c in (saver._final_checkpoint, saver._key_metric_checkpoint, saver._interval_checkpoint):
        assert isinstance(c.save_handler, AtomicDiskSaver)


# --------------------------------------------------------------------------------------------- weights errors
def test_load_weights_names_empty_truncated_and_unsafe_files(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weight": net.weight, "obj": logging.Formatter()}, tmp_path / "unsafe.pt")
    assert load_weights(net, tmp_path / "ok.pt") is net
    with pytest.raises(CorruptCheckpointError, match=r"empty.pt: the checkpoint is empty \(0 bytes\)"):
        load_weights(net, tmp_path / "empty.pt")
    with pytest.raises(CorruptCheckpointError, match=r"half.pt: truncated or corrupt checkpoint"):
        load_weights(net, tmp_path / "half.pt", "network")
    with pytest.raises(CorruptCheckpointError, match=r"unsafe.pt: not a weights-only checkpoint"):
        load_weights(net, tmp_path / "unsafe.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(net, tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------- kill tests (subprocess)
def _command(out: Path, dataset: Path, max_epochs: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
           "--dataset_dir", str(dataset), "--output_dir", str(out), "--max_epochs", str(max_epochs)]  # fmt: skip
    for k, v in TINY.items():
        cmd += [f"--{k}", str(v).replace(" ", "")]
    return cmd + list(extra)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (subprocess)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_command(out, dataset, 3))
    return out


@pytest.mark.slow
def test_kill_mid_training_then_resume_matches_the_uninterrupted_run(dataset, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, dataset, 3), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "checkpoint_epoch=1.pt"
    deadline = time.monotonic() + 240
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)  # no handler runs: what a crash or an OOM kill does
    finally:
        proc.kill()
        proc.wait(timeout=60)
    log = _run(_command(out, dataset, 3, "--resume", "true"))
    assert "resumed from" in log
    final = "checkpoints/checkpoint_final.pt"
    assert max_weight_diff(reference / final, out / final) <= 1e-6
    assert epochs_on_disk(out / "checkpoints") == [2, 3]


@pytest.mark.slow
def test_kill_during_save_resumes_from_the_previous_intact_checkpoint(reference, dataset, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("logs"))
    (out / "checkpoints" / "checkpoint_final.pt").unlink()
    newest = out / "checkpoints" / "checkpoint_epoch=3.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # what a kill during an in-place save leaves
    stale = out / "checkpoints" / ".checkpoint_epoch=3.pt.k9x2.tmp"  # what a kill during an atomic save leaves
    stale.write_bytes(data[:1000])
    log = _run(_command(out, dataset, 3, "--resume", "true"))
    assert "skipping" in log and "checkpoint_epoch=3.pt: truncated or corrupt checkpoint" in log
    assert not stale.exists() and "a checkpoint save that was interrupted" in log
    assert "resumed from" in log and "checkpoint_epoch=2.pt" in log
    final = "checkpoints/checkpoint_final.pt"
    assert max_weight_diff(reference / final, out / final) <= 1e-6
    assert torch.load(newest, weights_only=True)["trainer"]["iteration"] == 6
