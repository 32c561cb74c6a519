"""seedrand.save / seedrand.load and the state_dict of rewritten models: bit-identical round trips, weights_only
torch.load, fingerprints that catch regenerated tensors that would change."""

import json

import pytest
import torch
from conftest import all_layers, logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import seedrand
from seedrand import SeedrandError
from seedrand.checkpoint import _signed
from seedrand.errors import CheckpointError

MIXED = {"version": 1, "seed": 9, "rules": [
    {"match": {"modules": ["emb", "fc"]}, "random": {"bias": "random"}},
    {"match": {"modules": ["proj", "conv1"]}, "freeze_fraction": {"fraction": 0.5, "select": "random"}},
    {"match": {"modules": ["conv2"]}, "freeze_fraction": {"fraction": 0.5, "fixed": "keep", "dim": "in"}},
    {"match": {"modules": ["conv3"]}, "insert_random": {"residual": True, "scale": "per_channel"}},
]}


def trained(model, policy, inputs, steps=2):
    gm = seedrand.rewrite(model, policy, inputs, graph=True).train()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        logits(gm(*inputs)).float().square().mean().backward()
        opt.step()
    return gm.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_identical(tmp_path, dtype):
    model, inputs = all_layers(dtype)
    gm = trained(model, MIXED, inputs)
    seedrand.save(gm, tmp_path / "m.safetensors")
    fresh, _ = all_layers(dtype)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()  # the architecture's own weights must not matter
    loaded = seedrand.load(tmp_path / "m.safetensors", fresh, graph=True)
    assert not loaded.training
    assert torch.equal(loaded(*inputs), gm(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), gm.state_dict().values()))


def test_exported_model_round_trip_uses_saved_inputs(zoo_models, tmp_path):
    model, inputs = zoo_models["gpt2"]
    policy = {"version": 1, "seed": 2, "rules": [{"match": {"types": ["Conv1D"]}, "random": {}},
                                   {"match": {"modules": ["transformer.wpe"]}, "freeze_fraction": {"fraction": 0.5}}]}
    gm = trained(model, policy, inputs, steps=1)
    seedrand.save(gm, tmp_path / "g.safetensors")  # lm_head and wte are tied: written once
    loaded = seedrand.load(tmp_path / "g.safetensors", model, graph=True)
    assert torch.equal(logits(loaded(*inputs)), logits(gm(*inputs)))


def test_state_dict_survives_weights_only_torch_load(tmp_path):
    model, inputs = all_layers()
    gm = trained(model, MIXED, inputs)
    torch.save(gm.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = seedrand.rewrite(model, MIXED, inputs, graph=True)
    other.load_state_dict(state)
    assert torch.equal(other.eval()(*inputs), gm(*inputs))


def test_random_layers_adopt_the_saved_seeds():
    model, inputs = all_layers()
    policy = {"version": 1, "seed": 1, "rules": MIXED["rules"][:1]}
    gm = seedrand.rewrite(model, policy, inputs, graph=True)
    other = seedrand.rewrite(model, {**policy, "seed": 2}, inputs, graph=True)
    assert not torch.equal(other(*inputs), gm(*inputs))
    other.load_state_dict(gm.state_dict())
    assert torch.equal(other(*inputs), gm(*inputs)) and other.emb.seed == gm.emb.seed


def test_another_selection_seed_is_caught():
    model, inputs = all_layers()
    state = seedrand.rewrite(model, MIXED, inputs, graph=True).state_dict()
    with pytest.raises(RuntimeError, match="proj.weight.frozen: fingerprint mismatch"):
        seedrand.rewrite(model, {**MIXED, "seed": 123}, inputs, graph=True).load_state_dict(state)  # other frozen filters


def test_fingerprint_mismatch_is_an_error(tmp_path):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, MIXED, inputs, graph=True)
    path = tmp_path / "m.safetensors"
    seedrand.save(gm, path)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors["emb.weight_fingerprint"] = tensors["emb.weight_fingerprint"] + 1e-3
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="tensor 'emb.weight_fingerprint' does not match its checksum"):
        seedrand.load(path, model, graph=True)
    save_file(tensors, path, metadata=_signed(tensors, metadata))  # checksums made anew: the fingerprint catches it
    with pytest.raises(CheckpointError, match="emb.weight: fingerprint mismatch"):
        seedrand.load(path, model, graph=True)
    state = gm.state_dict()
    state["fc.weight_seed"] += 1  # a seed whose values differ from the fingerprint
    with pytest.raises(RuntimeError, match="fc.weight: fingerprint mismatch"):
        seedrand.rewrite(model, MIXED, inputs, graph=True).load_state_dict(state)


def test_missing_seed_and_foreign_files_are_errors(tmp_path):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, MIXED, inputs, graph=True)
    state = gm.state_dict()
    del state["fc.weight_seed"]
    with pytest.raises(RuntimeError, match="Missing key.*fc.weight_seed"):
        seedrand.rewrite(model, MIXED, inputs, graph=True).load_state_dict(state)
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(SeedrandError, match="not a seedrand checkpoint"):
        seedrand.load(tmp_path / "other.safetensors", model, graph=True)
    with pytest.raises(SeedrandError, match="needs a model returned by seedrand.rewrite"):
        seedrand.save(model, tmp_path / "plain.safetensors")
    assert not (tmp_path / "plain.safetensors").exists()


def kill_channels(gm, seed):
    """Half of every gate's channels dead (theta < 0), chosen by a local generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in seedrand.gate_parameters(gm):
            theta[torch.rand(theta.shape, generator=gen) < 0.5] = -1.0


@pytest.mark.parametrize("name,match,head", [
    ("cnn", {"types": ["Conv2d"]}, None),
    ("bert", {"types": ["Linear"]}, "bert.encoder.layer.0.attention.self.value_gate")])
def test_garbage_collected_model_round_trip(zoo_models, tmp_path, name, match, head):
    """Channels removed by collect_garbage (twice, training in between; in bert also the values of a head, so the
    head goes, and the head count in the graph's reshapes with it) are removed again by load before the tensors are
    loaded: graph code, shapes, modules' integer attributes and outputs as saved."""
    model, inputs = zoo_models[name]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [{"match": match, "filter_gates": {}}]}, inputs, graph=True)
    for seed in (0, 1):
        trained_in_place(gm, inputs)
        kill_channels(gm, seed)
        if head and seed == 0:
            with torch.no_grad():
                gm.get_submodule(head).theta[16:32] = -1.0  # head 1 of 16 values each
        assert seedrand.collect_garbage(gm).removed
    seedrand.save(gm.eval(), tmp_path / "g.safetensors")
    loaded = seedrand.load(tmp_path / "g.safetensors", model, graph=True)
    assert loaded.code == gm.code
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in gm.state_dict().items()}
    assert torch.equal(logits(loaded(*inputs)), logits(gm(*inputs)))
    sizes = [(type(m).__name__, {k: v for k, v in vars(m).items() if isinstance(v, int)}) for m in gm.modules()]
    assert [(type(m).__name__, {k: v for k, v in vars(m).items() if isinstance(v, int)}) for m in loaded.modules()] \
        == sizes  # out_features, num_heads, ...
    trained_in_place(loaded, inputs)  # and it trains


def trained_in_place(gm, inputs):
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    opt.zero_grad()
    logits(gm(*inputs)).float().square().mean().backward()
    opt.step()


def test_collections_that_do_not_fit_are_an_error(zoo_models, tmp_path):
    model, inputs = zoo_models["cnn"]
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Conv2d"]}, "filter_gates": {}}]}, inputs, graph=True)
    path = tmp_path / "g.safetensors"
    seedrand.save(gm, path)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, path, metadata=_signed(tensors, {**metadata, "collections": "[[100000]]"}))
    with pytest.raises(CheckpointError, match="removes nothing from this model"):
        seedrand.load(path, model, graph=True)


def test_model_rewritten_without_example_inputs_round_trips(tmp_path):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, MIXED, graph=True).eval()  # symbolically traced: no inputs saved, none to collect garbage with
    seedrand.save(gm, tmp_path / "m.safetensors")
    assert torch.equal(seedrand.load(tmp_path / "m.safetensors", model, graph=True)(*inputs), gm(*inputs))


def saved(tmp_path):
    model, inputs = all_layers()
    path = tmp_path / "m.safetensors"
    seedrand.save(trained(model, MIXED, inputs), path)
    return model, path


def test_a_flipped_bit_in_a_stored_tensor_is_refused(tmp_path):
    """Every stored tensor has a checksum: a bit flipped on disk in any tensor's bytes is caught and named."""
    model, path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    for name in ("conv3.bias", "conv2.weight.trainable", "conv2.weight.frozen"):
        start, _ = header[name]["data_offsets"]
        flipped = bytearray(raw)
        flipped[8 + size + start] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"tensor '{name}' does not match its checksum") as info:
            seedrand.load(path, model, graph=True)
        assert info.value.path == str(path)


def test_changed_metadata_is_refused(tmp_path):
    model, path = saved(tmp_path)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, path, metadata={**metadata, "training": "true"})  # saved in eval mode; not re-signed
    with pytest.raises(CheckpointError, match="metadata does not match its checksum"):
        seedrand.load(path, model, graph=True)


@pytest.mark.parametrize("key,value,words", [
    ("aliases", "{not json", ["metadata 'aliases' is not JSON"]),
    ("training", '"yes"', ["malformed metadata training", "boolean"]),
    ("collections", '[["a"]]', ["malformed metadata collections"]),
    ("example_inputs", "-1", ["malformed metadata example_inputs"]),
    ("policy", None, ["malformed metadata policy", "Field required"]),
    ("policy", "x" * (41 << 20), ["malformed metadata policy", "at most"]),
    ("aliases", '{"a.weight": "nowhere"}', ["alias 'a.weight' refers to 'nowhere'"]),
    ("architecture", '{"class_name": "os.system", "config": {}}', ["malformed metadata architecture.class_name"]),
    ("architecture", '{"class_name": "GPT2Model", "config": {}, "code": "x"}', ["malformed metadata architecture.code"]),
])
def test_malformed_metadata_is_a_checkpoint_error(tmp_path, key, value, words):
    """Metadata that is well signed (as a hostile file would be) but malformed gets a CheckpointError naming the
    file and the key, not a JSONDecodeError, KeyError or TypeError; a 41 MB policy string is refused unparsed."""
    model, path = saved(tmp_path)
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    metadata = {k: v for k, v in metadata.items() if k != key}
    if value is not None:
        metadata[key] = value
    save_file(tensors, path, metadata=_signed(tensors, metadata))
    with pytest.raises(CheckpointError) as info:
        seedrand.load(path, model, graph=True)
    assert str(info.value).startswith(f"{path}: ")
    for word in words:
        assert word in str(info.value)


def test_files_that_are_not_checkpoints(tmp_path):
    model, path = saved(tmp_path)
    raw = path.read_bytes()
    cases = {"truncated": raw[:len(raw) // 2], "header cut": raw[:20], "empty": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"x": torch.zeros(3)}, tmp_path / "torch.pt")
    (tmp_path / "folder").mkdir()
    for name in [*cases, "torch.pt", "folder", "absent"]:
        with pytest.raises(CheckpointError) as info:
            seedrand.load(tmp_path / name, model, graph=True)
        assert info.value.path == str(tmp_path / name), name
    with pytest.raises(CheckpointError, match="folder .* does not exist"):
        seedrand.save(seedrand.rewrite(model, MIXED, graph=True), tmp_path / "no" / "such" / "m.safetensors")


def test_a_checkpoint_never_imports_a_module(tmp_path, monkeypatch):
    """A policy in a file naming `types: [module.Class]` of a module not imported yet does not import it (its
    import-time code never runs): the rule gets a PolicyError instead."""
    model, path = saved(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Layer: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    policy = "version: 1\nrules:\n  - match: {types: [evil_module.Layer]}\n    freeze: {}\n"
    save_file(tensors, path, metadata=_signed(tensors, {**metadata, "policy": policy}))
    with pytest.raises(seedrand.PolicyError, match="never imports a module"):
        seedrand.load(path, model, graph=True)
    assert not marker.exists()
    import sys
    assert "evil_module" not in sys.modules


def test_saved_file_has_the_mode_a_plain_write_gives(tmp_path):
    model, inputs = all_layers()
    seedrand.save(seedrand.rewrite(model, MIXED, inputs, graph=True), tmp_path / "m.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "m.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode
