"""TransMorph (scripts/transmorph.py): parameter count of the official configuration, DDF contract, 2D/3D,
diffeomorphic option, tracing. Forward passes use small widths to stay fast on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.blocks import Warp

from scripts.transmorph import (
    PARAMS_2D_DEFAULT,
    TransMorph,
    count_parameters,
    transmorph_2d_config,
    transmorph_3d_config,
)

SMALL = dict(embed_dim=12, num_heads=(2, 2, 2, 2))


def test_parameter_count_official_2d():
    model = TransMorph()  # embed 96, depths 2-2-4-2, heads 4-4-8-8, window 8x8, 128x128
    assert count_parameters(model) == PARAMS_2D_DEFAULT == 31_013_570
    assert count_parameters(TransMorph(**transmorph_2d_config())) == 31_013_570


def test_parameter_count_3d_configs():
    assert count_parameters(TransMorph(**transmorph_3d_config())) == 11_719_435
    assert count_parameters(TransMorph(**transmorph_3d_config(96))) == 46_710_835
    # official IXI setting (160x192x224, window 5x6x7): 46.77 M as reported in the TransMorph paper
    official = TransMorph(spatial_dims=3, img_size=(160, 192, 224), window_size=(5, 6, 7))
    assert count_parameters(official) == 46_771_251


def test_default_2d_forward_near_identity():
    torch.manual_seed(0)
    model = TransMorph().eval()
    x = torch.rand(1, 2, 128, 128)
    with torch.no_grad():
        ddf = model(x)
        ddf2, field = model(x, return_field=True)
    assert ddf.shape == (1, 2, 128, 128)
    assert ddf.abs().max() < 1e-2  # head ~ N(0, 1e-5): training starts from the identity
    assert field.shape == ddf.shape and torch.equal(ddf2, ddf)


def test_head_init():
    model = TransMorph(spatial_dims=2, img_size=64, **SMALL)
    assert model.reg_head.out_channels == 2
    assert float(model.reg_head.weight.detach().std()) < 1e-4
    assert float(model.reg_head.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("dims, size", [(2, (64, 64)), (3, (32, 32, 32))])
def test_contract_and_gradients(dims, size):
    torch.manual_seed(0)
    model = TransMorph(spatial_dims=dims, img_size=size, **SMALL)
    x = torch.rand(2, 2, *size, requires_grad=False)
    ddf, field = model(x, return_field=True)
    assert ddf.shape == (2, dims, *size)
    assert field is ddf  # not diffeomorphic: the regulariser acts on the DDF
    warped = Warp()(x[:, :1], ddf)
    loss = ((warped - x[:, 1:]) ** 2).mean() + ddf.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_odd_size_input():
    model = TransMorph(spatial_dims=2, img_size=64, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 2, 100, 72)).shape == (1, 2, 100, 72)


def test_diffeomorphic_velocity():
    torch.manual_seed(0)
    model = TransMorph(spatial_dims=2, img_size=64, integration_steps=7, **SMALL).eval()
    with torch.no_grad():
        model.reg_head.weight.normal_(0, 0.05)  # a non-trivial field
        ddf, v = model(torch.rand(1, 2, 64, 64), return_field=True)
    assert v.shape == ddf.shape == (1, 2, 64, 64)
    assert not torch.allclose(v, ddf)  # exp(v) != v for a non-trivial field
    # small velocities integrate to ~ themselves
    with torch.no_grad():
        model.reg_head.weight.normal_(0, 1e-7)
        ddf, v = model(torch.rand(1, 2, 64, 64), return_field=True)
    torch.testing.assert_close(ddf, v, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("dims, size, steps", [(2, (64, 64), 5), (3, (32, 32, 32), 0)])
def test_trace(dims, size, steps):
    torch.manual_seed(0)
    model = TransMorph(spatial_dims=dims, img_size=size, integration_steps=steps, depths=(2, 1, 1, 1), **SMALL).eval()
    x = torch.rand(1, 2, *size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shape-dependent branches are constant for a fixed size
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))


def test_bad_arguments():
    with pytest.raises(ValueError):
        TransMorph(spatial_dims=4)
    with pytest.raises(ValueError):
        TransMorph(img_size=(100, 100))
    with pytest.raises(ValueError):
        TransMorph(depths=(2, 2, 2))
