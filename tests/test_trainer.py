"""CollaborativeTrainer: the alternating schedule, which optimizer changes which network, modes and options."""

import copy
from pathlib import Path

import pytest
import torch
from _pairs import toy_pairs
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from scripts.evaluator import RegistrationEvaluator, label_pair
from scripts.losses import BetaNLLLoss, GradientSmoothnessLoss, HeteroscedasticNLLLoss, SNRWeightedMSELoss
from scripts.networks import VoxelMorphDisplacement, network_forward
from scripts.trainer import CollaborativeIterationEvents, CollaborativeTrainer, prepare_registration_batch
from scripts.utils import adam_or_none, as_flag

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
    sim = {
        "collaborative": SNRWeightedMSELoss(),
        "vanilla": torch.nn.MSELoss(),
        "joint": HeteroscedasticNLLLoss(),
    }[mode]
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


@pytest.mark.parametrize("couple", [False, True])
def test_coupling_option_sends_variance_gradients_into_displacement_net(couple):
    trainer, disp, var = make_trainer(couple_variance_grad=couple)
    expected = {}

    @trainer.on(CollaborativeIterationEvents.VARIANCE_LOSS_COMPLETED)
    def _grad_of_variance_loss(engine):  # ∂L_var/∂θ of this iteration, before the variance backward
        loss = engine.state.output["loss_var"]
        expected["g"] = torch.autograd.grad(loss, list(disp.parameters()), retain_graph=True, allow_unused=True)

    trainer.run()
    if not couple:  # Î_f detached: L_var does not depend on θ, and nothing is left in q_θ after its step
        assert all(g is None for g in expected["g"]) and all(p.grad is None for p in disp.parameters())
        return
    # coupled: exactly ∂L_var/∂θ of the last iteration is left in q_θ, carried over to the next displacement update
    assert any(g is not None and g.abs().sum() > 0 for g in expected["g"])
    for p, g in zip(disp.parameters(), expected["g"]):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)


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
    ddf2, field = net(x, return_field=True)
    assert ddf.shape == (1, 2, 32, 32) and field.shape == (1, 2, 16, 16) and torch.equal(ddf2, ddf)
    assert ddf.abs().max() < 1e-2  # initialised near identity
    # MONAI's Warp (inside DVF2DDF) is not scriptable: TorchScript export traces the network (the DDF alone)
    traced = torch.jit.trace(net, x)
    y = torch.rand(1, 2, 32, 32)
    assert torch.allclose(traced(y), net(y), atol=1e-6)
    # the regulariser's field is the velocity of the network's own forward, for wrapped networks too
    assert torch.equal(network_forward(net, y)[1], net(y, return_field=True)[1])
    assert torch.equal(network_forward(_Wrapper(net), y)[1], net(y, return_field=True)[1])
    plain = torch.nn.Conv2d(2, 2, 3, padding=1)  # a network without return_field: its DDF is the field
    d, f = network_forward(plain, y)
    assert f is d and d.shape == (1, 2, 32, 32)
    # integration_steps=0: the DDF is the field
    d, f = VoxelMorphDisplacement(2, integration_steps=0)(y, return_field=True)
    assert f is d


class _Wrapper(torch.nn.Module):
    """As DistributedDataParallel: the network as ``.module``, keyword arguments passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_no_variance_network_is_handled_in_code():
    """``variance_def: null``: ``adam_or_none`` gives no optimizer, ``prepare_network`` no network, and vanilla
    training and the evaluator run with ``None`` for both."""
    from scripts.performance import prepare_network

    disp, var = nets()
    assert adam_or_none(None, 1e-4) is None and prepare_network(None, "cpu") is None
    opt = adam_or_none(var, 3e-4, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 3e-4
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["params"] == list(var.parameters())
    loader = torch.utils.data.DataLoader(toy_pairs(), batch_size=1)
    trainer = CollaborativeTrainer(
        "cpu", 1, loader, disp, torch.optim.Adam(disp.parameters(), 1e-3), torch.nn.MSELoss(),
        variance_network=None, variance_optimizer=adam_or_none(None, 1e-3), mode="vanilla",
    )  # fmt: skip
    before = params(disp)
    trainer.run()
    assert changed(before, disp) and trainer.state.output["log_var"] is None
    ev = RegistrationEvaluator("cpu", loader, disp, None, weight_fn=SNRWeightedMSELoss().weight_map)
    ev.run()
    assert ev.state.output["log_var"] is None and ev.state.output["weight"] is None
    with pytest.raises(ValueError, match="variance_network"):  # the paper's mode needs h_φ: a clear error
        CollaborativeTrainer("cpu", 1, loader, disp, torch.optim.Adam(disp.parameters()), SNRWeightedMSELoss(),
                             variance_network=None, variance_optimizer=adam_or_none(None, 1e-3))  # fmt: skip


def test_as_flag_parses_command_line_strings():
    assert as_flag("true") and as_flag("True") and as_flag(1) and not as_flag("false") and not as_flag(False)
    assert as_flag("y") and not as_flag("n") and not as_flag(None) and not as_flag(0)  # monai.utils.str2bool's sets
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


# ------------------------------------------------------------------------------------------------ safety net
# Per-iteration losses and final-weight checksums of tiny seeded runs in every mode and schedule, recorded with the
# trainer before its restructuring (issue 14): any change of behaviour (order of forwards, which Î_f the variance
# step sees, which gradients are zeroed, ...) changes these numbers. Recorded with torch 2.x on CPU; the data and the
# networks are built here so that edits elsewhere (tests/_pairs.py, the config defaults) cannot move them.
REFERENCE_CASES = [
    ("collaborative", "collaborative", {}),
    ("reuse_warped", "collaborative", {"reuse_warped": True}),
    ("variance_every2", "collaborative", {"variance_every": 2}),
    ("reuse_every2", "collaborative", {"reuse_warped": True, "variance_every": 2}),
    ("warmups", "collaborative", {"disp_warmup_epochs": 1, "var_warmup_epochs": 1, "max_epochs": 3}),
    ("couple_variance_grad", "collaborative", {"couple_variance_grad": True}),
    ("vanilla", "vanilla", {}),
    ("joint", "joint", {}),
    ("joint_couple", "joint", {"couple_variance_grad": True}),
]


def _reference_pairs(n: int = 4, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    items = []
    for i in range(n):
        m = (((y - 8.0) ** 2 + (x - 8.0) ** 2) < 16).float()[None]
        f = (((y - 8.0 - 0.5 * i) ** 2 + (x - 7.0 + 0.5 * i) ** 2) < 20).float()[None]
        noise_m, noise_f = 0.05 * torch.randn(2, 1, size, size, generator=g)
        items.append(
            {
                "moving": m * 0.7 + 0.15 + noise_m * m,
                "fixed": f * 0.7 + 0.15 + noise_f * f,
                "moving_label": m * 2,
                "fixed_label": f * 2,
            }
        )
    return items


def _checksum(net) -> float:
    """Σ_k Σ_j w_kj p_kj with position-dependent w in [1, 2]: moves with any change of any parameter."""
    total = 0.0
    for p in net.parameters():
        w = torch.linspace(1.0, 2.0, p.numel(), dtype=torch.float64)
        total += float((p.detach().double().flatten() * w).sum())
    return total


class _Recorder(torch.nn.Module):
    """Wraps a network and records every input it receives and whether autograd was on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x):
        self.calls.append((x.detach().clone(), torch.is_grad_enabled()))
        return self.net(x)


def build_reference(
    mode: str, max_epochs: int = 1, n_pairs: int = 4, record_variance: bool = False, trainer_cls=None, **kw
):
    torch.manual_seed(0)
    disp = VoxelMorphDisplacement(2, channels=(4, 8, 8, 8), final_conv_channels=(4,), init_std=1e-2)
    var = UNet(2, 2, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    if record_variance:
        var = _Recorder(var)
    data = _reference_pairs()[:n_pairs]
    epoch_length = 2 if max_epochs > 1 else None
    loader = torch.utils.data.DataLoader(data[:2] if epoch_length else data, batch_size=1, shuffle=False)
    sim = {
        "collaborative": SNRWeightedMSELoss(),
        "vanilla": torch.nn.MSELoss(),
        "joint": HeteroscedasticNLLLoss(),
    }[mode]
    trainer = (trainer_cls or CollaborativeTrainer)(
        device="cpu",
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        train_data_loader=loader,
        network=disp,
        optimizer=torch.optim.Adam(disp.parameters(), 1e-2),
        sim_loss=sim,
        reg_loss=GradientSmoothnessLoss(),
        lambda_reg=0.1,
        variance_network=None if mode == "vanilla" else var,
        variance_optimizer=None if mode == "vanilla" else torch.optim.SGD(var.parameters(), 0.5),
        variance_loss=BetaNLLLoss(),
        mode=mode,
        **kw,
    )
    return trainer, disp, var, data


def trace_run(mode: str, max_epochs: int = 1, **kw):
    """(per-iteration (loss, loss_sim, loss_reg, loss_var), checksum(displacement net), checksum(variance net))."""
    trainer, disp, var, _ = build_reference(mode, max_epochs, **kw)
    losses = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(tuple(engine.state.output.get(k) for k in ("loss", "loss_sim", "loss_reg", "loss_var")))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reduction order of the convolutions depends on the thread count
    try:
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return losses, _checksum(disp), _checksum(var)


# (loss, loss_sim, loss_reg, loss_var) per iteration, checksum(displacement net), checksum(variance net)
REFERENCE = {
    "collaborative": (
        [
            (0.0216343347, 0.0216343235, 1.07485441e-07, 0.456889242),
            (0.0274263229, 0.0274245646, 1.75846726e-05, 0.07481011),
            (0.035943497, 0.0358759537, 0.000675439136, -0.112318113),
            (0.045777753, 0.0448889658, 0.00888787769, -0.167794287),
        ],
        -0.962598471272,
        -11.2373831779,
    ),
    "reuse_warped": (
        [
            (0.0216343347, 0.0216343235, 1.07485441e-07, 0.45749402),
            (0.0276836064, 0.027681848, 1.75846726e-05, 0.0702648759),
            (0.036219392, 0.0361518823, 0.000675097283, -0.106587842),
            (0.045462057, 0.044574637, 0.00887419656, -0.157670513),
        ],
        -0.953207587602,
        -11.0383642621,
    ),
    "variance_every2": (
        [
            (0.0216343347, 0.0216343235, 1.07485441e-07, None),
            (0.0282623339, 0.0282605756, 1.75846726e-05, 0.486823171),
            (0.0357256308, 0.035658095, 0.000675364747, None),
            (0.0442691818, 0.0433736704, 0.00895510241, 0.0827015936),
        ],
        -0.961812445302,
        -7.62207437752,
    ),
    "reuse_every2": (
        [
            (0.0216343347, 0.0216343235, 1.07485441e-07, None),
            (0.0282623339, 0.0282605756, 1.75846726e-05, 0.482039869),
            (0.0357525386, 0.0356850028, 0.000675364747, None),
            (0.0444282591, 0.0435321555, 0.00896104332, 0.0912431255),
        ],
        -0.967502797883,
        -7.53926537066,
    ),
    "warmups": (
        [
            (0.0375055969, 0.0375055857, 1.07485441e-07, None),
            (0.0508321226, 0.0508303531, 1.77120673e-05, None),
            (0.455946505, None, None, 0.455946505),
            (0.069382593, None, None, 0.069382593),
            (0.0168534666, 0.0167862866, 0.000671802321, -0.124200806),
            (0.0287974309, 0.0271286182, 0.0166881233, -0.20824489),
        ],
        -1.35716066381,
        -11.5324151129,
    ),
    "couple_variance_grad": (
        [
            (0.0216343347, 0.0216343235, 1.07485441e-07, 0.456889242),
            (0.0274263229, 0.0274245646, 1.75846726e-05, 0.0748480558),
            (0.0359227657, 0.0358811505, 0.000416141003, -0.11258927),
            (0.045614861, 0.0448770747, 0.00737787364, -0.166588098),
        ],
        -1.75390475419,
        -11.2178582243,
    ),
    "vanilla": (
        [
            (0.0375055969, 0.0375055857, 1.07485441e-07, None),
            (0.0508321226, 0.0508303531, 1.77120673e-05, None),
            (0.0655516312, 0.0654829741, 0.000686548767, None),
            (0.0818978027, 0.0809707418, 0.00927058514, None),
        ],
        -1.2091420846,
        -1.63417384968,
    ),
    "joint": (
        [
            (0.196167186, 0.196167171, 1.07485441e-07, None),
            (0.0301189553, 0.0301171541, 1.80125517e-05, None),
            (-0.126165852, -0.126229584, 0.00063732022, None),
            (-0.246196583, -0.247221172, 0.0102458354, None),
        ],
        1.36172234968,
        -13.036449874,
    ),
    "joint_couple": (
        [
            (0.196167186, 0.196167171, 1.07485441e-07, None),
            (0.0300783552, 0.0300765075, 1.84717755e-05, None),
            (-0.126214743, -0.126279145, 0.000644072948, None),
            (-0.243650094, -0.244822785, 0.0117268739, None),
        ],
        1.63982572441,
        -13.1124087124,
    ),
}


@pytest.mark.parametrize("name, mode, kw", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_every_mode_and_schedule_reproduces_the_reference_numbers(name, mode, kw):
    losses, disp_sum, var_sum = trace_run(mode, **kw)
    ref_losses, ref_disp, ref_var = REFERENCE[name]
    assert len(losses) == len(ref_losses)
    for it, (got, ref) in enumerate(zip(losses, ref_losses)):
        for key, g, r in zip(("loss", "loss_sim", "loss_reg", "loss_var"), got, ref):
            assert (g is None) == (r is None), (it, key, g)
            if r is not None:
                assert g == pytest.approx(r, rel=1e-6, abs=1e-8), (it, key)
    assert disp_sum == pytest.approx(ref_disp, rel=1e-6) and var_sum == pytest.approx(ref_var, rel=1e-6)


@pytest.mark.parametrize("reuse", [False, True])
def test_variance_step_sees_the_updated_displacement_net_unless_reuse_warped(reuse):
    """Authors' schedule: the variance step's Î_f comes from q_θ AFTER the displacement update of the same
    iteration; ``reuse_warped=True`` trains h_φ on the displacement step's (pre-update) Î_f instead."""
    trainer, disp, var, data = build_reference("collaborative", n_pairs=1, record_variance=True, reuse_warped=reuse)
    before = copy.deepcopy(disp)
    trainer.run()
    moving, fixed = data[0]["moving"][None], data[0]["fixed"][None]
    with torch.no_grad():
        pre = trainer.warp(moving, before(torch.cat([moving, fixed], 1)))
        post = trainer.warp(moving, disp(torch.cat([moving, fixed], 1)))
    assert (pre - post).abs().max() > 1e-4  # the update moved Î_f: the test can tell the two apart
    trained = [x for x, grad in var.calls if grad]  # the variance step's forward (the weight's forward has no grad)
    assert len(trained) == 1
    assert torch.allclose(trained[0][:, :1], pre if reuse else post, atol=1e-6)
    assert torch.equal(trained[0][:, 1:], fixed)
    # the displacement step's weight always comes from the pre-update Î_f
    assert torch.allclose(var.calls[0][0][:, :1], pre, atol=1e-6)
    assert len(var.calls) == (1 if reuse else 2)


class _TwoVarianceForwards(CollaborativeTrainer):
    """``reuse_warped`` as before issue 11: σ̂ for the weight without gradient, then a second h_φ forward, with
    gradient, on the same Î_f in the variance step."""

    def weight_log_var(self, fwd, batch, train_variance=False):
        return super().weight_log_var(fwd, batch, train_variance=False)

    def variance_step(self, batch, out):
        self.variance_network.train()
        out["log_var"] = self.variance_network(torch.cat([out["warped"].detach(), batch["fixed"]], dim=1))
        super().variance_step(batch, out)


@pytest.mark.parametrize("every", [1, 2])
def test_reuse_warped_runs_the_variance_net_once_with_the_numbers_of_two_forwards(every):
    """Issue 11: with ``reuse_warped`` the displacement step's h_φ forward (with gradient) serves the weight (detached)
    and the variance loss; h_φ is unchanged in between, so losses and both networks are bit-identical to a second
    forward."""
    runs = []
    for cls in (None, _TwoVarianceForwards):
        trainer, disp, var, _ = build_reference(
            "collaborative", record_variance=True, trainer_cls=cls, reuse_warped=True, variance_every=every
        )
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss_var"]))
        trainer.run()
        runs.append((losses, params(disp), params(var), len(var.calls)))
    (l1, d1, v1, n1), (l2, d2, v2, n2) = runs
    assert l1 == l2 and sum(x is not None for x in l1) == 4 // every
    assert all(torch.equal(a, b) for a, b in zip(d1 + v1, d2 + v2))
    assert (n1, n2) == (4, 4 + 4 // every)  # one h_φ forward per iteration instead of 1 + 1 per variance step


# ------------------------------------------------------------------------------------------------ step events
def test_variance_events_see_the_variance_optimizer_step_and_fire_in_order():
    trainer, disp, var, _ = build_reference("collaborative", n_pairs=1)
    fired, seen = [], {}
    for ev in CollaborativeIterationEvents:
        trainer.add_event_handler(ev, lambda engine, ev=ev: fired.append(ev.name))

    @trainer.on(CollaborativeIterationEvents.VARIANCE_BACKWARD_COMPLETED)
    def _before_step(engine):
        assert isinstance(engine.state.output["loss_var"], torch.Tensor)  # the live output of this iteration
        seen["params"] = params(var)
        seen["grads"] = [p.grad.detach().clone() for p in var.parameters()]
        seen["disp_grads"] = [p.grad for p in disp.parameters()]

    @trainer.on(CollaborativeIterationEvents.VARIANCE_MODEL_COMPLETED)
    def _after_step(engine):
        seen["stepped"] = params(var)

    trainer.run()
    assert fired == [
        "DISPLACEMENT_FORWARD_COMPLETED",
        "DISPLACEMENT_LOSS_COMPLETED",
        "DISPLACEMENT_BACKWARD_COMPLETED",
        "DISPLACEMENT_MODEL_COMPLETED",
        "VARIANCE_FORWARD_COMPLETED",
        "VARIANCE_LOSS_COMPLETED",
        "VARIANCE_BACKWARD_COMPLETED",
        "VARIANCE_MODEL_COMPLETED",
    ]
    assert all(g is None for g in seen["disp_grads"])  # Î_f detached: no variance gradient in q_θ
    assert any(g.abs().sum() > 0 for g in seen["grads"])
    # between the two events the variance optimizer (SGD, lr 0.5) made exactly one step: φ ← φ - 0.5 ∇φ
    for before, grad, after in zip(seen["params"], seen["grads"], seen["stepped"]):
        assert torch.allclose(after, before - 0.5 * grad, atol=1e-7)


def test_joint_mode_fires_the_displacement_events_and_custom_prepare_batch_is_used():
    calls = []

    def prepare(batchdata, device=None, non_blocking=False, **kw):
        calls.append(sorted(batchdata))
        return prepare_registration_batch(batchdata, device, non_blocking, **kw)

    trainer, _, _, _ = build_reference("joint", n_pairs=2, prepare_batch=prepare)
    fired = []
    for ev in CollaborativeIterationEvents:
        trainer.add_event_handler(ev, lambda engine, ev=ev: fired.append(ev.name))
    trainer.run()
    assert len(calls) == 2 and "moving" in calls[0]
    assert fired[:4] == [f"DISPLACEMENT_{s}_COMPLETED" for s in ("FORWARD", "LOSS", "BACKWARD", "MODEL")]
    assert not any(n.startswith("VARIANCE") for n in fired)


def test_prepare_batch_names_the_missing_images():
    with pytest.raises(ValueError, match="'moving' and 'fixed'"):
        prepare_registration_batch({"moving": torch.zeros(1, 1, 4, 4)}, "cpu")


# ----------------------------------------------------------------------------------------------------- oracle
def _oracle_batch(size: int = 16) -> dict:
    item = _reference_pairs(1, size)[0]
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    std = 0.01 + 0.1 * x / size + 0.05 * (y > 8).float()  # a known, non-uniform noise level
    std[0, 0] = 0.0  # a pixel with no noise: log σ² clamps to log_var_min
    item.update(residual_std=std[None], moving_noise_std=0.5 * std[None])
    return item


@pytest.mark.parametrize("form", [{}, {"snr_form": "std", "normalization": "none"}], ids=["authors", "literal"])
def test_oracle_weight_is_the_weight_map_of_the_true_residual_std(form):
    torch.manual_seed(0)
    disp = VoxelMorphDisplacement(2, channels=(4, 8, 8, 8), final_conv_channels=(4,), init_std=1e-2)
    item = _oracle_batch()
    sim = SNRWeightedMSELoss(**form)
    trainer = CollaborativeTrainer(
        "cpu",
        1,
        [{k: v[None] for k, v in item.items()}],
        disp,
        torch.optim.Adam(disp.parameters(), 1e-3),
        sim,
        reg_loss=GradientSmoothnessLoss(),
        variance_source="oracle",
    )  # no variance network, optimizer or loss
    trainer.run()
    out = trainer.state.output
    fixed, std = item["fixed"][None], item["residual_std"][None]
    log_var = (2 * torch.log(std)).clamp(-15.0, 15.0)
    assert out["log_var"][0, 0, 0, 0] == -15.0 and torch.allclose(out["log_var"], log_var)
    expected = sim.weight_map(fixed, log_var)
    assert torch.allclose(out["weight"], expected, atol=1e-7)
    assert out["weight"].std() > 1e-3  # not a constant weight: the oracle carries the noise map
    assert out["loss_sim"] == pytest.approx(float((expected * (fixed - out["warped"]) ** 2).mean()), rel=1e-5)
    assert out["loss_var"] is None  # no variance step
    # the phantom-v2 keys are carried into the output
    assert torch.equal(out["residual_std"], std) and torch.equal(out["moving_noise_std"], 0.5 * std)


def test_oracle_without_residual_std_is_a_clear_error_and_needs_a_weight_form():
    disp, _ = nets()
    item = {k: v[None] for k, v in _oracle_batch().items() if k != "residual_std"}
    opt = torch.optim.Adam(disp.parameters(), 1e-3)
    trainer = CollaborativeTrainer("cpu", 1, [item], disp, opt, SNRWeightedMSELoss(), variance_source="oracle")
    with pytest.raises(KeyError, match="residual_std"):
        trainer.run()
    with pytest.raises(ValueError, match="weight_map"):
        CollaborativeTrainer("cpu", 1, [item], disp, opt, torch.nn.MSELoss(), variance_source="oracle")
    with pytest.raises(ValueError, match="collaborative"):
        CollaborativeTrainer("cpu", 1, [item], disp, opt, torch.nn.MSELoss(), mode="vanilla", variance_source="oracle")
    with pytest.raises(ValueError, match="variance_source"):
        CollaborativeTrainer("cpu", 1, [item], disp, opt, SNRWeightedMSELoss(), variance_source="truth")


# ------------------------------------------------------------------------------------------- label protocols
class _ConstantShift(torch.nn.Module):
    """A 'displacement network' that shifts every sampling point by ``shift`` pixels along the last axis."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        ddf = torch.zeros(x.shape[0], 2, *x.shape[2:])
        ddf[:, 1] = self.shift
        return ddf


def _label_case(cols, shift, protocol):
    lab = torch.zeros(1, 1, 8, 8)
    lab[..., 3:5, slice(*cols)] = 2.0  # a 2x2 myocardium square
    lab[..., 6, 6] = 1.0  # another structure
    item = {"moving": lab / 2, "fixed": lab / 2, "moving_label": lab, "fixed_label": lab}
    ev = RegistrationEvaluator("cpu", [item], _ConstantShift(shift), label_protocol=protocol)
    ev.run()
    pred, ref = label_pair(ev.state.output, 2)
    dice = float(2 * (pred * ref).sum() / (pred.sum() + ref.sum()))
    return ev.state.output["warped_label"][0, 0], dice


def test_authors_label_protocol_against_hand_computed_cases():
    # warped(c) = label(c + shift). Sub-pixel shift 0.4 of the square at columns 3-4: nearest keeps it
    # (round(c + 0.4) = c), the authors' bilinear mask is 0.4 at column 2 and 0.6 at column 4, > 0 counts: 2x3 pixels
    near, dice_near = _label_case((3, 5), 0.4, "nearest")
    auth, dice_auth = _label_case((3, 5), 0.4, "authors")
    assert (near == 2).sum() == 4 and dice_near == pytest.approx(1.0)
    assert (auth == 2).sum() == 6 and bool((auth[3:5, 2:5] == 2).all()) and dice_auth == pytest.approx(0.8)
    assert set(auth.unique().tolist()) == {0.0, 2.0}  # only the myocardium is warped
    assert near[6, 6] == 1.0
    # an integer shift moves the square in both protocols: no growth from rounding
    auth, _ = _label_case((3, 5), 1.0, "authors")
    assert (auth == 2).sum() == 4 and bool((auth[3:5, 2:4] == 2).all())
    # zero padding: the square at columns 0-1 shifted by 1.5 to the right: column 0 samples -1.5 (outside: 0; border
    # padding would repeat column 0 there), columns 1 and 3 are 0.5 (> 0), column 2 is 1
    auth, _ = _label_case((0, 2), -1.5, "authors")
    assert (auth == 2).sum() == 6 and bool((auth[3:5, 1:4] == 2).all())
    with pytest.raises(ValueError, match="label_protocol"):
        RegistrationEvaluator("cpu", [], _ConstantShift(0.0), label_protocol="linear")


def test_evaluator_passes_the_phantom_v2_keys_through():
    disp, var = nets()
    item = {k: v[None] for k, v in _oracle_batch().items()}
    ev = RegistrationEvaluator("cpu", [item], disp, var)
    ev.run()
    out = ev.state.output
    assert torch.equal(out["residual_std"], item["residual_std"])
    assert torch.equal(out["moving_noise_std"], item["moving_noise_std"])


# ------------------------------------------------------------------------------------------------------ configs
ROOT = Path(__file__).resolve().parents[1]
ORACLE_LOADER = (
    "$torch.utils.data.DataLoader([{'moving': torch.rand(1, *@spatial_size), 'fixed': torch.rand(1, *@spatial_size),"
    " 'residual_std': 0.01 + 0.1 * torch.rand(1, *@spatial_size)} for _ in range(2)], batch_size=1)"
)


@pytest.mark.parametrize("variant", ["oracle", "oracle_literal"])
def test_oracle_variant_config_trains_without_a_variance_network(variant):
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in ("configs/train.yaml", f"configs/variants/loss/{variant}.yaml")])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "device": "$torch.device('cpu')",
            "spatial_size": [32, 32],
            "train#dataloader": ORACLE_LOADER,
            "train#handlers": [],
            "max_epochs": 1,
            "epoch_length": 1,
            "network_def#channels": [4, 8, 8, 8, 8, 8, 8, 8],
            "network_def#final_conv_channels": [4],
        }
    )
    assert parser.get_parsed_content("variance_net") is None
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.variance_source == "oracle" and trainer.variance_network is None
    trainer.run()
    out = trainer.state.output
    sim = parser.get_parsed_content("sim_loss")
    assert sim.snr_form == ("std" if variant == "oracle_literal" else "variance")
    assert torch.allclose(out["weight"], sim.weight_map(out["fixed"], 2 * torch.log(out["residual_std"])), atol=1e-7)
    assert out["loss_var"] is None


def test_label_protocol_is_a_config_option():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/train.yaml"), str(ROOT / "configs/evaluate.yaml")])
    assert parser["label_protocol"] == "nearest"
    assert parser["evaluate"]["evaluator"]["label_protocol"] == "@label_protocol"
    assert (
        parser["train"]["trainer"]["variance_source"] == "@variance_source" and parser["variance_source"] == "network"
    )


def test_ddp_or_none_passes_a_missing_network_through():
    from scripts.utils import ddp_or_none

    assert ddp_or_none(None, torch.device("cpu")) is None
    with pytest.raises((RuntimeError, ValueError), match="process group|init_process_group|default process group"):
        ddp_or_none(torch.nn.Linear(2, 2), torch.device("cpu"))  # a real DDP needs the process group (test_multi_gpu)
