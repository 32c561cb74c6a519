"""The numba CPU Philox equals the torch reference bit for bit (randint, rand, randn) for any seed, offsets (beyond
2**32, any shape, non-contiguous) and is used only where real CPU tensors are computed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from seedrand.kernels import cpu_philox, philox


def reference(seed: int, offsets: torch.Tensor):
    c0, c1, _, _ = philox._philox(seed, offsets)
    u0, u1 = philox._uint32_to_uniform(c0), philox._uint32_to_uniform(c1)
    normal = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u0, 1.0e-7))) * torch.cos(6.283185307179586 * u1)
    return c0, u0, normal


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**63), 2**64 - 1), start=st.integers(0, 2**62), n=st.integers(0, 5000))
def test_equals_reference(seed, start, n):
    offsets = torch.arange(start, start + n, dtype=torch.int64)
    c0, u0, normal = reference(seed, offsets)
    assert torch.equal(philox.randint(seed, offsets), c0)
    assert torch.equal(philox.rand(seed, offsets), u0)
    assert torch.equal(philox.randn(seed, offsets), normal)


def test_shapes_and_layouts():
    offsets = torch.randint(0, 2**40, (6, 7, 5), generator=torch.Generator().manual_seed(0)).transpose(0, 2)
    for fn in (philox.randint, philox.rand, philox.randn):
        out = fn(99, offsets)
        assert out.shape == offsets.shape and torch.equal(out, fn(99, offsets.contiguous()))
    assert philox.rand(1, torch.empty(0, 3, dtype=torch.int64)).shape == (0, 3)
    assert torch.equal(philox.rand(7, torch.arange(10, dtype=torch.int32)), philox.rand(7, torch.arange(10)))


def test_used_only_for_real_cpu_tensors():
    assert cpu_philox.usable(torch.arange(3))
    with FakeTensorMode():
        assert not cpu_philox.usable(torch.arange(3))
    if torch.cuda.is_available():
        assert not cpu_philox.usable(torch.arange(3, device="cuda"))


def test_compiled_reference_path_agrees():
    offsets = torch.arange(1000)
    compiled = torch.compile(lambda o: philox.rand(2024, o), backend="eager", fullgraph=True)
    assert torch.equal(compiled(offsets), philox.rand(2024, offsets))


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -1])
def test_edge_seeds_and_offsets(seed):
    offsets = torch.tensor([0, 1, 2**31, 2**32 + 5, 2**62])
    assert torch.equal(philox.randint(seed, offsets), reference(seed, offsets)[0])
