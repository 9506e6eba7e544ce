"""Speed options (scripts/performance.py) and the subset-per-epoch / whole-split-at-the-end validation of train.yaml."""

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.networks import VoxelMorphDisplacement
from scripts.performance import prepare_network


def test_prepare_network_defaults_leave_the_network_as_it_is():
    net = VoxelMorphDisplacement(spatial_dims=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = prepare_network(net, "cpu")
    assert out is net
    assert all(torch.equal(before[k], v) for k, v in out.state_dict().items())


def test_channels_last_changes_the_layout_not_the_result():
    torch.manual_seed(0)
    net = VoxelMorphDisplacement(spatial_dims=2).eval()
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        ref = net(x)
    prepare_network(net, "cpu", channels_last=True)
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-5)


@pytest.mark.slow
def test_compile_option_wraps_the_module():
    conv = torch.nn.Conv2d(1, 1, 3)
    net = prepare_network(conv, "cpu", compile="true")
    # torch.compile's OptimizedModule around the same module (compiled lazily, at the first forward: not run here)
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) and net._orig_mod is conv
    assert prepare_network(conv, "cpu", compile="false") is conv  # the string from the command line, off


def test_epoch_validation_on_a_subset_then_the_whole_split(tmp_path):
    parser = ConfigParser()
    parser.read_config("configs/train.yaml")
    parser.update(
        {
            "dataset_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "run"),
            "phantom": {"kind": "echo2d", "n_train": 2, "n_val": 3, "n_test": 0, "size": 32, "progress": False},
            "spatial_size": [32, 32],
            "max_epochs": 1,
            "epoch_length": 1,
            "val_max_pairs": 2,
            "variance_level_init_batches": 0,
        }
    )
    (tmp_path / "run").mkdir()
    trainer = parser.get_parsed_content("train#trainer")
    seen = {"epoch": [], "full": []}
    val, full = parser.get_parsed_content("validate#evaluator"), parser.get_parsed_content("validate_full#evaluator")
    from ignite.engine import Events

    val.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen["epoch"].append(e.state.iteration))
    full.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen["full"].append(e.state.iteration))
    trainer.run()
    assert seen["epoch"] == [1, 2]  # the first val_max_pairs pairs, every val_interval epochs
    assert seen["full"] == [1, 2, 3]  # every validation pair, once, after the last epoch
    assert 0.0 <= trainer.state.full_validation["val_myo_dice"] <= 1.0
