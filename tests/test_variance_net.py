"""The variance estimator h_φ (scripts.networks.VarianceUNet): architecture, learnable output level, and the
data-driven level initialisation (scripts.handlers.VarianceLevelInit)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp
from monai.networks.nets import UNet

from scripts.handlers import VarianceLevelInit
from scripts.losses import BetaNLLLoss
from scripts.networks import VarianceUNet, VoxelMorphDisplacement, level_bias

ROOT = Path(__file__).resolve().parents[1]


def old_unet() -> UNet:
    return UNet(
        2,
        2,
        1,
        (16, 32, 32, 32),
        (2, 2, 2),
        num_res_units=1,
        act=("LeakyReLU", {"negative_slope": 0.2}),
        norm="instance",
    )


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("dims,expected", [(2, 109_025), (3, 326_465)])
def test_parameter_count_and_shape(dims, expected):
    # the authors' VoxelMorph U-Net with a 16 -> 1 head: 109,025 parameters in 2D (the displacement net's 109,170
    # minus its 16 -> 2 flow head, 290, plus the 16 -> 1 head, 145)
    net = VarianceUNet(dims)
    assert n_params(net) == expected
    assert n_params(net) == n_params(VoxelMorphDisplacement(dims)) - (16 * 3**dims * dims + dims) + (16 * 3**dims + 1)
    assert not any(
        isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d, torch.nn.InstanceNorm3d, torch.nn.BatchNorm3d))
        for m in net.modules()
    )
    x = torch.rand(2, 2, *([16] * dims))
    assert net(x).shape == (2, 1, *([16] * dims))
    with pytest.raises(ValueError, match="2 channels"):
        net(torch.rand(1, 1, *([16] * dims)))


def test_level_is_the_head_bias():
    torch.manual_seed(0)
    net = VarianceUNet(2)
    x = torch.rand(1, 2, 16, 16)
    assert level_bias(net) is net.head.bias and net.head.bias.item() == 0.0  # documented default: log σ̂² bias 0
    before = net(x)
    net.init_level(-3.5)
    assert torch.allclose(net(x), before - 3.5, atol=1e-5)  # the bias shifts log σ̂² everywhere
    assert VarianceUNet(2, log_var_init=-2.0).head.bias.item() == -2.0
    # the old MONAI UNet: its last convolution (after the instance norm) has the bias that shifts the output
    old = old_unet()
    b = level_bias(old)
    y = old(x)
    with torch.no_grad():
        b.add_(1.0)
    assert torch.allclose(old(x), y + 1.0, atol=1e-5)


def test_default_configs_use_it():
    for files in (["configs/train.yaml"], ["configs/inference.yaml"]):
        p = ConfigParser()
        p.read_config([str(ROOT / f) for f in files])
        assert isinstance(p.get_parsed_content("variance_def"), VarianceUNet)
    p = ConfigParser()
    p.read_config([str(ROOT / "configs/train.yaml"), str(ROOT / "configs/variants/arch/variance_unet.yaml")])
    old = p.get_parsed_content("variance_def")
    assert isinstance(old, UNet) and n_params(old) == 77_195


def _synthetic(g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(torch.rand(4, 1, 40, 40, generator=g), 9, 1)  # smooth 32x32 images


def _train_eq5(net: torch.nn.Module, steps: int, sigma: float, lr: float = 1e-3) -> float:
    """Eq. 5 (β-NLL, β = 0.5) on warped = fixed + N(0, sigma²): returns the final mean σ̂²."""
    g = torch.Generator().manual_seed(0)
    fixed = _synthetic(g)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = BetaNLLLoss(beta=0.5)
    for _ in range(steps):
        warped = fixed + sigma * torch.randn(fixed.shape, generator=g)
        s = net(torch.cat([warped, fixed], 1))
        opt.zero_grad()
        loss_fn(warped, fixed, s).backward()
        opt.step()
    with torch.no_grad():
        warped = fixed + sigma * torch.randn(fixed.shape, generator=g)
        return torch.exp(net(torch.cat([warped, fixed], 1))).mean().item()


@pytest.mark.slow
def test_level_is_learnable():
    """From σ̂² ≈ 1 a few hundred steps of Eq. 5 bring the mean σ̂² within 2x of the known noise variance 0.01;
    the former MONAI UNet (instance norm before the head) stays ~100x too high in the same steps."""
    torch.manual_seed(0)
    var = 0.1**2
    mean_var = _train_eq5(VarianceUNet(2), 200, 0.1)
    assert var / 2 <= mean_var <= 2 * var, mean_var
    torch.manual_seed(0)
    assert _train_eq5(old_unet(), 200, 0.1) > 20 * var


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = [
            {"moving": torch.rand(1, 32, 32, generator=g), "fixed": torch.rand(1, 32, 32, generator=g)}
            for _ in range(n)
        ]
        self.reads: list[int] = []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.items[i]


def _engine(disp, var, warp, start_iteration: int = 0) -> Engine:
    eng = Engine(lambda e, b: None)
    eng.network, eng.variance_network, eng.warp = disp, var, warp

    @eng.on(Events.STARTED)
    def _resume(e):
        e.state.iteration = start_iteration

    return eng


def test_level_init_sets_the_measured_level_and_consumes_no_rng():
    torch.manual_seed(0)
    disp = VoxelMorphDisplacement(2)
    with torch.no_grad():  # a non-identity displacement, so that the residual depends on the network
        disp.backbone.net[1].final_conv_out.conv.bias.fill_(0.7)
    var = VarianceUNet(2)
    var.train()
    warp = Warp("bilinear", "border")
    data = _Items(6)
    handler = VarianceLevelInit(data, n_batches=2, batch_size=2)
    eng = _engine(disp, var, warp)
    handler.attach(eng)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    eng.run([0, 1, 2], max_epochs=1)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert data.reads == [0, 1, 2, 3]  # the first n_batches * batch_size items, by index
    assert var.training and disp.training  # modes restored
    # by hand: the mean squared residual of those 4 pairs with the displacement network
    items = data.items[:4]
    moving = torch.stack([it["moving"] for it in items])
    fixed = torch.stack([it["fixed"] for it in items])
    with torch.no_grad():
        disp.eval()
        msr = ((fixed - warp(moving, disp(torch.cat([moving, fixed], 1)))) ** 2).mean().item()
        disp.train()
        warped = warp(moving, disp.eval()(torch.cat([moving, fixed], 1)))
        mean_var = torch.exp(var.eval()(torch.cat([warped, fixed], 1))).mean().item()
    assert handler.mean_sq_residual == pytest.approx(msr, rel=1e-6)
    assert handler.level == pytest.approx(math.log(msr), rel=1e-6)
    assert mean_var == pytest.approx(msr, rel=1e-4)  # the level set: mean σ̂² = mean squared residual
    assert var.head.bias.item() == pytest.approx(math.log(msr), abs=0.05)  # ≈ the bias itself at the default init


def test_level_init_skips_resumed_runs_and_vanilla_mode():
    torch.manual_seed(0)
    disp, var, warp = VoxelMorphDisplacement(2), VarianceUNet(2), Warp("bilinear", "border")
    data = _Items(2)
    handler = VarianceLevelInit(data, n_batches=1)
    eng = _engine(disp, var, warp, start_iteration=5)  # a resumed run: iterations already done
    handler.attach(eng)
    eng.run([0, 1], max_epochs=1, epoch_length=2)
    assert data.reads == [] and var.head.bias.item() == 0.0
    eng2 = _engine(disp, None, warp)  # vanilla mode: no variance network
    VarianceLevelInit(data, n_batches=1).attach(eng2)
    eng2.run([0], max_epochs=1)
    assert data.reads == []
    eng3 = _engine(disp, var, warp)
    VarianceLevelInit(data, n_batches=0).attach(eng3)  # 0 disables it
    eng3.run([0], max_epochs=1)
    assert data.reads == [] and var.head.bias.item() == 0.0
    with pytest.raises(ValueError, match="n_batches"):
        VarianceLevelInit(data, n_batches=-1)


def test_output_smoothing_is_a_normalised_gaussian_of_the_variance():
    """log σ̂² = log(G * exp(head) / G * 1): checked against scipy's Gaussian (same truncation, zero padding)."""
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    plain = VarianceUNet(2)
    smooth = VarianceUNet(2, output_smoothing=2.0)
    smooth.load_state_dict(plain.state_dict())  # no parameters, no persistent buffers: the same state dict
    assert list(smooth.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        raw = plain(x)
        out = smooth(x)
    for b in range(2):
        v = np.exp(raw[b, 0].double().numpy())
        num = gaussian_filter(v, 2.0, mode="constant", cval=0.0, truncate=3.0)
        den = gaussian_filter(np.ones_like(v), 2.0, mode="constant", cval=0.0, truncate=3.0)
        np.testing.assert_allclose(out[b, 0].double().numpy(), np.log(num / den), atol=2e-5)
    # a uniform level passes unchanged (the level init and level_bias keep their meaning), even at the borders
    with torch.no_grad():
        smooth.head.weight.zero_()
        smooth.init_level(-3.5)
        assert torch.allclose(smooth(x), torch.full_like(out, -3.5), atol=1e-5)
    assert level_bias(smooth) is smooth.head.bias


def test_output_smoothing_passes_gradients_and_refuses_bad_sigma():
    torch.manual_seed(0)
    net = VarianceUNet(3, channels=(4, 4, 4, 4, 4, 4, 4, 4), final_conv_channels=(4,), output_smoothing=1.0)
    out = net(torch.rand(1, 2, 16, 16, 16))
    out.mean().backward()
    assert net.head.weight.grad.abs().sum() > 0
    first = next(net.backbone.parameters())  # the first encoder convolution: gradients reach the whole backbone
    assert first.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output_smoothing"):
        VarianceUNet(2, output_smoothing=-1.0)


def test_input_smoothing_low_passes_both_inputs_before_the_unet():
    """h_φ(x) with input_smoothing s = the plain network on G * x / G * 1 (scipy's Gaussian, same truncation)."""
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    plain = VarianceUNet(2)
    lowpass = VarianceUNet(2, input_smoothing=1.5)
    lowpass.load_state_dict(plain.state_dict())  # no parameters, no persistent buffers
    assert list(lowpass.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 2, 32, 32)
    blurred = np.empty(x.shape)
    for b in range(2):
        for c in range(2):
            num = gaussian_filter(x[b, c].double().numpy(), 1.5, mode="constant", cval=0.0, truncate=3.0)
            den = gaussian_filter(np.ones((32, 32)), 1.5, mode="constant", cval=0.0, truncate=3.0)
            blurred[b, c] = num / den
    with torch.no_grad():
        out = lowpass(x)
        ref = plain(torch.from_numpy(blurred).float())
        assert not torch.allclose(plain(x), ref, atol=1e-3)  # the smoothing changes the output
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
    # a uniform image passes unchanged, borders included: the network sees the same input as without smoothing
    const = torch.full((1, 2, 32, 32), 0.3)
    with torch.no_grad():
        assert torch.allclose(lowpass(const), plain(const), atol=1e-5)
    # pixel-level noise is what it can no longer read: a ±0.25 checkerboard added to both frames moves the plain
    # network's output far more than the low-pass one's
    checker = 0.5 * (torch.arange(32)[:, None] + torch.arange(32)[None]).remainder(2).float() - 0.25
    with torch.no_grad():
        moved_plain = (plain(x + checker) - plain(x)).abs().mean()
        moved_low = (lowpass(x + checker) - lowpass(x)).abs().mean()
    assert moved_low < 0.2 * moved_plain
    with pytest.raises(ValueError, match="input_smoothing"):
        VarianceUNet(2, input_smoothing=-0.5)
