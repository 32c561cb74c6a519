"""Random projections (statistics, blockwise regeneration, gradients) and the `subspace` action."""

import math

import pytest
import torch
from conftest import LAYER_NAMES, all_layers, logits

import seedrand
from seedrand import PolicyError
from seedrand.kernels.projection import PROJECTIONS, column_norms, project, subspace_project
from seedrand.passes.subspace import SubspaceCoordinates, SubspaceTensor


def materialize(kind, rows, cols, seed=3, **kw):
    """P column by column (P @ e_j): small sizes only."""
    return torch.stack([project(torch.eye(cols)[j], seed, rows, kind, **kw) for j in range(cols)], dim=1)


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_projection_statistics(kind):
    rows, cols = 2048, 24
    p = materialize(kind, rows, cols)
    assert abs(p.mean().item()) < 3e-3
    assert p.var().item() * rows == pytest.approx(1.0, rel=0.05)  # unit columns in expectation
    expected_density = {"sparse": 1 / 3, "very_sparse": 1 / math.sqrt(rows)}.get(kind, 1.0)
    assert (p != 0).float().mean().item() == pytest.approx(expected_density, rel=0.1)
    gram = p.T @ p
    if kind == "orthogonal":
        torch.testing.assert_close(gram, torch.eye(cols), atol=1e-5, rtol=0)
    else:  # approximately orthonormal: Johnson-Lindenstrauss
        assert (gram - torch.eye(cols)).abs().max() < (0.5 if kind == "very_sparse" else 0.2)
    if kind in ("sparse", "very_sparse"):  # exactly three values
        assert len(torch.unique(p)) == 3


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "very_sparse", "orthogonal"])
def test_blockwise_regeneration_equals_one_shot(kind):
    x = torch.randn(20, generator=torch.Generator().manual_seed(0))
    one_shot = project(x, 9, 500, kind, chunk_bytes=2**30)
    for chunk in (80, 4 * 20 * 7, 4096):  # one row, 7 rows, ragged blocks: same P, other summation order
        torch.testing.assert_close(project(x, 9, 500, kind, chunk_bytes=chunk), one_shot, rtol=1e-6, atol=1e-6)
    p = materialize(kind, 500, 20, seed=9)
    torch.testing.assert_close(one_shot, p @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "very_sparse", "orthogonal"])
def test_gradcheck_and_nothing_saved(kind):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda t: subspace_project(t, 4, 40, 6, kind, 0.3, False, 256)  # noqa: E731
    # the op computes in float32, so gradcheck with float32-level tolerances
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-3, atol=1e-3, rtol=1e-3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x).sum().backward()
    assert saved == []


def test_fastfood_gradient_is_p_transpose():
    x = torch.randn(12, requires_grad=True)
    g = torch.randn(300)
    (grad,) = torch.autograd.grad((project(x, 2, 300, "fastfood") * g).sum(), x)
    torch.testing.assert_close(grad, materialize("fastfood", 300, 12, seed=2).T @ g, rtol=1e-4, atol=1e-5)


def test_normalize_gives_exact_unit_columns():
    norms = column_norms(5, 300, 10, "sparse")
    assert torch.equal(norms, materialize("sparse", 300, 10, seed=5).norm(dim=0).float()) or \
        torch.allclose(norms, materialize("sparse", 300, 10, seed=5).norm(dim=0), rtol=1e-6)
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(["fc"], dim=4, projection="sparse", normalize=True), inputs, graph=True)
    coords = gm.get_submodule("fc.subspace")
    columns = torch.stack([_delta_for(coords, j) for j in range(4)], dim=1)
    torch.testing.assert_close(columns.norm(dim=0), torch.ones(4), rtol=1e-5, atol=0)


def _delta_for(coords, j):
    with torch.no_grad():
        coords.theta_d.zero_()
        coords.theta_d[j] = 1
        return coords()


def policy(modules, **params):
    return {"version": 1, "seed": 6, "rules": [{"name": "sub", "match": {"modules": list(modules)}, "subspace": params}]}


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_starts_at_theta0_and_trains_only_theta_d(projection, scope):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(LAYER_NAMES, dim=5, projection=projection, scope=scope), inputs, graph=True)
    assert torch.equal(gm(*inputs), model(*inputs))
    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert [p.shape for p in trainable] == [(5,)] * (len(LAYER_NAMES) if scope == "per_layer" else 1)
    gm.train()
    opt = torch.optim.Adam(trainable, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        gm(*inputs).square().mean().backward()
        opt.step()
    assert not torch.equal(gm.eval()(*inputs), model(*inputs))
    # every parameter moved exactly along P @ theta_d
    for name in LAYER_NAMES:
        tensor = gm.get_submodule(f"{name}.weight")
        coords = gm.get_submodule(f"{name}.subspace" if scope == "per_layer" else "subspace_0")
        with torch.no_grad():
            delta = coords()
        step = delta[tensor.start:tensor.start + tensor.theta0.numel()].view_as(tensor.theta0)
        assert torch.equal(tensor(delta), model.get_submodule(name).weight + step)


def test_exported_model_and_state_dict(zoo_models, tmp_path):
    model, inputs = zoo_models["gpt2"]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 2, "rules": [{"match": {"types": ["Conv1D"]}, "subspace": {
        "dim": 32, "scope": "global", "projection": "fastfood"}}]}, inputs, graph=True)
    assert gm.meta["seedrand"].trace.strategy == "torch.export"
    assert torch.equal(logits(gm(*inputs)), logits(model(*inputs)))
    state = gm.state_dict()
    assert {"subspace_0.theta_d", "subspace_0.projection_seed", "subspace_0.projection_fingerprint"} <= set(state)
    with torch.no_grad():
        gm.get_submodule("subspace_0").theta_d.normal_()
    seedrand.save(gm, tmp_path / "s.safetensors")
    loaded = seedrand.load(tmp_path / "s.safetensors", model, graph=True)
    assert torch.equal(logits(loaded(*inputs)), logits(gm(*inputs)))
    summary, conv1d = seedrand.summary(gm), sum(p.numel() for n, p in model.named_parameters() if ".c_" in n)
    assert summary.total.trainable == 32 + sum(p.numel() for p in model.parameters()) - conv1d
    assert summary.total.regenerated == 32 * conv1d and summary.total.frozen == conv1d  # P; theta0 kept


def test_theta0_random_is_the_random_actions_init():
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(["fc", "conv2"], dim=3, theta0="random"), inputs, graph=True)
    ref = seedrand.rewrite(model, {"version": 1, "seed": 6, "rules": [{"match": {"modules": ["fc", "conv2"]}, "random": {
        "bias": "random"}}]}, inputs, graph=True)
    for name in ("fc", "conv2"):
        zero = torch.zeros(gm.get_submodule(f"{name}.subspace").rows)
        assert torch.equal(gm.get_submodule(f"{name}.weight")(zero), ref.get_submodule(name).weight)
        assert torch.equal(gm.get_submodule(f"{name}.bias")(zero), ref.get_submodule(name).regenerate("bias"))
    assert "fc.weight.theta0" not in gm.state_dict()


def test_p_larger_than_8_gib_is_never_materialized():
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 2048))
    x = torch.randn(4, 1024)
    gm = seedrand.rewrite(layer, policy(["0"], dim=1024, projection="fastfood"), x, graph=True)
    coords = gm.get_submodule("0.subspace")
    assert coords.rows * 1024 * 4 > 8 * 2**30  # materialized P would need more than 8 GiB
    gm(x).square().mean().backward()
    assert coords.theta_d.grad.shape == (1024,) and coords.theta_d.grad.abs().sum() > 0


@pytest.mark.parametrize("names,params,message", [
    (["emb"], {"dim": 500, "projection": "orthogonal"}, r"'emb' \(Embedding\): projection orthogonal needs dim <= D"),
    (["proj"], {"dim": 2, "theta0": "random"}, r"'proj' \(Conv1D\): theta0: random does not support .*Conv1D"),
])
def test_errors_name_module_and_rule(names, params, message):
    model, inputs = all_layers()
    with pytest.raises(PolicyError, match=r"rule 'sub' .*" + message):
        seedrand.rewrite(model, policy(names, **params), inputs, graph=True)


def test_installed_modules():
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(["emb"], dim=2), inputs, graph=True)
    assert isinstance(gm.get_submodule("emb.weight"), SubspaceTensor)
    assert isinstance(gm.get_submodule("emb.subspace"), SubspaceCoordinates)


def test_intrinsic_dimension_sweep_writes_csv_and_plot(tmp_path):
    import csv

    from seedrand import zoo
    from seedrand.intrinsic import intrinsic_dimension

    result = intrinsic_dimension(zoo.digits_task(hidden=32, steps=60), [4, 300], out_dir=tmp_path)
    assert result.baseline > 0.8  # direct training works on digits
    assert result.scores[1] > result.scores[0] + 0.2  # more dimensions, better accuracy
    assert result.d_threshold == next((d for d, s in zip(result.dims, result.scores)
                                       if s >= 0.9 * result.baseline), None)
    rows = list(csv.DictReader(open(result.csv_path)))
    assert [int(r["d"]) for r in rows] == [4, 300] and float(rows[1]["score"]) == pytest.approx(result.scores[1])
    assert result.plot_path.stat().st_size > 10_000  # a PNG was drawn


def test_intrinsic_dimension_cli(tmp_path):
    from seedrand.cli import main

    assert main(["intrinsic-dimension", "--task", "tests.test_subspace:tiny_task", "--dims", "2,8",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "intrinsic_dimension.csv").exists() and (tmp_path / "intrinsic_dimension.png").exists()
    assert main(["intrinsic-dimension", "--dims", "ten"]) == 2


def tiny_task():
    from seedrand import zoo

    return zoo.digits_task(hidden=8, steps=5)


def test_custom_op_registrations_and_compile():
    x = torch.randn(5)
    torch.library.opcheck(torch.ops.seedrand.subspace_project.default, (x, 3, 30, 5, "sparse", 0.3, False, 64))
    model, inputs = all_layers()
    for projection in ("gaussian", "fastfood"):
        gm = seedrand.rewrite(model, policy(["fc", "conv2"], dim=4, projection=projection), inputs, graph=True)
        with torch.no_grad():
            for name in ("fc", "conv2"):
                gm.get_submodule(f"{name}.subspace").theta_d.normal_()
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="seedrand")
        torch.testing.assert_close(compiled(*inputs), gm(*inputs), rtol=1e-5, atol=1e-6)
