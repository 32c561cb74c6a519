"""The numba CPU Philox equals the torch reference bit for bit (randint, rand; randn within one float32 rounding of
the reference's log/sin/cos) for any seed, offsets (beyond 2**32, any shape, non-contiguous, ranges starting anywhere
in a block) and is used only where real CPU tensors are computed."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from seedrand.kernels import cpu_philox, philox


def reference(fn, seed, offsets):
    """``fn`` computed by the torch ops (what compiled graphs and ONNX run)."""
    with mock.patch.object(cpu_philox, "usable", return_value=False):
        return fn(seed, offsets)


FUNCTIONS = (philox.randint, philox.rand, philox.randn)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**63), 2**64 - 1), start=st.integers(0, 2**62), n=st.integers(0, 5000))
def test_equals_reference(seed, start, n):
    offsets = torch.arange(start, start + n, dtype=torch.int64)
    for fn in FUNCTIONS:
        for counters in (offsets, range(start, start + n)):
            got, expected = fn(seed, counters), reference(fn, seed, counters)
            if fn is philox.randn:  # polynomial log/sin/cos against torch's: one float32 rounding apart at most
                assert got.dtype == expected.dtype and torch.allclose(got, expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got, expected), (fn.__name__, type(counters))
    # a range is the same stream as its offsets, bit for bit
    for fn in FUNCTIONS:
        assert torch.equal(fn(seed, range(start, start + n)), fn(seed, offsets)), fn.__name__


def test_symmetric_uniform_equals_the_torch_expression():
    for counters in (range(3, 70001), torch.arange(5, 9000).reshape(5, -1)[:, ::3]):
        expected = (2.0 * reference(philox.rand, 17, counters) - 1.0) * 0.25
        assert torch.equal(cpu_philox.symmetric_uniform(17, counters, 0.25), expected)


def test_shapes_and_layouts():
    offsets = torch.randint(0, 2**40, (6, 7, 5), generator=torch.Generator().manual_seed(0)).transpose(0, 2)
    for fn in FUNCTIONS:
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
    for fn in FUNCTIONS:
        assert torch.allclose(fn(seed, offsets), reference(fn, seed, offsets), rtol=0,
                              atol=1e-6 if fn is philox.randn else 0)


def test_compiled_graphs_call_the_opaque_op():
    """Inductor gets one ``seedrand::philox_words`` node (run by numba) instead of inlining the ten rounds into
    every consumer, which took minutes to compile; the values are those of eager."""
    torch.library.opcheck(torch.ops.seedrand.philox_words.default, (-5, torch.arange(7, 40)))
    offsets = torch.arange(3, 300)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    for fn in FUNCTIONS:
        torch._dynamo.reset()
        eager = fn(2**64 - 3, offsets)
        captured = torch.compile(lambda o: fn(2**64 - 3, o), backend=backend)(offsets)
        # the graph computes Box-Muller with torch's log/sin/cos: normals within one float32 rounding of eager's
        torch.testing.assert_close(captured, eager, rtol=0, atol=1e-6 if fn is philox.randn else 0)
        compiled = torch.compile(lambda o: fn(2**64 - 3, o) * 2 + 1)(offsets)
        torch.testing.assert_close(compiled, eager * 2 + 1, rtol=0, atol=1e-6)
    assert len(graphs) == len(FUNCTIONS)
    assert all(any(n.target is torch.ops.seedrand.philox_words.default for n in gm.graph.nodes) for gm in graphs)


def test_normals_across_the_whole_range_of_u_and_every_quadrant():
    """Box-Muller's inputs over their whole domain, clamp and quadrant boundaries included: the polynomial log, sin
    and cos give what the reference's torch ops give, within one float32 rounding."""
    import numpy as np

    u = np.concatenate([np.float32([0.0, 1e-8, 1e-7, 1e-7 * 1.0001, 0.5, 0.70710677, 0.7071068, 1 - 2**-24]),
                        np.linspace(0, 1, 20001, dtype=np.float32)[1:-1]]).astype(np.float32)
    v = np.float32([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1 - 2**-24])
    u, v = np.repeat(u, len(v)), np.tile(v, len(u))
    cos, sin = np.empty_like(u), np.empty_like(u)
    cpu_philox._box_muller(u, v, cos, sin)
    r, theta = philox._box_muller(torch.from_numpy(u), torch.from_numpy(v))
    torch.testing.assert_close(torch.from_numpy(cos), r * torch.cos(theta), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(sin), r * torch.sin(theta), rtol=0, atol=1e-6)
