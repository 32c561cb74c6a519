"""seedrand::regen_matmul: equals a matmul by the materialized regenerated weight, chunk size does not matter,
gradients are right (gradcheck, float64), nothing is saved for backward, and it compiles and exports.
seedrand::frozen_matmul: its assembled weight has the trainable slice and the frozen rows of the whole regenerated
weight, its product by blocks of rows (any chunk size) equals the product by the assembled weight, gradients pass
gradcheck and opcheck, and vmap over ensemble members' slices gives each member's result."""

import pytest
import torch

from seedrand.kernels.init import regenerate
from seedrand.kernels.ops import frozen_matmul, frozen_matmul_reference, frozen_weight, regen_matmul

SEED = 987654321


def weight(out_f, in_f, scale, normal, dtype=torch.float32):
    return regenerate(SEED, (out_f, in_f), f"normal({scale})" if normal else f"uniform({scale})", 1, 1, dtype)


@pytest.mark.parametrize("shape,out_f,in_f", [((5, 7), 3, 7), ((2, 3, 33), 17, 33), ((1, 64), 129, 64)])
@pytest.mark.parametrize("normal", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4, 4 * 33 * 5, 2**22])
def test_matches_materialized_weight(shape, out_f, in_f, normal, chunk_bytes):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w = weight(out_f, in_f, 0.25, normal)
    got = regen_matmul(x, SEED, out_f, in_f, 0.25, normal, False, chunk_bytes)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-6)
    g = torch.randn(*shape[:-1], out_f, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(regen_matmul(g, SEED, out_f, in_f, 0.25, normal, True, chunk_bytes), g @ w,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = regen_matmul(x, SEED, 24, 40, 0.1, False, False, 1024)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), (x.float() @ weight(24, 40, 0.1, False, dtype).float().T),
                               rtol=2e-2, atol=2e-2)


def test_gradcheck_float64():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda t: regen_matmul(t, SEED, 5, 6, 0.3, True, False, 48), (x,))
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(lambda t: regen_matmul(t, SEED, 5, 6, 0.3, True, True, 48), (y,))


def test_backward_saves_no_tensor():
    x = torch.randn(8, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = regen_matmul(x, SEED, 512, 256, 0.05, False, False, 2**16)
    out.sum().backward()
    assert saved == []
    torch.testing.assert_close(x.grad, torch.ones(8, 512) @ weight(512, 256, 0.05, False), rtol=1e-5, atol=1e-5)


def test_opcheck():
    x = torch.randn(3, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.seedrand.regen_matmul.default, (x, SEED, 7, 10, 0.2, False, False, 80))


def test_compile_and_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return regen_matmul(x, SEED, 9, 12, 0.2, False, False, 96)

    x = torch.randn(4, 12)
    eager = M()(x)
    torch.testing.assert_close(torch.compile(M(), backend="aot_eager")(x), eager)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: batch},))
    calls = [n for n in ep.graph.nodes if n.target == torch.ops.seedrand.regen_matmul.default]
    assert len(calls) == 1
    torch.testing.assert_close(ep.module()(torch.cat([x, x])), torch.cat([eager, eager]))


def test_wrong_input_width():
    with pytest.raises(ValueError, match="last dimension 5"):
        regen_matmul(torch.randn(2, 5), SEED, 3, 4, 0.1, False, False, 64)


def frozen_case(trained_dim: int, out_f: int = 7, in_f: int = 10, frozen=(0, 3, 4), dtype=torch.float32):
    """A freeze_fraction weight's trainable slice and index maps (frozen rows/columns ``frozen``)."""
    n = (out_f, in_f)[trained_dim]
    trained = torch.tensor([i for i in range(n) if i not in frozen])
    source = torch.full((n,), -1, dtype=torch.int64)
    source[trained] = torch.arange(len(trained))
    shape = [out_f, in_f]
    shape[trained_dim] = len(trained)
    trainable = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(n), requires_grad=True)
    return trainable, source, trained


@pytest.mark.parametrize("trained_dim", [0, 1])
@pytest.mark.parametrize("kind", ["uniform", "normal", "zero"])
def test_frozen_weight_rows(trained_dim, kind):
    trainable, source, trained = frozen_case(trained_dim)
    w = frozen_weight(trainable.detach(), source, trained, trained_dim, SEED, 0.3, kind, torch.float32)
    assert torch.equal(w.index_select(trained_dim, trained), trainable.detach())
    frozen = torch.tensor([0, 3, 4])
    whole = torch.zeros(7, 10) if kind == "zero" else weight(7, 10, 0.3, kind == "normal")  # row-major counters
    assert torch.equal(w.index_select(trained_dim, frozen), whole.index_select(trained_dim, frozen))


@pytest.mark.parametrize("trained_dim", [0, 1])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "normal", "zero"])
@pytest.mark.parametrize("chunk_bytes", [4, 4 * 10 * 3, 2**22])
def test_frozen_matmul_blocks_equal_assembled_weight(trained_dim, transpose, kind, chunk_bytes):
    """The CPU path never assembles the whole weight: blocks of one row, of three rows (the last one short) or all
    rows give the product by the assembled weight."""
    trainable, source, trained = frozen_case(trained_dim)
    x = torch.randn(2, 3, 7 if transpose else 10, generator=torch.Generator().manual_seed(3))
    args = (source, trained, trained_dim, SEED, 0.3, kind, transpose)
    w = frozen_weight(trainable.detach(), source, trained, trained_dim, SEED, 0.3, kind, torch.float32)
    got = frozen_matmul_reference(x, trainable.detach(), *args, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got, x @ (w if transpose else w.T), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frozen_matmul: x has last dimension 6"):
        frozen_matmul_reference(torch.randn(2, 6), trainable.detach(), *args, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("trained_dim", [0, 1])
@pytest.mark.parametrize("transpose", [False, True])
def test_frozen_matmul_gradients(trained_dim, transpose):
    trainable, source, trained = frozen_case(trained_dim, dtype=torch.float64)
    x = torch.randn(2, 3, 7 if transpose else 10, dtype=torch.float64, requires_grad=True)
    args = (source, trained, trained_dim, SEED, 0.3, "uniform", transpose)
    assert torch.autograd.gradcheck(lambda a, t: frozen_matmul(a, t, *args), (x, trainable))
    torch.library.opcheck(torch.ops.seedrand.frozen_matmul.default, (x, trainable, *args))


def test_frozen_matmul_vmap_over_members():
    """Ensembles: a batch of trainable slices (one per member) beside one frozen weight, with gradients."""
    trainable, source, trained = frozen_case(0)
    members = torch.stack([trainable.detach(), 2 * trainable.detach()]).requires_grad_()
    x = torch.randn(4, 10)
    args = (source, trained, 0, SEED, 0.3, "normal", False)
    out = torch.func.vmap(lambda t: frozen_matmul(x, t, *args))(members)
    out.square().sum().backward()
    for i in range(2):
        member = members[i].detach().requires_grad_()
        expected = frozen_matmul(x, member, *args)
        expected.square().sum().backward()
        torch.testing.assert_close(out[i], expected)
        torch.testing.assert_close(members.grad[i], member.grad)
