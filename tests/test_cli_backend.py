"""The console script and the torch.compile backend, as a user reaches them: in fresh processes."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import logits

from seedrand import SeedrandError

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_inspect_json_on_a_transformers_model():
    out = run("-m", "seedrand.cli", "inspect", "examples/policies/resnet_one_block.yaml",
              "--model", "seedrand.zoo:resnet", "--json").stdout
    report = json.loads(out)
    assert report["strategy"] == "torch.export"
    frozen = {r["module"] for r in report["rows"] if r["counts"]["frozen"]}
    assert "resnet.embedder.embedder.convolution" in frozen
    assert not any(m.startswith("resnet.encoder.stages.1") for m in frozen)
    assert report["total"]["trainable"] > 0 and report["total"]["frozen"] > 0


def test_inspect_table_and_console_script():
    out = subprocess.run(["seedrand", "inspect", "examples/policies/cnn_learn_only_batchnorm.yaml", "--model",
                          "seedrand.zoo:cnn"], capture_output=True, text=True, env=ENV, check=True).stdout
    assert "conv2" in out and "total" in out and "trainable" in out


def test_inspect_bad_policy_exits_2_with_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - match: {types: [Conv2D]}\n    freeze: {}\n")
    result = run("-m", "seedrand.cli", "inspect", str(bad), "--model", "seedrand.zoo:cnn", check=False)
    assert result.returncode == 2
    assert f"{bad}:3:5" in result.stderr and "did you mean 'Conv2d'" in result.stderr


def test_backend_is_found_by_entry_point_without_importing_seedrand():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "x = torch.randn(3, 8)\n"
        "assert 'seedrand' not in sys.modules\n"
        "c = torch.compile(m, backend='seedrand')\n"
        "torch.testing.assert_close(c(x), m(x))\n"
        "c(x).sum().backward()\n"
        "assert all(p.grad is not None for p in m.parameters())\n"
        "print('ok')\n"
    )
    assert run("-c", code).stdout.strip().endswith("ok")


def test_backend_compiles_a_rewritten_model(zoo_models):
    import seedrand

    model, inputs = zoo_models["cnn"]
    gm = seedrand.rewrite(model, "examples/policies/cnn_learn_only_batchnorm.yaml", inputs, graph=True)
    compiled = torch.compile(gm, backend="seedrand")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), gm(*inputs))


def test_backend_refuses_unknown_options():
    from seedrand.backend import seedrand_backend

    with pytest.raises(SeedrandError, match="does not support options"):
        seedrand_backend(None, [], options={"inductor_please": True})
    with pytest.raises(SeedrandError, match="option inductor is true or false, not 'no'"):
        seedrand_backend(None, [], options={"inductor": "no"})
    with pytest.raises(SeedrandError, match="options are a dict, not list"):
        seedrand_backend(None, [], options=["policy"])


@pytest.mark.parametrize("name,policy,frozen_prefixes", [
    ("cnn", "examples/policies/cnn_learn_only_batchnorm.yaml", ("conv1.", "conv2.")),
    ("gpt2", "examples/policies/gpt2_learn_only_layernorm.yaml", ("transformer.wte", "transformer.h.0.attn.c_attn",
                                                                  "transformer.h.1.mlp.c_proj")),
])
def test_backend_applies_a_policy_without_changing_the_model(zoo_models, name, policy, frozen_prefixes):
    model, inputs = zoo_models[name]
    model = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="seedrand", options={"policy": policy})
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled(*inputs)), logits(model(*inputs)))
    logits(compiled(*inputs)).square().mean().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    frozen = {n for n in grads if n.startswith(frozen_prefixes)}
    assert frozen and not any(grads[n] for n in frozen)
    assert any(grads.values())
    assert all(p.requires_grad for p in model.parameters())


def _conv_mlp():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 36, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("inductor,bias", [(False, "keep"), (True, "trainable")])
def test_backend_random_policy_computes_what_rewrite_computes(inductor, bias):
    """The backend's `random` regenerates the same weights as seedrand.rewrite (same keys), on an nn.Sequential
    (Dynamo names its root L['fn'], not L['self'])."""
    import seedrand

    model, x = _conv_mlp(), torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    policy = {"version": 1, "seed": 4, "rules": [{"match": {"modules": ["0", "3"]}, "random": {"bias": bias}}]}
    rewritten = seedrand.rewrite(model, policy, (x,), graph=True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="seedrand", options={"policy": policy, "inductor": inductor})(x)
    expected = rewritten(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert model[0].weight.grad is None and model[3].weight.grad is None  # regenerated: the stored weight is unused
    assert (model[0].bias.grad is None) == (bias == "keep")
    if bias == "trainable":
        torch.testing.assert_close(model[0].bias.grad, rewritten.get_submodule("0").bias.grad)
    torch.testing.assert_close(model[5].weight.grad, rewritten.get_submodule("5").weight.grad)


@pytest.mark.parametrize("inductor,fixed,dim", [(False, "random", "out"), (True, "random", "in"),
                                               (False, "zero", "out"), (True, "keep", "out")])
def test_backend_freeze_fraction_computes_what_rewrite_computes(inductor, fixed, dim):
    """The backend's freeze_fraction replaces the frozen slice of the user's whole parameter by rewrite's values
    (same selection and keys) on Linear, Conv, transformers Conv1D and embeddings; the gradient of the trainable
    slice equals rewrite's and the frozen slice gets none."""
    import seedrand
    from conftest import all_layers

    model, inputs = all_layers()
    names = ["emb", "conv1", "fc", "proj"] if dim == "out" else ["conv1", "fc", "proj"]
    policy = {"version": 1, "seed": 5, "rules": [{"match": {"modules": names},
                                    "freeze_fraction": {"fraction": 0.5, "select": "random", "fixed": fixed,
                                                        "dim": dim}}]}
    rewritten = seedrand.rewrite(model, policy, inputs, graph=True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="seedrand", options={"policy": policy, "inductor": inductor})(*inputs)
    expected = rewritten(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in names:
        weight = rewritten.get_submodule(f"{name}.weight")
        grad = model.get_submodule(name).weight.grad
        frozen = grad.index_select(weight.dim, weight.frozen_index)
        assert not frozen.any(), name
        trainable = [i for i in range(grad.shape[weight.dim]) if i not in set(weight.frozen_index.tolist())]
        torch.testing.assert_close(grad.index_select(weight.dim, torch.tensor(trainable)), weight.trainable.grad,
                                   rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())


def test_backend_random_refuses_what_it_cannot_regenerate(zoo_models):
    model, inputs = zoo_models["gpt2"]
    torch._dynamo.reset()
    policy = {"version": 1, "rules": [{"match": {"modules": ["transformer.wte"]}, "random": {}}]}
    with pytest.raises(Exception, match="use seedrand.rewrite for embeddings"):
        torch.compile(copy.deepcopy(model), backend="seedrand", options={"policy": policy})(*inputs)


CAUSAL_LM_POLICIES = {
    "gpt2": {"version": 1, "seed": 2, "rules": [{"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\..*"],
                                                           "types": ["Conv1D"]}, "random": {}}]},
    "llama": {"version": 1, "seed": 2, "rules": [{"match": {"modules": [r"re:model\.layers\.\d+\.mlp\..*"],
                                                            "types": ["Linear"]}, "random": {}}]},
}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("inductor", [False, True])
def test_backend_policy_on_causal_lms_equals_rewrite(zoo_models, name, inductor):
    """On transformers CausalLMs (a forward wrapped by a decorator: Dynamo names the model L['args'][0]) the
    backend's policy matches the names of model.named_modules(), and `random` regenerates Conv1D (addmm) and Linear
    weights with the keys seedrand.rewrite uses: the same logits and gradients, through AOTAutograd's eager kernels
    and through Inductor."""
    import seedrand

    model, inputs = zoo_models[name]
    model, policy = copy.deepcopy(model).eval(), CAUSAL_LM_POLICIES[name]
    rewritten = seedrand.rewrite(model, policy, inputs, graph=True).eval()
    expected = logits(rewritten(*inputs))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="seedrand", options={"policy": policy, "inductor": inductor})
    out = logits(compiled(*inputs))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    grads = {n: p.grad for n, p in rewritten.named_parameters() if p.grad is not None}
    assert grads and not any(".mlp." in n for n in grads)  # regenerated weights have no stored tensor to train
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("action,params,why", [("subspace", {"dim": 4}, "theta_d"),
                                              ("filter_gates", {"lambda": 0.1}, "trainable gates")])
def test_backend_refuses_actions_that_add_parameters(zoo_models, action, params, why):
    model, inputs = zoo_models["cnn"]
    torch._dynamo.reset()
    policy = {"version": 1, "rules": [{"match": {"modules": ["conv1"]}, action: params}]}
    with pytest.raises(Exception, match=f"cannot be applied by the torch.compile backend: .*{why}.*seedrand.rewrite"):
        torch.compile(copy.deepcopy(model), backend="seedrand", options={"policy": policy})(*inputs)


def test_backend_policy_errors_are_strict(zoo_models):
    model, inputs = zoo_models["cnn"]
    torch._dynamo.reset()
    policy = {"version": 1, "rules": [{"name": "typo", "match": {"modules": ["conv_1"]}, "freeze": {}}]}
    with pytest.raises(Exception, match=r"rule 'typo' \(rules\[0\]\).*did you mean 'conv1'"):
        torch.compile(copy.deepcopy(model), backend="seedrand", options={"policy": policy})(*inputs)


def test_inspect_counts_regenerated_weights_of_the_random_example():
    out = run("-m", "seedrand.cli", "inspect", "examples/policies/gpt2_random_mlp.yaml", "--model",
              "seedrand.zoo:gpt2", "--json").stdout
    report = json.loads(out)
    random_rows = [r for r in report["rows"] if "random" in r["actions"]]
    assert len(random_rows) == 4 and all(r["counts"]["regenerated"] > 0 for r in random_rows)
    assert all(r["counts"]["frozen"] == 0 for r in random_rows)  # nothing of them is stored


def test_backend_compiles_every_weight_action_and_trains():
    import seedrand
    from conftest import all_layers

    model, inputs = all_layers()
    policy = {"version": 1, "seed": 3, "rules": [
        {"match": {"modules": ["emb", "conv1"]}, "random": {"bias": "trainable"}},
        {"match": {"modules": ["fc", "proj", "conv3"]}, "freeze_fraction": {"fraction": 0.5, "select": "random"}},
        {"match": {"modules": ["conv2"]}, "insert_random": {"residual": True, "scale": "scalar"}}]}
    gm = seedrand.rewrite(model, policy, inputs, graph=True).train()
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="seedrand")
    torch.testing.assert_close(compiled(*inputs), gm(*inputs), rtol=1e-5, atol=1e-6)
    compiled(*inputs).square().mean().backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name,policy,inductor", [
    ("mlp", {"version": 1, "rules": [{"match": {"modules": ["0", "2"]}, "random": {"bias": "trainable"}}]}, True),
    ("cnn", "examples/policies/cnn_freeze_fraction.yaml", True),
    ("gpt2", "examples/policies/gpt2_random_mlp.yaml", True),
    ("bert", {"version": 1, "rules": [{"match": {"types": ["Linear"]}, "optional": True,
                         "subspace": {"dim": 8, "projection": "sparse"}}]}, True),
    ("gpt2", "examples/policies/gpt2_random_mlp.yaml", False),
])
def test_backend_outputs_and_gradients_equal_eager(zoo_models, name, policy, inductor):
    import seedrand

    model, inputs = zoo_models[name]
    gm = seedrand.rewrite(model, policy, inputs, graph=True).eval()  # Inductor draws dropout masks from its own generator
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="seedrand", options={"inductor": inductor})
    results = []
    for fn in (gm, compiled):
        gm.zero_grad()
        out = logits(fn(*inputs))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == fast_grads.keys() and eager_grads
    for n in eager_grads:
        torch.testing.assert_close(fast_grads[n], eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_export_keeps_regenerate_ops_as_single_nodes():
    import seedrand
    from conftest import all_layers

    model, inputs = all_layers()
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["fc", "conv1"]}, "random": {}},
                                            {"match": {"modules": ["proj"]}, "subspace": {"dim": 4}}]}, inputs, graph=True)
    graph = torch.export.export(gm.eval(), inputs).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert targets.count("seedrand.regen_matmul.default") == 1
    assert targets.count("seedrand.regen_conv.default") == 1
    assert targets.count("seedrand.subspace_project.default") >= 1


def test_model_compile_in_place_makes_generate_run_the_policy(zoo_models):
    """model.compile(backend="seedrand", options={"policy": ...}) compiles in place, so transformers' generate(),
    which calls the module itself, runs the regenerated weights: its greedy output equals a loop over the rewritten
    model's forward. (torch.compile(model) returns a wrapper whose generate() runs the plain inner model.)"""
    import seedrand

    model, inputs = zoo_models["gpt2"]
    model = copy.deepcopy(model).eval()
    policy = {"version": 1, "seed": 2, "rules": [
        {"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\..*"], "types": ["Conv1D"]}, "random": {}}]}
    rewritten = seedrand.rewrite(model, policy, inputs, graph=True).eval()
    ids = inputs[0]
    with torch.no_grad():
        seq = ids
        for _ in range(3):
            seq = torch.cat([seq, rewritten(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        plain = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids),
                               pad_token_id=0)
    torch._dynamo.reset()
    model.compile(backend="seedrand", options={"policy": policy, "inductor": False})
    out = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(out, seq) and not torch.equal(plain, seq)
