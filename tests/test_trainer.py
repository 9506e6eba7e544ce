"""CollaborativeTrainer: the alternating schedule, which optimizer changes which network, modes and options."""

import copy

import pytest
import torch
from monai.networks.nets import UNet

from _pairs import toy_pairs
from scripts.losses import BetaNLLLoss, GaussianNLLLoss, GradientSmoothnessLoss, SNRWeightedMSELoss
from scripts.networks import VoxelMorphDisplacement
from scripts.trainer import CollaborativeTrainer, RegistrationEvaluator, as_flag, label_pair

torch.manual_seed(0)


def nets(spatial_dims=2):
    disp = VoxelMorphDisplacement(spatial_dims, channels=(4, 8, 8, 8), final_conv_channels=(4,), init_std=1e-2)
    var = UNet(spatial_dims, 2, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    return disp, var


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def changed(before, net):
    return any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def make_trainer(mode="collaborative", epochs=1, **kw):
    disp, var = nets()
    loader = torch.utils.data.DataLoader(toy_pairs(), batch_size=1)
    sim = {"collaborative": SNRWeightedMSELoss(), "vanilla": torch.nn.MSELoss(), "joint": GaussianNLLLoss()}[mode]
    trainer = CollaborativeTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=disp,
        optimizer=torch.optim.Adam(disp.parameters(), 1e-3),
        sim_loss=sim,
        reg_loss=GradientSmoothnessLoss(),
        variance_network=None if mode == "vanilla" else var,
        variance_optimizer=None if mode == "vanilla" else torch.optim.Adam(var.parameters(), 1e-3),
        variance_loss=BetaNLLLoss(),
        mode=mode,
        **kw,
    )
    return trainer, disp, var


@pytest.mark.parametrize("reuse", [False, True])
def test_collaborative_iteration_updates_both_and_outputs_everything(reuse):
    trainer, disp, var = make_trainer(reuse_warped=reuse)
    d0, v0 = params(disp), params(var)
    trainer.run()
    assert changed(d0, disp) and changed(v0, var)
    out = trainer.state.output
    for k in ("warped", "ddf", "log_var", "weight", "moving", "fixed", "moving_label", "fixed_label"):
        assert isinstance(out[k], torch.Tensor), k
    for k in ("loss", "loss_sim", "loss_reg", "loss_var"):
        assert isinstance(out[k], float) and torch.isfinite(torch.tensor(out[k])), k
    assert out["weight"].min() >= 0.5 and out["weight"].max() <= 0.7311
    assert out["ddf"].shape == (1, 2, 16, 16) and out["log_var"].shape == (1, 1, 16, 16)
    # each network is stepped by its own optimizer only; no stale gradient is left in the displacement net
    assert all(p.grad is None for p in disp.parameters())


def test_variance_step_never_touches_the_displacement_net():
    # var warm-up phase: only the variance step runs
    trainer, disp, var = make_trainer(disp_warmup_epochs=0, var_warmup_epochs=1)
    d0, v0 = params(disp), params(var)
    trainer.run()
    assert not changed(d0, disp) and changed(v0, var)


def test_displacement_step_never_touches_the_variance_net():
    trainer, disp, var = make_trainer(variance_every=1000)  # variance step never due
    d0, v0 = params(disp), params(var)
    trainer.run()
    assert changed(d0, disp) and not changed(v0, var)
    assert trainer.state.output["loss_var"] is None


def test_displacement_warmup_uses_unit_weights_and_skips_variance():
    trainer, disp, var = make_trainer(disp_warmup_epochs=1)
    v0 = params(var)
    trainer.run()
    assert not changed(v0, var)
    assert torch.all(trainer.state.output["weight"] == 1.0)


def test_coupling_option_sends_variance_gradients_into_displacement_net():
    trainer, disp, var = make_trainer(couple_variance_grad=True)
    trainer.run()
    grads = [p.grad for p in disp.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # carried over to the next displacement update


def test_vanilla_mode_has_no_variance_net():
    trainer, disp, _ = make_trainer("vanilla")
    d0 = params(disp)
    trainer.run()
    assert changed(d0, disp)
    assert trainer.state.output["log_var"] is None and trainer.state.output["loss_var"] is None


def test_joint_mode_trains_both_on_one_objective():
    trainer, disp, var = make_trainer("joint")
    d0, v0 = params(disp), params(var)
    trainer.run()
    assert changed(d0, disp) and changed(v0, var)


def test_missing_variance_parts_is_a_clear_error():
    disp, _ = nets()
    with pytest.raises(ValueError, match="variance_network"):
        CollaborativeTrainer("cpu", 1, [], disp, torch.optim.Adam(disp.parameters()), SNRWeightedMSELoss())


def test_evaluator_outputs_contract_and_label_dice_pair():
    disp, var = nets()
    loader = torch.utils.data.DataLoader(toy_pairs(), batch_size=2)
    ev = RegistrationEvaluator("cpu", loader, disp, var, weight_fn=SNRWeightedMSELoss().weight_map)
    ev.run()
    out = ev.state.output
    assert out["warped_label"].shape == (2, 1, 16, 16)
    assert set(out["warped_label"].unique().tolist()) <= {0.0, 2.0}  # nearest warping keeps labels
    y_pred, y = label_pair(out, 2)
    assert y_pred.shape == y.shape and set(y.unique().tolist()) <= {0.0, 1.0}


def test_voxelmorph_displacement_matches_authors_size_and_traces():
    for dims, count in ((2, 109170), (3, 327331)):
        net = VoxelMorphDisplacement(dims)
        assert sum(p.numel() for p in net.parameters()) == count
    net = VoxelMorphDisplacement(2).eval()
    x = torch.rand(1, 2, 32, 32)
    ddf = net(x)
    assert ddf.shape == (1, 2, 32, 32) and net.last_velocity.shape == (1, 2, 16, 16)
    assert ddf.abs().max() < 1e-2  # initialised near identity
    copy.deepcopy(net)  # the cached velocity must not break copies
    # MONAI's Warp (inside DVF2DDF) is not scriptable: TorchScript export traces the network
    traced = torch.jit.trace(net, x)
    y = torch.rand(1, 2, 32, 32)
    assert torch.allclose(traced(y), net(y), atol=1e-6)


def test_as_flag_parses_command_line_strings():
    assert as_flag("true") and as_flag("True") and as_flag(1) and not as_flag("false") and not as_flag(False)
    with pytest.raises(ValueError):
        as_flag("maybe")


@pytest.mark.parametrize("mode", ["collaborative", "joint"])
def test_amp_iteration_is_finite_and_outputs_float32(mode):
    # on CPU, autocast runs in bfloat16; the losses are computed in float32
    trainer, disp, var = make_trainer(mode, amp=True)
    d0 = params(disp)
    trainer.run()
    out = trainer.state.output
    assert changed(d0, disp)
    assert all(torch.isfinite(torch.tensor(out[k])) for k in ("loss", "loss_sim", "loss_reg"))
    assert out["ddf"].dtype == torch.float32 and out["log_var"].dtype == torch.float32
