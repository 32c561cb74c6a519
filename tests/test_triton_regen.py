"""The Triton regenerate-in-registers kernels (run on CPU tensors under TRITON_INTERPRET=1, set in conftest) against
their torch references: weights bit for bit, matmuls within matmul tolerance, over odd shapes, dtypes, seeds,
both directions, batch shapes and strides, split-K slices and every autotuning configuration; and the CUDA ops'
choice between the fused kernel and the blockwise product."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seedrand.kernels import ops, triton_regen
from seedrand.kernels.init import sample
from seedrand.kernels.ops import (FUSED_MAX_ROWS, frozen_matmul, frozen_matmul_reference, regen_conv, regen_matmul,
                                  regen_matmul_reference)
from seedrand.kernels.projection import subspace_project
from seedrand.kernels.triton_regen import (_CONFIGS, _FP32_CONFIGS, split_k, triton_frozen_matmul, triton_project,
                                          triton_regen_matmul, triton_regen_weight)

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("normal", [False, True])
@pytest.mark.parametrize("shape,start,seed", [((7, 13), 0, 3), ((33, 5), 1000, 2**62 + 7), ((1, 1, 3, 3), 2**33, 0)])
def test_weight_fill_equals_reference(shape, start, seed, normal):
    got = triton_regen_weight(seed, shape, 0.37, normal, torch.float32, "cpu", start=start, block=64)
    expected = sample(seed, shape, "normal" if normal else "uniform", 0.37, start=start)
    if normal:  # Box-Muller's log/cos: libm and the interpreter's numpy may differ in the last bit
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("batch,out_features,in_features", [((5,), 19, 37), ((2, 3), 40, 17), ((1,), 1, 64)])
def test_matmul_equals_reference(dtype, transpose, batch, out_features, in_features):
    k = out_features if transpose else in_features
    x = torch.randn(*batch, k, generator=torch.Generator().manual_seed(len(batch) + k)).to(dtype)
    args = (1234567, out_features, in_features, 0.2, False, transpose)
    got = triton_regen_matmul(x, *args)
    expected = regen_matmul_reference(x, *args, 2**20)  # weight rounded to dtype, as the kernel's tiles
    assert got.shape == expected.shape and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


def assert_tiles_are_the_weight(out_features, in_features, transpose, normal, splits=None, config=None):
    """Multiplied by an identity, the kernel returns the tiles it generated: the reference weight bit for bit."""
    w = sample(77, (out_features, in_features), "normal" if normal else "uniform", 0.4)
    eye = torch.eye(out_features if transpose else in_features)
    got = triton_regen_matmul(eye, 77, out_features, in_features, 0.4, normal, transpose, splits=splits,
                              config=config)
    expected = w if transpose else w.T
    if normal:  # Box-Muller's log/cos: libm and the interpreter's numpy may differ in the last bit
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)


@settings(max_examples=30, deadline=None)
@given(out_features=st.integers(1, 200), in_features=st.integers(1, 200), rows=st.integers(1, 40),
       seed=st.integers(0, 2**63 - 1), normal=st.booleans(), transpose=st.booleans(), splits=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_matmul_equals_reference_on_random_shapes(out_features, in_features, rows, seed, normal, transpose, splits,
                                                   dtype):
    """Over random shapes (aligned or not, partial tiles, reductions of one to four 64-step slices), Philox keys
    over the whole range, both distributions, both directions and three dtypes, the kernel equals the torch
    reference within the dtype's rounding, relative to the output's largest entry."""
    k = out_features if transpose else in_features
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
    args = (seed, out_features, in_features, 0.3, normal, transpose)
    got = triton_regen_matmul(x, *args, splits=splits).float()
    expected = regen_matmul_reference(x, *args, 2**20).float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOLERANCE[dtype][0] * max(expected.abs().max(), 1.0)


@pytest.mark.parametrize("normal", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(19, 37), (12, 48), (33, 20)])
def test_matmul_tiles_are_the_weight(out_features, in_features, transpose, normal):
    """The tiles generated inside the matmul are the reference weight bit for bit, both where a row of W is whole
    Philox blocks (in_features % 4 == 0: four values per block) and where it is not."""
    assert_tiles_are_the_weight(out_features, in_features, transpose, normal)


def _tiles(config):
    return "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**config.kwargs) + f"w{config.num_warps}"


@pytest.mark.parametrize("config", list({_tiles(c): c for c in _CONFIGS + _FP32_CONFIGS}.values()), ids=_tiles)
@pytest.mark.parametrize("transpose", [False, True])
def test_every_autotuning_configuration_generates_the_weight(config, transpose, monkeypatch):
    """Each tile shape the autotuner may pick, for 16-bit and float32 inputs (BLOCK_K 8 to 64: an aligned row of
    the tile is 2 to 16 Philox blocks of four weights) generates the weight bit for bit, aligned and not, with
    partial edge tiles; the launches use that configuration's tiles (recorded on the way to the kernel)."""
    kernel, tiles = triton_regen._regen_matmul_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **flags):
                tiles.append({key: flags[key] for key in config.kwargs})
                return kernel[grid](*args, **flags)
            return launch

    monkeypatch.setattr(triton_regen, "_regen_matmul_kernel", Recorder())
    for out_features, in_features in [(70, 136), (45, 37)]:
        assert_tiles_are_the_weight(out_features, in_features, transpose, False, config=config)
    assert tiles == [config.kwargs] * 2


@pytest.mark.parametrize("normal", [False, True])
@pytest.mark.parametrize("out_features,in_features,transpose", [(44, 300, False), (45, 301, False),
                                                                (300, 44, True), (301, 45, True)])
def test_split_reduction_tiles_are_the_weight(out_features, in_features, transpose, normal):
    """Split-K: a reduction of 300-301 steps in three slices (128, 128 and the rest, each its own programs, their
    float32 partial sums added) still gives the weight bit for bit: a slice that starts at the wrong counter,
    overlaps another or stops short changes it."""
    assert_tiles_are_the_weight(out_features, in_features, transpose, normal, splits=3)


def test_split_k_slices_only_outputs_too_small_for_the_gpu():
    sms = 132  # H100/H200
    assert split_k(4096, 4096, 4096, sms) == 1 and split_k(256, 4096, 4096, sms) == 1  # enough output tiles
    for m, n, k in [(1, 4096, 4096), (16, 1024, 8192), (1, 1000, 10**6)]:  # a small batch; P.T @ g, d = 1000
        slices = split_k(m, n, k, sms)
        tiles = -(-n // 64)
        assert slices > 1 and tiles * slices >= 2 * sms and k // slices >= 256, (m, n, k, slices)
    assert split_k(1, 64, 300, sms) == 1  # too short a reduction to slice
    assert split_k(0, 4096, 4096, sms) == 1  # an empty batch


def test_normal_weights_and_strided_input():
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(1))[:, ::2]  # (9, 20), stride 2 along K
    got = triton_regen_matmul(x, 42, 11, 20, 0.5, True, False)
    torch.testing.assert_close(got, regen_matmul_reference(x, 42, 11, 20, 0.5, True, False, 2**20), rtol=1e-5,
                               atol=1e-5)


def test_backward_is_the_transposed_kernel():
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    regen_matmul(x, 5, 10, 24, 0.3, False, False, 2**20).square().sum().backward()
    y = triton_regen_matmul(x.detach(), 5, 10, 24, 0.3, False, False)
    grad = triton_regen_matmul(2 * y, 5, 10, 24, 0.3, False, True)  # d(sum y^2)/dx = (2 y) @ W
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)


def assert_frozen_matmul_equals_reference(out_f, in_f, trained_dim, transpose, kind, dtype, splits=None):
    """The kernel against the op's torch reference, for an (out_f, in_f) weight with rows (columns) frozen."""
    n = (out_f, in_f)[trained_dim]
    frozen = {1, 2, 30, 31, 32, 36, 127, 128, 129, 256} & set(range(n))  # straddling tiles and split-K slices
    trained = torch.tensor([i for i in range(n) if i not in frozen])
    source = torch.full((n,), -1, dtype=torch.int64)
    source[trained] = torch.arange(len(trained))
    shape = [out_f, in_f]
    shape[trained_dim] = len(trained)
    trainable = torch.randn(shape[::-1], generator=torch.Generator().manual_seed(7)).T  # non-contiguous
    x = torch.randn(3, 5, out_f if transpose else in_f, generator=torch.Generator().manual_seed(8)).to(dtype)
    args = (trained_dim, 99, 0.25, kind, transpose)
    got = triton_frozen_matmul(x, trainable, source, *args, splits=splits)
    expected = frozen_matmul(x.float(), trainable, source, trained, *args)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["uniform", "normal", "zero"])
@pytest.mark.parametrize("trained_dim,transpose", [(0, False), (0, True), (1, False), (1, True)])
def test_frozen_matmul_equals_reference(trained_dim, transpose, kind, dtype):
    """freeze_fraction in one launch: trainable rows (columns) loaded, frozen ones generated; odd sizes, a frozen
    set that straddles tiles, a strided trainable slice."""
    assert_frozen_matmul_equals_reference(37, 44, trained_dim, transpose, kind, dtype)


@pytest.mark.parametrize("kind", ["uniform", "zero"])
@pytest.mark.parametrize("out_f,in_f,trained_dim,transpose", [(37, 300, 1, False), (300, 44, 0, True)])
def test_split_reduction_frozen_matmul(out_f, in_f, trained_dim, transpose, kind):
    """Split-K over the frozen dimension (300 steps in three slices; frozen rows on both sides of a boundary)."""
    assert_frozen_matmul_equals_reference(out_f, in_f, trained_dim, transpose, kind, torch.float32, splits=3)


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "very_sparse"])
@pytest.mark.parametrize("transpose,splits", [(False, None), (True, None), (True, 2)])
def test_project_equals_reference(kind, transpose, splits):
    """``P @ x`` and ``P.T @ x``, the latter also split-K (its 83 steps in slices of 64 and 19)."""
    rows, cols = 83, 11
    x = torch.randn(rows if transpose else cols, generator=torch.Generator().manual_seed(9))
    got = triton_project(x, 5, rows, cols, kind, 0.3, transpose, splits=splits)
    torch.testing.assert_close(got, subspace_project(x, 5, rows, cols, kind, 0.3, transpose, 2**10), rtol=1e-5,
                               atol=1e-6)


def test_float32_multiplies_as_torchs_matmul_is_set(monkeypatch):
    """float32 inputs multiply in full precision by default and in TF32 once torch allows it for matmuls
    (``torch.set_float32_matmul_precision("high")``); 16-bit inputs are not affected. The interpreter's dot ignores
    the precision, so the launch's flags are what is checked."""
    launched = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **flags: launched.append((args[0].dtype, flags["PRECISION"]))

    monkeypatch.setattr(triton_regen, "_regen_matmul_kernel", Spy())
    x, matmul = torch.randn(2, 8), torch.backends.cuda.matmul
    default = matmul.fp32_precision  # a computed attribute: monkeypatch cannot restore it
    try:
        for precision in ("ieee", "tf32"):
            matmul.fp32_precision = precision
            for dtype in (torch.float32, torch.float16):
                triton_regen_matmul(x.to(dtype), 1, 4, 8, 0.1, False, False)
    finally:
        matmul.fp32_precision = default
    assert launched == [(torch.float32, "ieee"), (torch.float16, "ieee"), (torch.float32, "tf32"),
                        (torch.float16, "ieee")]


@pytest.mark.parametrize("batch", [(2, FUSED_MAX_ROWS // 2), (FUSED_MAX_ROWS + 1,)])
def test_cuda_matmuls_fuse_small_batches_only(batch, monkeypatch):
    """The CUDA kernels of regen_matmul and frozen_matmul (called on CPU tensors: the Triton kernel runs under the
    interpreter) run the fused kernel up to FUSED_MAX_ROWS rows of x, counted over all leading dimensions, and the
    blockwise product above; both give the reference's result."""
    launches = []
    launch = triton_regen._matmul
    monkeypatch.setattr(triton_regen, "_matmul", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    x = torch.randn(*batch, 24, generator=torch.Generator().manual_seed(3))
    args = (5, 10, 24, 0.3, False, False, 2**20)
    torch.testing.assert_close(ops._regen_matmul_cuda(x, *args), regen_matmul_reference(x, *args), rtol=1e-5,
                               atol=1e-5)
    source = torch.tensor([0, -1, 1, 2, -1, 3, 4, -1, -1, 5])  # rows 1, 4, 7 and 8 of W frozen
    frozen = (torch.randn(6, 24), source, (source >= 0).nonzero().squeeze(1), 0, 9, 0.2, "uniform", False)
    torch.testing.assert_close(ops._frozen_matmul_cuda(x, *frozen), frozen_matmul_reference(x, *frozen), rtol=1e-5,
                               atol=1e-5)
    assert len(launches) == (2 if x[..., 0].numel() <= FUSED_MAX_ROWS else 0)


def test_cuda_kernels_are_registered():
    for op in ("regen_matmul", "frozen_matmul", "subspace_project"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seedrand::{op}", "CUDA"), op


def test_bad_input():
    with pytest.raises(ValueError, match="last dimension 3"):
        triton_regen_matmul(torch.randn(2, 3), 1, 4, 5, 0.1, False, False)
    with pytest.raises(ValueError, match="float64"):
        triton_regen_matmul(torch.randn(2, 5, dtype=torch.float64), 1, 4, 5, 0.1, False, False)
    with pytest.raises(ValueError, match="splits must be at least 1"):
        triton_regen_matmul(torch.randn(2, 5), 1, 4, 5, 0.1, False, False, splits=0)


# the compiled kernels: on a GPU run TRITON_INTERPRET=0 python -m pytest tests/test_triton_regen.py -k cuda_ops
# (the other tests here launch on CPU tensors, which only the interpreter accepts)
@pytest.mark.skipif(not torch.cuda.is_available() or triton_regen._INTERPRETED,
                    reason="needs a GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.bfloat16, "ieee")])
def test_cuda_ops_match_cpu(dtype, precision):
    matmul = torch.backends.cuda.matmul
    default, matmul.fp32_precision = matmul.fp32_precision, precision  # tf32: float32 on the tensor cores
    try:
        check_cuda_ops_match_cpu(dtype)
    finally:
        matmul.fp32_precision = default


def check_cuda_ops_match_cpu(dtype):
    x, gemv = torch.randn(64, 96, dtype=dtype), torch.randn(2, 4096, dtype=dtype)  # gemv: split-K on the GPU
    big = torch.randn(FUSED_MAX_ROWS + 44, 96, dtype=dtype)  # the blockwise product, chunks from the Triton fill
    for inputs, op_args in ((x, (7, 48, 96, 0.1, False, False, 2**20)), (gemv, (7, 48, 4096, 0.1, False, False, 2**20)),
                            (gemv, (7, 4096, 48, 0.1, True, True, 2**20)), (big, (7, 48, 96, 0.1, True, False, 2**12))):
        torch.testing.assert_close(regen_matmul(inputs.cuda(), *op_args).cpu().float(),
                                   regen_matmul(inputs, *op_args).float(), rtol=2e-2, atol=2e-2)
    trainable, source, trained = torch.randn(40, 96), torch.arange(-8, 40).clamp_min(-1), torch.arange(8, 48)
    for inputs in (x, big):
        frozen = (inputs, trainable, source, trained, 0, 3, 0.1, "uniform", False)
        on_gpu = [a.cuda() if torch.is_tensor(a) else a for a in frozen]
        torch.testing.assert_close(frozen_matmul(*on_gpu).cpu().float(), frozen_matmul(*frozen).float(), rtol=2e-2,
                                   atol=2e-2)
    theta_d, g = torch.randn(12), torch.randn(100_000)
    for kind in ("gaussian", "sparse", "very_sparse"):
        torch.testing.assert_close(subspace_project(theta_d.cuda(), 4, 500, 12, kind, 0.1, False, 2**20).cpu(),
                                   subspace_project(theta_d, 4, 500, 12, kind, 0.1, False, 2**20))
        torch.testing.assert_close(subspace_project(g.cuda(), 4, 100_000, 12, kind, 0.1, True, 2**20).cpu(),
                                   subspace_project(g, 4, 100_000, 12, kind, 0.1, True, 2**20), rtol=1e-4, atol=1e-4)
    image = torch.randn(2, 3, 9, 9, dtype=dtype)
    conv = (11, [4, 3, 3, 3], 0.2, False, [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(regen_conv(image.cuda(), *conv).cpu().float(), regen_conv(image, *conv).float(),
                               rtol=2e-2, atol=2e-2)
