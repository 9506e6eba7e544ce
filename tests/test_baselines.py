"""Baselines and extensions of the paper's comparison: AdaReg, AdaFrame, the displacement-uncertainty term, the
vxm-diff KL (hand computations on tiny tensors), the uncertainty networks, and every variant YAML wired into the
CollaborativeTrainer. Tiny sizes: the whole file runs in well under a minute on CPU."""

import math
import pickle
from pathlib import Path

import pytest
import torch
from _pairs import toy_pairs
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from scripts.evaluator import RegistrationEvaluator
from scripts.losses import (
    AdaFrameMSELoss,
    AdaFrameSmoothnessLoss,
    AdaRegSmoothnessLoss,
    DisplacementUncertaintyRegLoss,
    GradientSmoothnessLoss,
    ImageSigmaMSELoss,
    SNRWeightedMSELoss,
    VxmDiffKLLoss,
    adaframe_weight,
    adareg_weight,
    degree_map,
    weighted_smoothness,
)
from scripts.networks import DisplacementUncertaintyNet, VoxelMorphDisplacement
from scripts.trainer import CollaborativeTrainer

ROOT = Path(__file__).resolve().parents[1]
torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------------- AdaReg
def test_adareg_weight_hand_value_and_monotonicity():
    fixed = torch.zeros(1, 1, 2, 2)
    warped = torch.tensor([[[[0.0, 0.1], [0.2, 0.5]]]])
    rho = warped.abs()
    w = adareg_weight(warped, fixed, c=5.0)
    assert torch.allclose(w, torch.exp(-5.0 * rho * rho.mean()))
    # w in (0, 1], 1 where the residual is 0, decreasing where the residual is high
    assert w[0, 0, 0, 0] == 1.0 and torch.all(w > 0) and torch.all(w <= 1)
    flat = w.flatten()
    assert torch.all(flat[1:] < flat[:-1])
    # a worse global fit relaxes the regulariser everywhere (the same local residual gets a smaller weight)
    worse = warped.clone()
    worse[0, 0, 1, 1] = 1.0
    assert adareg_weight(worse, fixed, 5.0)[0, 0, 0, 1] < w[0, 0, 0, 1]
    # zero residual everywhere: full regularisation
    assert torch.all(adareg_weight(fixed, fixed) == 1.0)


def test_adareg_loss_reduces_to_smoothness_and_weights_the_field_grid():
    field = torch.randn(2, 2, 8, 8)
    img = torch.rand(2, 1, 16, 16)
    loss = AdaRegSmoothnessLoss(c=50.0, multiplier=2.0)
    # zero residual -> w = 1 -> exactly GradientSmoothnessLoss (weights resampled to the half-resolution field)
    assert torch.allclose(loss(field, img, img), GradientSmoothnessLoss(2.0)(field))
    # high residual on the right half: the regulariser is relaxed there only
    warped = img.clone()
    warped[..., 8:] += 0.8
    w = loss.adaptive_weight(warped, img)
    assert w[..., :8].min() > w[..., 8:].max()
    assert loss(field, warped, img) < loss(field, img, img)
    # hand value of the weighted differences on a 1-axis example
    f1 = torch.tensor([[[0.0, 1.0, 3.0]]])
    wt = torch.tensor([[[1.0, 0.5, 0.0]]])
    expected = ((0.75 * 1.0 + 0.25 * 4.0) / 2) * 1.0
    assert torch.isclose(weighted_smoothness(f1, wt, multiplier=1.0)[0], torch.tensor(expected))


@pytest.mark.parametrize("detach", [False, True])
def test_adareg_gradient_through_the_weight_only_when_not_detached(detach):
    field = torch.randn(1, 2, 6, 6, requires_grad=True)
    fixed = torch.rand(1, 1, 6, 6)
    warped = torch.rand(1, 1, 6, 6, requires_grad=True)
    AdaRegSmoothnessLoss(c=50.0, detach_weight=detach)(field, warped, fixed).backward()
    has_grad = warped.grad is not None and warped.grad.abs().sum() > 0
    assert has_grad != detach  # the original (and the MICCAI authors') code does not detach: default False


# ----------------------------------------------------------------------------------------------------- AdaFrame
def test_adaframe_weight_hand_value():
    fixed = torch.zeros(1, 1, 1, 4)
    warped = torch.tensor([[[[0.1, 0.2, 0.3, 0.6]]]])
    a0, b0 = 0.1, 10.0
    rho = warped.abs()
    mu, sd = rho.mean(), rho.std(unbiased=False)
    a, b = a0 / mu, b0 * (1 - math.cos(math.pi * mu))
    expected = 1 - torch.sigmoid(a * (rho - mu) / sd - b)
    assert torch.allclose(adaframe_weight(warped, fixed, a0, b0), expected, atol=1e-6)


def test_adaframe_weight_properties():
    fixed = torch.zeros(1, 1, 8, 8)
    rho = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    for scale in (1.0, 0.05):
        alpha = adaframe_weight(rho * scale, fixed)
        assert torch.all(alpha > 0) and torch.all(alpha < 1)
        assert torch.all(alpha.flatten()[1:] <= alpha.flatten()[:-1])  # down-weights high residuals
    # early (large mean residual): almost uniform; late (small residual): a sharp step around the mean residual
    early, late = adaframe_weight(rho, fixed), adaframe_weight(rho * 0.05, fixed)
    assert early.min() > 0.99
    assert late.max() > 0.99 and late.min() < 0.01
    # at the mean residual, α = sigmoid(b) with b = b0 (1 - cos πμ)
    r = torch.tensor([[[[0.0, 0.2, 0.4]]]])
    mu = 0.2
    assert torch.isclose(
        adaframe_weight(r, torch.zeros_like(r))[0, 0, 0, 1],
        torch.sigmoid(torch.tensor(10 * (1 - math.cos(math.pi * mu)))),
        atol=1e-6,
    )


def test_adaframe_losses():
    warped = torch.rand(2, 1, 8, 8, requires_grad=True)
    fixed = torch.rand(2, 1, 8, 8)
    data = AdaFrameMSELoss(0.1, 10.0)
    alpha = adaframe_weight(warped, fixed).detach()
    value = data(warped, fixed)
    assert torch.isclose(value, (alpha * (fixed - warped) ** 2).mean())
    value.backward()  # α is a stopped weight: the gradient is that of a weighted MSE with constant weights
    assert torch.allclose(warped.grad, alpha * 2 * (warped - fixed).detach() / warped.numel(), atol=1e-7)
    field = torch.randn(2, 2, 4, 4)
    gamma = 1 - alpha
    reg = AdaFrameSmoothnessLoss(0.1, 10.0, multiplier=2.0)
    assert torch.isclose(reg(field, warped, fixed), weighted_smoothness(field, gamma, 2.0).mean())
    assert torch.allclose(reg.adaptive_weight(warped, fixed) + adaframe_weight(warped, fixed).detach(), torch.ones(1))
    plain = AdaFrameSmoothnessLoss(adaptive=False)
    assert torch.isclose(plain(field, warped, fixed), GradientSmoothnessLoss(2.0)(field))


# ------------------------------------------------------------------------------------- displacement uncertainty
def test_dispunc_term_value_and_optimum():
    field = torch.randn(1, 2, 4, 4)
    s = torch.tensor([[[[0.0, -1.0], [1.0, 2.0]]]])
    loss = DisplacementUncertaintyRegLoss(alpha=0.003, lambda_reg=0.01, multiplier=2.0)
    expected = GradientSmoothnessLoss(2.0)(field) + 0.3 * (torch.exp(s) - s).mean()
    assert torch.isclose(loss(field, log_sigma_z=s), expected)
    # λ · L_reg = λ‖∇ẑ‖² + α E[σ² − log σ²]
    assert torch.isclose(
        0.01 * loss(field, log_sigma_z=s), 0.01 * GradientSmoothnessLoss(2.0)(field) + 0.003 * (torch.exp(s) - s).mean()
    )
    # the α-term alone is minimised at σ_z² = 1 (log σ_z² = 0)
    s0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss.uncertainty_term(s0).sum().backward()
    assert torch.allclose(s0.grad, torch.zeros_like(s0))
    with pytest.raises(ValueError, match="log_sigma_z"):
        loss(field)


# --------------------------------------------------------------------------------------------------- vxm-diff KL
def _laplacian(shape):
    n = math.prod(shape)
    idx = torch.arange(n).view(shape)
    adj = torch.zeros(n, n)
    for d in range(len(shape)):
        a = idx.narrow(d, 0, shape[d] - 1).flatten()
        b = idx.narrow(d, 1, shape[d] - 1).flatten()
        adj[a, b] = adj[b, a] = 1
    return torch.diag(adj.sum(1)) - adj


def test_vxm_diff_kl_against_hand_computation():
    torch.manual_seed(1)
    shape, lam = (3, 4), 10.0
    mean = torch.randn(1, 2, *shape)
    log_var = torch.randn(1, 2, *shape) * 0.5
    lap = _laplacian(shape)
    deg = torch.diag(lap)
    assert torch.equal(degree_map(shape).flatten(), deg)
    # KL(N(μ, Σ) || N(0, (λL)^-1)) up to constants, per component channel, with the graph Laplacian as a matrix
    n_ax = 2
    kl_sigma = sum((lam * deg * log_var[0, c].flatten().exp() - log_var[0, c].flatten()).sum() for c in range(2))
    kl_prec = sum(lam * mean[0, c].flatten() @ lap @ mean[0, c].flatten() for c in range(2))
    # VoxelMorph's normalisation: sigma part as a mean over channels x voxels; the μᵀLμ part = sum over edges,
    # normalised per axis by the number of differences along that axis
    n_vox = 2 * math.prod(shape)
    diffs = [torch.diff(mean, dim=d + 2).pow(2) for d in range(n_ax)]
    prec_norm = sum(df.mean() for df in diffs)
    expected = 0.5 * n_ax * (kl_sigma / n_vox + lam * 0.5 * prec_norm / n_ax)
    got = VxmDiffKLLoss(prior_lambda=lam)(mean, field_mean=mean, log_sigma_z=log_var)
    assert torch.isclose(got, torch.as_tensor(expected, dtype=got.dtype), rtol=1e-5)
    # the edge sum equals μᵀLμ (the prior's quadratic form)
    assert torch.isclose(sum(df.sum() for df in diffs), kl_prec / lam, rtol=1e-5)
    # sigma term optimum: σ² = 1 / (λ D)
    s = (-(torch.log(lam * degree_map(shape)))).expand(1, 2, *shape).clone().requires_grad_(True)
    VxmDiffKLLoss(lam)(mean, field_mean=mean, log_sigma_z=s).backward()
    assert s.grad.abs().max() < 1e-6


def test_image_sigma_mse():
    a, b = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1)
    assert torch.isclose(ImageSigmaMSELoss(0.1)(a, b), torch.tensor(1.0))
    assert torch.isclose(ImageSigmaMSELoss(1.0)(a, b), torch.nn.MSELoss()(a, b))


# ------------------------------------------------------------------------------------------ uncertainty networks
def small_base(dims=2, steps=7):
    return VoxelMorphDisplacement(
        dims, channels=(4, 8, 8, 8), final_conv_channels=(4,), integration_steps=steps, init_std=1e-2
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("iso", [True, False])
def test_uncertainty_net_shapes_sampling_and_sigma(dims, iso):
    size = 16 if dims == 2 else 8
    net = DisplacementUncertaintyNet(small_base(dims), sigma_channels=1 if iso else dims)
    x = torch.rand(1, 2, *([size] * dims))
    net.train()
    d1, z1, mean, log_sigma_z = net(x, return_field=True)
    assert d1.shape == (1, dims, *([size] * dims))
    half = [size // 2] * dims
    assert mean.shape == (1, dims, *half) and log_sigma_z.shape == (1, 1 if iso else dims, *half)
    assert not torch.equal(z1, mean)  # sampled in training
    net.eval()
    d2, z2, mean2, _ = net(x, return_field=True)
    assert torch.equal(z2, mean2) and torch.equal(d2, net(x))  # deterministic in eval
    sig = net.sigma_z(x)
    assert sig.shape == (1, 1 if iso else dims, *([size] * dims))
    # initial log σ² = -10 (VoxelMorph's init) + log ¼ on the half-resolution grid, σ in full-res voxels
    assert torch.allclose(sig, torch.full_like(sig, 2 * math.exp(0.5 * (-10 + math.log(0.25)))), rtol=1e-3)
    # the network pickles; the state dict round-trips
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), d2)
    other = DisplacementUncertaintyNet(small_base(dims), sigma_channels=1 if iso else dims)
    other.load_state_dict(net.state_dict())
    assert torch.equal(other.eval()(x), d2)


def test_uncertainty_net_without_integration_samples_the_ddf():
    net = DisplacementUncertaintyNet(small_base(2, steps=0)).eval()
    x = torch.rand(1, 2, 16, 16)
    ddf, z, mean, log_sigma_z = net(x, return_field=True)
    assert torch.equal(ddf, mean) and z is ddf and log_sigma_z.shape == (1, 1, 16, 16)
    with pytest.raises(TypeError):
        DisplacementUncertaintyNet(UNet(2, 2, 2, channels=(4, 8), strides=(2,)))


def _trainer(net, sim, reg, mode, var=None):
    from scripts.losses import BetaNLLLoss

    return CollaborativeTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=torch.utils.data.DataLoader(toy_pairs(), batch_size=1),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        sim_loss=sim,
        reg_loss=reg,
        variance_network=var,
        variance_optimizer=None if var is None else torch.optim.Adam(var.parameters(), 1e-3),
        variance_loss=BetaNLLLoss(),
        mode=mode,
    )


def test_dispunc_trains_collaboratively_and_learns_sigma():
    net = DisplacementUncertaintyNet(small_base(), sigma_channels=1)
    var = UNet(2, 2, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    head0 = net.log_var_head.bias.detach().clone()
    trainer = _trainer(
        net, SNRWeightedMSELoss(), DisplacementUncertaintyRegLoss(alpha=1e-3, lambda_reg=0.01), "collaborative", var
    )
    trainer.run()
    out = trainer.state.output
    assert out["log_sigma_z"].shape == (1, 1, 8, 8) and out["field_mean"].shape == (1, 2, 8, 8)
    assert math.isfinite(out["loss"]) and math.isfinite(out["loss_var"])
    assert out["log_var"].shape == (1, 1, 16, 16) and torch.isfinite(out["log_var"]).all()  # h_φ on the 16² image
    assert net.log_var_head.bias.item() > head0.item()  # the α-term pulls σ_z up from its tiny initial value
    ev = RegistrationEvaluator("cpu", torch.utils.data.DataLoader(toy_pairs(), batch_size=1), net)
    ev.run()
    assert ev.state.output["log_sigma_z"].shape == (1, 1, 8, 8)  # σ_z map available at inference


@pytest.mark.parametrize("variant", ["vxm_diff", "adareg", "adaframe"])
def test_vanilla_variants_train(variant):
    if variant == "vxm_diff":
        net = DisplacementUncertaintyNet(small_base(), sigma_channels=2)
        sim, reg = ImageSigmaMSELoss(1.0), VxmDiffKLLoss(10.0)
    else:
        net = small_base()
        sim = torch.nn.MSELoss() if variant == "adareg" else AdaFrameMSELoss()
        reg = AdaRegSmoothnessLoss() if variant == "adareg" else AdaFrameSmoothnessLoss()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _trainer(net, sim, reg, "vanilla")
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert math.isfinite(trainer.state.output["loss"]) and math.isfinite(trainer.state.output["loss_reg"])


# --------------------------------------------------------------------------------------------------- variant YAMLs
LOSS_VARIANTS = sorted(p.stem for p in (ROOT / "configs/variants/loss").glob("*.yaml"))
SYNTH_LOADER = (
    "$torch.utils.data.DataLoader([{'moving': torch.rand(1, *@spatial_size), 'fixed': torch.rand(1, *@spatial_size),"
    " 'residual_std': 0.01 + 0.1 * torch.rand(1, *@spatial_size)} for _ in range(2)], batch_size=1)"
)


def _parser(files, size=(32, 32), **over):
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "device": "$torch.device('cpu')",
            "spatial_size": list(size),
            "train#dataloader": SYNTH_LOADER,
            "train#handlers": [],
            "max_epochs": 1,
            "epoch_length": 1,
            **over,
        }
    )
    return parser


def test_all_paper_variants_exist():
    expected = {
        "ours",
        "ours_literal",
        "mse",
        "ncc",
        "mi",
        "nll",
        "beta_nll",
        "adareg",
        "adaframe",
        "ours_dispunc",
        "vxm_diff",
    }
    assert expected <= set(LOSS_VARIANTS)


@pytest.mark.parametrize("loss", LOSS_VARIANTS)
def test_loss_variant_parses_instantiates_and_runs_one_iteration(loss):
    files = ["configs/train.yaml", f"configs/variants/loss/{loss}.yaml"]
    if loss not in ("ours_dispunc", "vxm_diff"):
        files.append("configs/variants/arch/voxelmorph.yaml")
    parser = _parser(files)
    net = parser.get_parsed_content("network_def")
    mode = parser.get_parsed_content("mode")
    oracle = parser.get_parsed_content("variance_source") == "oracle"  # no variance net: the true residual_std
    assert (parser.get_parsed_content("variance_net") is None) == (mode == "vanilla" or oracle)
    for key in ("sim_loss", "reg_loss"):  # the classes the variant file names (or train.yaml's defaults)
        target = parser.get(key)["_target_"]
        assert type(parser.get_parsed_content(key)).__name__ == target.rsplit(".", 1)[-1], (key, target)
    if loss in ("ours_dispunc", "vxm_diff"):
        assert isinstance(net, DisplacementUncertaintyNet)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert math.isfinite(trainer.state.output["loss"])
    if loss == "ours_literal":
        assert parser.get_parsed_content("sim_loss").snr_form == "std"


def test_transmorph_arch_variant_sets_ddf_regulariser():
    parser = _parser(
        ["configs/train.yaml", "configs/variants/loss/adareg.yaml", "configs/variants/arch/transmorph.yaml"],
        size=(64, 64),
        **{
            "network_def#embed_dim": 8,
            "network_def#num_heads": [1, 1, 1, 1],
            "network_def#depths": [1, 1, 1, 1],
            "network_def#reg_head_chan": 4,
        },
    )
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "TransMorph" and net.integration_steps == 0
    reg = parser.get_parsed_content("reg_loss")
    assert isinstance(reg, AdaRegSmoothnessLoss) and reg.multiplier == 1.0
    x = torch.rand(1, 2, 64, 64)
    assert net(x).shape == (1, 2, 64, 64)


@pytest.mark.parametrize(
    "data,kind,dims,size,n",
    [
        ("phantom_echo", "echo2d", 2, [128, 128], 600),
        ("phantom_mri", "mri2d", 2, [128, 128], 600),
        ("phantom_echo3d", "echo3d", 3, [64, 64, 64], 60),
    ],
)
def test_data_variants(data, kind, dims, size, n):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/train.yaml"), str(ROOT / f"configs/variants/data/{data}.yaml")])
    parser["bundle_root"] = "/b"
    ph = parser.get_parsed_content("phantom")
    assert ph["kind"] == kind and ph["n_train"] == n
    assert parser.get_parsed_content("spatial_dims") == dims and parser.get_parsed_content("spatial_size") == size
    assert parser.get_parsed_content("dataset_dir").startswith("/b/data/phantom_")
