"""The numba CPU Philox equals the torch reference bit for bit (randint, rand, randn) for any seed, offsets (beyond
2**32, any shape, non-contiguous, ranges starting anywhere in a block) and is used only where real CPU tensors are
computed."""

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
            assert torch.equal(fn(seed, counters), reference(fn, seed, counters)), (fn.__name__, type(counters))
    # a range is the same stream as its offsets (normals within libm's last bit: sin/cos run on other shapes)
    assert torch.equal(philox.randint(seed, range(start, start + n)), philox.randint(seed, offsets))
    assert torch.equal(philox.rand(seed, range(start, start + n)), philox.rand(seed, offsets))
    assert torch.allclose(philox.randn(seed, range(start, start + n)), philox.randn(seed, offsets), rtol=0, atol=1e-6)


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
        assert torch.equal(fn(seed, offsets), reference(fn, seed, offsets))


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
        assert torch.equal(torch.compile(lambda o: fn(2**64 - 3, o), backend=backend)(offsets), eager)
        compiled = torch.compile(lambda o: fn(2**64 - 3, o) * 2 + 1)(offsets)
        torch.testing.assert_close(compiled, eager * 2 + 1, rtol=0, atol=1e-6)
    assert len(graphs) == len(FUNCTIONS)
    assert all(any(n.target is torch.ops.seedrand.philox_words.default for n in gm.graph.nodes) for gm in graphs)
