"""The kept model: ``seedrand.rewrite`` returns the user's own model (same class, same code) with seedrand's modules in
its tree, and the PyTorch / Hugging Face workflow works on it."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import seedrand
from seedrand import zoo
from seedrand.passes.filter_gates import FilterGate
from seedrand.rewriter.rewrite import graph_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.bn, self.fc2 = nn.Embedding(10, 8), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.bn(self.fc1(self.emb(tokens).mean(1)))))


def _rule(modules, **action):
    return {"version": 1, "seed": 3, "rules": [{"match": {"modules": modules}, **action}]}


ACTIONS = {
    "random": _rule(["fc1", "emb"], random={}),
    "freeze": _rule(["fc1"], freeze={}),
    "freeze_fraction": _rule(["fc1"], freeze_fraction={"fraction": 0.5}),
    "freeze_fraction_in": _rule(["fc2"], freeze_fraction={"fraction": 0.5, "dim": "in", "fixed": "zero"}),
    "filter_gates": _rule(["fc1"], filter_gates={"init": "uniform"}),
    "insert_random": _rule(["fc1"], insert_random={"residual": True, "scale": "per_channel"}),
    "subspace_global": _rule(["re:fc.*"], subspace={"dim": 12}),
    "subspace_per_layer": _rule(["fc2"], subspace={"dim": 5, "scope": "per_layer"}),
    "grow": _rule(["fc1"], grow={"start": 1, "stages": 4}),
}


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_keeps_the_model_class_and_computes_what_the_graph_computes(action):
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    kept = seedrand.rewrite(model, ACTIONS[action], (tokens,))
    gm = seedrand.rewrite(model, ACTIONS[action], (tokens,), graph=True)
    assert type(kept) is Net and isinstance(kept.fc1, nn.Module)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert sorted(kept.state_dict()) == sorted(gm.state_dict())  # one checkpoint layout for both products
    for training in (False, True):
        kept.train(training), gm.train(training)
        torch.testing.assert_close(kept(tokens), gm(tokens), rtol=0, atol=0)
    kept.eval()
    expected = kept(tokens)
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(kept), torch.load(buffer, weights_only=False)):
        assert type(other) is Net
        torch.testing.assert_close(other(tokens), expected, rtol=0, atol=0)
    assert kept.double()(tokens).dtype == torch.float64


def test_a_trained_kept_model_trains_the_same_parameters_as_the_graph():
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    policy = _rule(["fc1"], freeze_fraction={"fraction": 0.75})
    kept = seedrand.rewrite(model, policy, (tokens,))
    gm = seedrand.rewrite(model, policy, (tokens,), graph=True)
    assert [n for n, p in kept.named_parameters() if p.requires_grad] == \
        [n for n, p in gm.named_parameters() if p.requires_grad]
    for m in (kept, gm):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m(tokens).square().mean().backward()
        optimizer.step()
    torch.testing.assert_close(kept.eval()(tokens), gm.eval()(tokens))


def test_forward_hooks_on_untouched_modules_fire_and_the_original_class_is_kept_for_layers():
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(2))
    kept = seedrand.rewrite(model, _rule(["emb"], freeze_fraction={"fraction": 0.5}), (tokens,))
    seen = []
    kept.bn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    kept(tokens)
    assert seen == [torch.Size([4, 16])]
    assert isinstance(kept.emb, nn.Embedding) and kept.emb.weight.shape == (10, 8)  # computed, read as before
    assert [p.shape for p in kept.emb._modules["weight"].parameters()] == [(5, 8)]  # the trainable half only


def test_functional_call_and_grad_work_on_the_kept_model():
    model, tokens = Net().eval(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(3))
    kept = seedrand.rewrite(model, ACTIONS["random"], (tokens,)).eval()
    params = {n: p.detach() for n, p in kept.named_parameters()}
    out = torch.func.functional_call(kept, params, (tokens,))
    torch.testing.assert_close(out, kept(tokens))
    grads = torch.func.grad(lambda p: torch.func.functional_call(kept, p, (tokens,)).sum())(params)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())


def _gpt2_default():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                      eos_token_id=0)).eval()


GPT2_POLICY = {"version": 1, "seed": 5, "rules": [
    {"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\.c_(fc|proj)"]}, "random": {"bias": "trainable"}},
    {"match": {"modules": [r"re:transformer\.h\.\d+\.attn\.c_proj"]},
     "insert_random": {"residual": True, "scale": "per_channel", "activation": "gelu"}}]}


def test_gpt2_with_its_default_config_works_as_a_transformers_model():
    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,))
    assert type(kept) is type(model) and kept.config.use_cache is True and kept.config is not model.config
    gm = graph_of(kept)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids, use_cache=False).logits, gm(ids).logits)
        # keyword inputs, a padded batch, labels -> loss, other batch sizes and lengths
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, :3] = 0
        longer = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
        out = kept(input_ids=longer, attention_mask=mask, labels=longer)
        assert out.logits.shape == (3, 9, 64) and torch.isfinite(out.loss)
        # generate runs the rewritten weights: greedy decoding equals a loop over the model's own forward
        generated = kept.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        loop = ids
        for _ in range(4):
            loop = torch.cat([loop, kept(loop, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, loop)
        assert not torch.equal(generated, model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert kept.num_parameters() < model.num_parameters() and kept.device == torch.device("cpu")
    assert kept.transformer.h[0].mlp.c_fc.weight.shape == (128, 32)  # regenerated, not stored


def test_gpt2_kept_model_trains_with_gradient_checkpointing_and_changes_dtype():
    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,)).train()
    kept.gradient_checkpointing_enable()
    kept.config.use_cache = False
    loss = kept(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in kept.named_parameters() if "c_fc.bias" in n)
    for dtype in (torch.float64, torch.bfloat16):
        assert kept.eval().to(dtype)(ids).logits.dtype == dtype


def test_llama_bert_vit_kept_models_keep_their_class():
    cases = {"llama": _rule([r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"], freeze_fraction={"fraction": 0.5}),
             "bert": _rule([r"re:bert\.encoder\.layer\.\d+\.intermediate\.dense"], filter_gates={"init": "uniform"}),
             "vit": _rule([r"re:vit\.layers\.\d+\.mlp\.fc2"], random={})}
    for name, policy in cases.items():
        model, inputs = zoo.FACTORIES[name]()
        kept = seedrand.rewrite(model.eval(), policy, inputs)
        assert type(kept) is type(model), name
        with torch.no_grad():
            torch.testing.assert_close(kept(*inputs), graph_of(kept)(*inputs))
    labels = torch.tensor([0, 2])
    assert torch.isfinite(kept.train()(pixel_values=inputs[0], labels=labels).loss)


def test_peft_lora_on_a_kept_model_and_seedrand_on_a_peft_model():
    peft = pytest.importorskip("peft")
    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,))
    lora = peft.get_peft_model(kept, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora(ids, labels=ids).loss.backward()

    base = peft.get_peft_model(_gpt2_default(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    policy = _rule([r"re:.*mlp\.c_fc"], freeze_fraction={"fraction": 0.5})
    rewritten = seedrand.rewrite(base, policy, (ids,))
    assert type(rewritten) is type(base)
    assert not any(p.requires_grad for n, p in rewritten.named_parameters() if "c_fc.weight" in n)
    assert all(not p.requires_grad for n, p in rewritten.named_parameters() if n in frozen)


def test_garbage_collection_shrinks_the_kept_model_in_place():
    model, inputs = zoo.cnn()
    kept = seedrand.rewrite(model.eval(), {"version": 1, "rules": [
        {"match": {"types": ["Conv2d"]}, "filter_gates": {"init": "uniform"}}]}, inputs).eval()
    gates = [m for m in kept.modules() if isinstance(m, FilterGate)]
    with torch.no_grad():
        for gate in gates:
            gate.theta[: len(gate.theta) // 2] = -1.0
    optimizer = torch.optim.Adam(kept.parameters())
    kept.train()(*inputs).square().mean().backward()
    optimizer.step()
    kept.eval()
    before, identities = kept(*inputs), [id(p) for p in kept.parameters()]
    report = seedrand.collect_garbage(kept, optimizer)
    assert report.removed and report.not_applied is None and type(kept) is type(model)
    assert [id(p) for p in kept.parameters()] == identities
    torch.testing.assert_close(kept(*inputs), before, rtol=1e-5, atol=1e-6)
    convs = [m for m in kept.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels == m.weight.shape[0] for m in convs)
    assert report.parameters_after < report.parameters_before
    kept.train()(*inputs).square().mean().backward()  # training continues with the same optimizer
    optimizer.step()


def test_save_and_load_give_back_the_kept_model(tmp_path):
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(4))
    kept = seedrand.rewrite(model, ACTIONS["freeze_fraction"], (tokens,)).eval()
    seedrand.save(kept, tmp_path / "k.safetensors")
    loaded = seedrand.load(tmp_path / "k.safetensors", Net()).eval()
    assert type(loaded) is Net
    torch.testing.assert_close(loaded(tokens), kept(tokens), rtol=0, atol=0)


def test_a_saved_transformers_model_loads_without_its_architecture(tmp_path):
    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,))
    seedrand.save(kept, tmp_path / "gpt2.safetensors")
    loaded = seedrand.load(tmp_path / "gpt2.safetensors")
    assert type(loaded) is type(model) and loaded.config.to_dict() == kept.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, kept(ids).logits, rtol=0, atol=0)


def test_load_without_a_model_needs_a_recorded_transformers_architecture(tmp_path):
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(6))
    seedrand.save(seedrand.rewrite(model, ACTIONS["random"], (tokens,)), tmp_path / "net.safetensors")
    with pytest.raises(seedrand.CheckpointError, match=r"records no transformers architecture.*load\(path, model\)"):
        seedrand.load(tmp_path / "net.safetensors")


@pytest.mark.parametrize("class_name,config,words", [
    ("Conv1D", {}, "'Conv1D' is not a transformers model class"),
    ("NoSuchModel", {}, "'NoSuchModel' is not a transformers model class"),
    ("GPT2LMHeadModel", {"n_embd": 33, "n_head": 2}, "config is malformed"),
])
def test_a_recorded_architecture_that_is_not_a_transformers_model_is_refused(tmp_path, class_name, config, words):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from seedrand.checkpoint import _signed

    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    path = tmp_path / "gpt2.safetensors"
    seedrand.save(seedrand.rewrite(model, GPT2_POLICY, (ids,)), path)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    architecture = json.dumps({"class_name": class_name, "config": config})
    save_file(tensors, path, metadata=_signed(tensors, {**metadata, "architecture": architecture}))
    with pytest.raises(seedrand.CheckpointError, match=words):
        seedrand.load(path)


def test_the_hf_trainer_trains_a_kept_model_and_saves_a_checkpoint(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,)).train()
    kept.config.use_cache = False
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 64, (6, 6), generator=torch.Generator())]
    before = {n: p.detach().clone() for n, p in kept.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, save_steps=3,
                             report_to=[], use_cpu=True, learning_rate=1e-2)
    Trainer(model=kept, args=args, train_dataset=data).train()
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()
    assert any(not torch.equal(before[n], p) for n, p in kept.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in kept.named_parameters() if "c_fc" in n and "bias" not in n)


def test_autocast_and_inductor_run_the_kept_model():
    model, tokens = Net().eval(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(9))
    policy = {"version": 1, "seed": 3, "rules": [
        {"match": {"modules": ["fc1"]}, "filter_gates": {"init": "uniform"}},
        {"match": {"modules": ["fc2"]}, "freeze_fraction": {"fraction": 0.5}},
        {"match": {"modules": ["emb"]}, "random": {}}]}
    kept = seedrand.rewrite(model, policy, (tokens,)).eval()
    with torch.no_grad():
        expected = kept(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = kept(tokens)
        compiled = torch.compile(kept)(tokens)
    assert autocast.dtype == torch.bfloat16
    torch.testing.assert_close(autocast.float(), expected, rtol=0.05, atol=0.05)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)


def test_lora_on_regenerated_layers_through_peft_custom_module_mapping():
    peft = pytest.importorskip("peft")
    import seedrand.lora

    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(10))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,))
    with torch.no_grad():
        before = kept(ids).logits
    config = seedrand.lora.register(peft.LoraConfig(r=2, target_modules=["c_fc"], task_type="CAUSAL_LM"))
    lora = peft.get_peft_model(kept, config)
    wrapped = lora.base_model.model.transformer.h[0].mlp.c_fc
    assert type(wrapped.base_layer).__name__ == "RandomLinear" and wrapped.in_features == 32
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, before)  # B starts at zero: the model computes what it did
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        lora(ids, labels=ids).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(lora(ids).logits, before)  # the adapters of the regenerated layers trained
    with pytest.raises(ValueError, match="seedrand.merge"):
        wrapped.merge()


def test_vmap_runs_the_kept_model_per_sample():
    model, tokens = Net().eval(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(11))
    policy = {"version": 1, "seed": 3, "rules": [
        {"match": {"modules": ["fc1"]}, "random": {}}, {"match": {"modules": ["fc2"]}, "freeze_fraction": {"fraction": 0.5}}]}
    kept = seedrand.rewrite(model, policy, (tokens,)).eval()
    per_sample = torch.func.vmap(lambda t: kept(t.unsqueeze(0)).squeeze(0))(tokens)
    torch.testing.assert_close(per_sample, kept(tokens))


def test_a_kept_subspace_model_computes_the_projection_once_per_forward():
    from seedrand.passes.subspace import SubspaceCoordinates

    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(12))
    kept = seedrand.rewrite(model, _rule(["fc1"], subspace={"dim": 12, "scope": "global"}), (tokens,))
    (coordinates,) = [m for m in kept.modules() if isinstance(m, SubspaceCoordinates)]
    calls = []
    coordinates.register_forward_hook(lambda *_: calls.append(1))
    kept.train()(tokens).sum().backward()  # the weight and the bias read P @ theta_d
    assert len(calls) == 1 and coordinates.theta_d.grad is not None
    kept.fc1.weight  # outside a forward: computed when read
    assert len(calls) == 2
    copy.deepcopy(kept)  # nothing of a forward is left behind
