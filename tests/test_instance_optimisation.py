"""Test-time instance optimisation (scripts/instance_optimisation.py) on a tiny 32x32 phantom pair."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Warp

from scripts.data.phantom import make_pair
from scripts.instance_optimisation import adapt_network, optimise_pair, pair_loss, pair_weight
from scripts.losses import GradientSmoothnessLoss, SNRWeightedMSELoss
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
