"""Regenerated inits: the same bounds/std as torch.nn.init, chunks that agree with the whole, pure functions."""

import math

import pytest
import torch

from seedrand.kernels import philox
from seedrand.kernels.init import init_distribution, regenerate

SHAPES = [(64, 32), (16, 8, 3, 3), (10, 7, 5)]


def torch_reference(init, weight):
    """(kind, scale) the torch.nn.init function would use on ``weight``, from torch's own helpers."""
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight)
    if init == "kaiming_uniform":
        gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        return "uniform", gain * math.sqrt(3.0 / fan_in)
    if init == "kaiming_normal":
        return "normal", torch.nn.init.calculate_gain("leaky_relu", 0) / math.sqrt(fan_in)
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return ("uniform", math.sqrt(3.0) * std) if init == "xavier_uniform" else ("normal", std)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("init", ["kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal"])
def test_matches_torch_nn_init(init, shape):
    weight = torch.empty(shape)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight)
    kind, scale = init_distribution(init, fan_in, fan_out)
    ref_kind, ref_scale = torch_reference(init, weight)
    assert kind == ref_kind and scale == pytest.approx(ref_scale, rel=1e-12)
    # and torch.nn.init's own samples respect the same scale
    getattr(torch.nn.init, f"{init}_")(weight, **({"a": math.sqrt(5)} if init == "kaiming_uniform" else {}),
                                       generator=torch.Generator().manual_seed(0))
    if kind == "uniform":
        assert weight.abs().max().item() <= scale


def test_linear_default_bound_is_one_over_sqrt_fan_in():
    assert init_distribution("kaiming_uniform", 400, 10) == ("uniform", pytest.approx(1 / 20))


@pytest.mark.parametrize("init,kind,scale", [("normal(0.02)", "normal", 0.02), ("uniform(0.5)", "uniform", 0.5)])
def test_parametric_inits(init, kind, scale):
    assert init_distribution(init, 3, 4) == (kind, scale)


def test_values_are_scaled_philox_bit_for_bit():
    w = regenerate(77, (8, 5), "uniform(0.5)", 5, 8)
    assert torch.equal(w, ((2.0 * philox.rand(77, torch.arange(40)) - 1.0) * 0.5).reshape(8, 5))
    z = regenerate(77, (8, 5), "normal(2.0)", 5, 8)
    assert torch.equal(z, (philox.randn(77, torch.arange(40)) * 2.0).reshape(8, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunks_equal_the_whole_and_statistics_hold(dtype):
    whole = regenerate(5, (512, 256), "kaiming_uniform", 256, 512, dtype)
    rows = torch.cat([regenerate(5, (n, 256), "kaiming_uniform", 256, 512, dtype, start=r * 256)
                      for r, n in ((0, 100), (100, 300), (400, 112))])
    assert whole.dtype == dtype and torch.equal(whole, rows)
    bound = 1 / 16
    w = whole.float()
    assert w.abs().max().item() <= bound * (1 + 2**-7)
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    assert abs(w.mean().item()) < 1e-3


@pytest.mark.parametrize("bad", ["he_uniform", "normal()", "uniform(-1)"])
def test_bad_init(bad):
    with pytest.raises(ValueError):
        init_distribution(bad, 3, 4)


def test_bad_fan():
    with pytest.raises(ValueError, match="positive"):
        init_distribution("xavier_normal", 0, 4)
