"""Test-time instance optimisation (scripts/instance_optimisation.py) on a tiny 32x32 phantom pair."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Warp

from scripts.data.phantom import make_pair
from scripts.instance_optimisation import (
    adapt_network,
    integrate_field,
    optimise_field,
    optimise_pair,
    pair_loss,
    pair_weight,
)
from scripts.losses import GradientSmoothnessLoss, SNRWeightedMSELoss
from scripts.metrics import jacobian_stats
from scripts.metrics.deformation import jacobian_determinant
from scripts.networks import VoxelMorphDisplacement

SMALL = dict(channels=(8, 16, 16, 16, 16, 16, 16, 16), final_conv_channels=(8, 8))


@pytest.fixture(scope="module")
def pair():
    p = make_pair(0, kind="echo2d", size=32)
    moving = torch.as_tensor(p["moving"]).float()[None, None]
    fixed = torch.as_tensor(p["fixed"]).float()[None, None]
    return moving, fixed


def _network(seed: int = 0, init_std: float = 0.05) -> VoxelMorphDisplacement:
    torch.manual_seed(seed)
    # a flow head far from zero: the network starts away from the identity, as a trained one does
    return VoxelMorphDisplacement(spatial_dims=2, init_std=init_std, **SMALL)


class HalfVariance(torch.nn.Module):
    """log σ̂² = ``low`` on one half of the columns and ``high`` (huge σ̂) on the other; ``side`` = the noisy half."""

    def __init__(self, side: str = "right", low: float = -5.0, high: float = 15.0) -> None:
        super().__init__()
        self.side, self.low, self.high = side, low, high
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w = x.shape[-1]
        cols = torch.arange(w, device=x.device) >= w // 2
        noisy = cols if self.side == "right" else ~cols
        return torch.where(noisy, self.high, self.low).to(x.dtype).expand(x.shape[0], 1, *x.shape[2:]).clone()


class ConstantVariance(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[2:]), 0.3, dtype=x.dtype, device=x.device)


# unit_mean without the I_f factor: w = r / <r> with r = σ̂^-1 (γ = 0.5), so huge σ̂ gives w ≈ 0 (minmax, the default,
# bounds the weight in [0.5, 0.731] and never ignores a region)
UNIT_MEAN = dict(normalization="unit_mean", use_fixed=False, clip=1e6)


def test_zero_steps_is_the_network_ddf(pair):
    moving, fixed = pair
    net = _network()
    net.train()
    ddf = optimise_pair(net, HalfVariance(), moving, fixed, steps=0, lr=1e-3)
    net.eval()
    with torch.no_grad():
        expected = net(torch.cat([moving, fixed], 1))
    assert torch.equal(ddf, expected)
    assert ddf.abs().max() > 1e-3  # not a trivial zero field
    net.train()
    optimise_pair(net, None, moving, fixed, steps=0, lr=1e-3)
    assert net.training  # mode restored


def test_steps_lower_the_loss_and_leave_the_network_alone(pair):
    moving, fixed = pair
    net = _network()
    var = HalfVariance(side="left", low=-3.0, high=1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    var_before = {k: v.clone() for k, v in var.state_dict().items()}
    sim = SNRWeightedMSELoss()
    loss0, _, weight = pair_loss(net, moving, fixed, var, sim_loss=sim)
    adapted = adapt_network(net, var, moving, fixed, steps=20, lr=1e-3, sim_loss=sim)
    loss20, _, _ = pair_loss(adapted, moving, fixed, weight=weight, sim_loss=sim)  # the same weight map
    assert loss20.item() < 0.95 * loss0.item()
    # the original networks are untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in var.state_dict().items():
        assert torch.equal(v, var_before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert not any(p.requires_grad for p in adapted.parameters())
    # the DDF returned is the adapted copy's, and differs from the network's
    ddf = optimise_pair(net, var, moving, fixed, steps=20, lr=1e-3, sim_loss=sim)
    with torch.no_grad():
        assert torch.allclose(ddf, adapted(torch.cat([moving, fixed], 1)), atol=1e-6)
        assert (ddf - net(torch.cat([moving, fixed], 1))).abs().max() > 1e-2


def test_deterministic_and_global_rng_untouched(pair):
    moving, fixed = pair
    net = _network()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = optimise_pair(net, None, moving, fixed, steps=5, lr=1e-3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = optimise_pair(net, None, moving, fixed, steps=5, lr=1e-3, seed=7)
    assert torch.equal(a, b)


def test_weight_map_comes_from_the_variance_network(pair):
    moving, fixed = pair
    net = _network()
    sim = SNRWeightedMSELoss(**UNIT_MEAN)
    half = moving.shape[-1] // 2
    grads = {}
    for side in ("right", "left"):
        var = HalfVariance(side=side)
        loss, fwd, weight = pair_loss(net, moving, fixed, var, sim_loss=sim, lambda_reg=0.0)
        g = torch.autograd.grad(loss, fwd["warped"])[0].abs()[0, 0]
        grads[side] = (g[:, :half].sum().item(), g[:, half:].sum().item())  # (left half, right half)
        with torch.no_grad():
            assert torch.allclose(weight, sim.weight_map(fixed, var(torch.cat([fwd["warped"], fixed], 1))))
    # huge σ̂ on a half: the data term's gradient vanishes there, not on the other half
    left, right = grads["right"]
    assert right < 1e-3 * left
    left, right = grads["left"]
    assert left < 1e-3 * right


def test_optimisation_uses_the_variance_network(pair):
    moving, fixed = pair
    net = _network()
    sim = SNRWeightedMSELoss(**UNIT_MEAN)
    kw = dict(steps=5, lr=1e-3, sim_loss=sim)
    plain = optimise_pair(net, None, moving, fixed, **kw)  # unit weights
    # a constant σ̂ gives w = 1 with this normalisation: the same optimisation as without a variance network
    assert torch.allclose(optimise_pair(net, ConstantVariance(), moving, fixed, **kw), plain, atol=1e-4)
    var = HalfVariance(side="right")
    half = optimise_pair(net, var, moving, fixed, weight_every=1, **kw)
    assert var.calls == 5  # the weight is refreshed from the current Î_f at every step
    assert (half - plain).abs().max() > 1e-2
    var = HalfVariance(side="right")
    once = optimise_pair(net, var, moving, fixed, weight_every=0, **kw)
    assert var.calls == 1
    assert torch.allclose(once, half, atol=1e-5)  # the weight map of this variance network does not change


def test_vanilla_unit_weights_are_plain_mse(pair):
    moving, fixed = pair
    net = _network()
    assert torch.equal(pair_weight(None, SNRWeightedMSELoss(), moving, fixed), torch.ones_like(fixed))
    loss, fwd, _ = pair_loss(net, moving, fixed, None, lambda_reg=0.5)
    warp = Warp(mode="bilinear", padding_mode="border")
    mse = torch.mean((warp(moving, fwd["ddf"]) - fixed) ** 2)
    reg = GradientSmoothnessLoss(multiplier=2.0)(fwd["field"])
    assert loss.item() == pytest.approx((mse + 0.5 * reg).item(), rel=1e-5)
    # a data term without weight_map (e.g. LNCC of a vanilla model) is called without weight
    assert pair_weight(None, torch.nn.MSELoss(), moving, fixed) is None
    ddf = optimise_pair(net, None, moving, fixed, steps=2, lr=1e-3, sim_loss=torch.nn.MSELoss())
    assert ddf.shape == (1, 2, 32, 32)


def test_batch_pairs_are_optimised_one_by_one(pair):
    moving, fixed = pair
    net = _network()
    both = optimise_pair(net, None, torch.cat([moving, fixed]), torch.cat([fixed, moving]), steps=3, lr=1e-3)
    first = optimise_pair(net, None, moving, fixed, steps=3, lr=1e-3)
    assert both.shape == (2, 2, 32, 32)
    assert torch.allclose(both[:1], first, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(steps=3, lr=0.0), "lr"), (dict(weight_every=-1), "")],
)
def test_bad_options_are_clear_errors(pair, kwargs, match):
    moving, fixed = pair
    args = dict(steps=1, lr=1e-3) | kwargs
    with pytest.raises(ValueError, match=match or "weight_every"):
        optimise_pair(_network(), None, moving, fixed, **args)
    with pytest.raises(ValueError, match="moving and fixed"):
        optimise_pair(_network(), None, moving, fixed[..., :16], steps=1, lr=1e-3)


class _FixedAwareReg(torch.nn.Module):
    extra_inputs = ("fixed",)

    def forward(self, field, fixed):
        return field.pow(2).mean() * fixed.mean()


class _NeedsLogVar(torch.nn.Module):
    extra_inputs = ("log_var",)

    def forward(self, field, log_var):
        return field.pow(2).mean()


def test_losses_get_their_extra_inputs(pair):
    moving, fixed = pair
    net = _network()
    loss, fwd, _ = pair_loss(net, moving, fixed, None, reg_loss=_FixedAwareReg(), lambda_reg=1.0)
    sim = torch.mean((fwd["warped"] - fixed) ** 2)
    assert loss.item() == pytest.approx((sim + fwd["field"].pow(2).mean() * fixed.mean()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="log_var"):
        pair_loss(net, moving, fixed, None, reg_loss=_NeedsLogVar(), lambda_reg=1.0)


# ---------------------------------------------------------------------------------------------- field-level IO


def _blobs(size: int = 32, nd: int = 2) -> torch.Tensor:
    """A smooth image of a few Gaussian blobs (1, 1, *spatial) in [0, 1]."""
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * nd, indexing="ij")
    img = torch.zeros_like(axes[0])
    for c, s in (((0.35, 0.4), 3.0), ((0.65, 0.6), 4.0), ((0.5, 0.25), 2.5)):
        centre = [size * c[i % 2] for i in range(nd)]
        img += torch.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, centre)) / (2 * s * s))
    return (img / img.max())[None, None]


def _smooth_warp(size: int = 32, amp: float = 1.5) -> torch.Tensor:
    """A known smooth DDF (1, 2, size, size): a low-frequency sine field of ``amp`` px."""
    y, x = torch.meshgrid(*[torch.linspace(0, torch.pi, size)] * 2, indexing="ij")
    return amp * torch.stack([torch.sin(x) * torch.sin(y), torch.cos(x) * torch.sin(y)])[None]


def test_field_zero_steps_is_the_network_ddf(pair):
    moving, fixed = pair
    net = _network()
    net.train()
    ddf = optimise_field(net, HalfVariance(), moving, fixed, steps=0)
    net.eval()
    with torch.no_grad():
        expected, field = net(torch.cat([moving, fixed], 1), return_field=True)
        assert torch.equal(integrate_field(net, field, moving.shape[2:]), expected)  # r = 0: the network's own head
    assert torch.equal(ddf, expected)
    assert ddf.abs().max() > 1e-3
    net.train()
    optimise_field(net, None, moving, fixed, steps=0)
    assert net.training  # mode restored


def test_field_steps_lower_the_error_of_a_known_warp():
    moving = _blobs()
    truth = _smooth_warp()
    fixed = Warp(mode="bilinear", padding_mode="border")(moving, truth)
    net = _network(init_std=1e-5)  # ≈ identity: everything left to the optimisation
    before = {k: v.clone() for k, v in net.state_dict().items()}
    err = lambda d: float((d - truth).norm(dim=1).mean())  # noqa: E731
    ddf0 = optimise_field(net, None, moving, fixed, steps=0)
    ddf = optimise_field(net, None, moving, fixed, steps=30, lr=0.2, grid=8, lambda_reg=0.0)
    assert err(ddf) < 0.6 * err(ddf0)
    mse = lambda d: float(((Warp()(moving, d) - fixed) ** 2).mean())  # noqa: E731
    assert mse(ddf) < 0.5 * mse(ddf0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # the network is untouched
    assert all(p.grad is None for p in net.parameters())


def test_field_is_diffeomorphic_on_a_hard_pair(pair):
    moving, fixed = pair
    net = _network()
    # a hard pair: the blobs moved by (6, -7) px on a 32² image, a large learning rate, the finest grid, many steps;
    # the default smoothness λ = 0.01 (without any, the discrete scaling and squaring of a 16² velocity of ±15 px
    # can fold: a velocity's exponential is a diffeomorphism only while the 7 squarings resolve it)
    hard = torch.roll(_blobs(), shifts=(6, -7), dims=(2, 3))
    ddf = optimise_field(net, None, _blobs(), hard, steps=100, lr=1.0, grid=32)
    assert ddf.abs().max() > 5.0  # it did deform a lot
    assert float(jacobian_determinant(ddf).min()) > 0  # no folding
    assert float(jacobian_stats(ddf)["fold_frac"][0]) == 0.0


def test_field_batch_is_pairs_one_by_one(pair):
    moving, fixed = pair
    net = _network()
    kw = dict(steps=4, lr=0.1, grid=8, instance_weight="snr", weight_every=2)
    var = HalfVariance(side="left", low=-3.0, high=1.0)
    both = optimise_field(net, var, torch.cat([moving, fixed]), torch.cat([fixed, moving]), **kw)
    first = optimise_field(net, var, moving, fixed, **kw)
    second = optimise_field(net, var, fixed, moving, **kw)
    assert both.shape == (2, 2, 32, 32)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_field_weight_modes(pair):
    moving, fixed = pair
    net = _network()
    var = HalfVariance(side="right")
    sim = SNRWeightedMSELoss(**UNIT_MEAN)
    kw = dict(steps=4, lr=0.1, grid=8, sim_loss=sim)
    mse = optimise_field(net, var, moving, fixed, instance_weight="mse", **kw)
    assert var.calls == 0  # plain MSE never calls h_φ
    assert torch.allclose(mse, optimise_field(net, None, moving, fixed, instance_weight="snr", **kw), atol=1e-6)
    frozen = optimise_field(net, var, moving, fixed, instance_weight="snr", weight_every=0, **kw)
    assert var.calls == 1  # once, from the network's Î_f
    optimise_field(net, var, moving, fixed, instance_weight="snr", weight_every=2, **kw)
    assert var.calls == 1 + 2  # steps 0 and 2
    assert (frozen - mse).abs().max() > 1e-3  # the right half is ignored with the weight


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(grid=1), "grid"), (dict(instance_weight="nll"), "instance_weight"), (dict(steps=-1), "steps")],
)
def test_field_bad_options_are_clear_errors(pair, kwargs, match):
    moving, fixed = pair
    with pytest.raises(ValueError, match=match):
        optimise_field(_network(), None, moving, fixed, **(dict(steps=1) | kwargs))


def test_field_3d_small_volume():
    torch.manual_seed(0)
    net = VoxelMorphDisplacement(spatial_dims=3, init_std=0.05, **SMALL)
    moving = _blobs(16, nd=3)
    fixed = torch.roll(moving, shifts=(1, -1, 1), dims=(2, 3, 4))
    ddf0 = optimise_field(net, None, moving, fixed, steps=0)
    ddf = optimise_field(net, None, moving, fixed, steps=5, lr=0.2, grid=16)
    assert ddf.shape == (1, 3, 16, 16, 16) and torch.isfinite(ddf).all()
    mse = lambda d: float(((Warp()(moving, d) - fixed) ** 2).mean())  # noqa: E731
    assert mse(ddf) < mse(ddf0)
    assert float(jacobian_stats(ddf)["fold_frac"][0]) == 0.0


def test_inference_instance_mode_field(tmp_path):
    """The inference config with instance_mode field (the default) / weights runs end to end on a tiny pair."""
    from monai.bundle import ConfigParser
    from test_inference import make_inferer, write_pair

    cfg = ConfigParser()
    cfg.read_config("configs/inference.yaml")
    torch.manual_seed(0)
    net = cfg.get_parsed_content("network_def")
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    torch.save(cfg.get_parsed_content("variance_def").state_dict(), tmp_path / "variance.pt")
    weights = {2: (str(tmp_path / "model.pt"), str(tmp_path / "variance.pt"))}
    from scripts.inference import make_pairs

    item = make_pairs(**{k: v for k, v in write_pair(tmp_path, "io", (32, 32), labels=False).items() if k != "id"})[0]
    base = make_inferer(weights).infer(item)["ddf"]
    field = make_inferer(weights, instance_steps=3).infer(item)["ddf"]
    assert field.shape == base.shape and float((field - base).abs().max()) > 1e-6
    inferer = make_inferer(weights, instance_steps=3)
    assert inferer.instance_mode == "field" and inferer.variance_network is None  # mse: h_φ not even loaded
    snr = make_inferer(weights, instance_steps=3, instance_weight="snr")
    assert snr.variance_network is not None
    weights_mode = make_inferer(weights, instance_steps=1, instance_mode="weights", instance_lr=1e-3).infer(item)["ddf"]
    assert float((weights_mode - field).abs().max()) > 1e-6
    bads = (dict(instance_mode="velocity"), dict(instance_weight="nll"), dict(instance_grid=1))
    for bad in bads + (dict(instance_field_lambda=-1.0),):
        with pytest.raises(Exception):
            make_inferer(weights, instance_steps=1, **bad)


def test_bench_field_specs_and_paired_test():
    from bundle.instance_bench import _field_spec, _ttest

    d = dict(lr=0.1, grid=32, weight="mse", every=0)
    assert _field_spec(25, d) == dict(d, steps=25)
    assert _field_spec("10:lr=0.2:grid=16:weight=snr:lam=0.03:every=5", d) == dict(
        steps=10, lr=0.2, grid=16, weight="snr", lam=0.03, every=5
    )
    with pytest.raises(ValueError, match="unknown key"):
        _field_spec("10:rate=1", d)
    assert _ttest([1.0, 2.0, 3.5], [1.1, 2.2, 3.0]) == pytest.approx(0.789, abs=1e-3)
    assert _ttest([1.0, 2.0], [1.0, 2.0]) != _ttest([1.0, 2.0], [1.0, 2.0])  # nan: no difference to test
