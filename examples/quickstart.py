import tempfile

import torch, seedrand
from seedrand import zoo

model, inputs = zoo.gpt2()                    # a transformers GPT-2 built from a config
policy = seedrand.load_policy("examples/policies/gpt2_learn_only_layernorm.yaml")
gm = seedrand.rewrite(model, policy, inputs)  # a GPT2LMHeadModel again; `model` is untouched
print(seedrand.summary(gm).total)

gm.train()
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
loss = gm(*inputs).logits.logsumexp(-1).mean()
loss.backward()
optimizer.step()

gm.eval()                                     # train/eval switch as on the original
compiled = torch.compile(gm, backend="seedrand")
with torch.no_grad():
    torch.testing.assert_close(compiled(*inputs).logits, gm(*inputs).logits)

# ONNX: random layers regenerated inside the graph from their seeds, or stored as ordinary initializers
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
x = torch.randn(2, 256)
random_mlp = seedrand.rewrite(mlp, {"version": 1, "rules": [{"match": {"types": ["Linear"]}, "random": {}}]}, x)
out_dir = tempfile.mkdtemp()
for weights in ("seed", "materialize"):
    report = seedrand.export_onnx(random_mlp, x, f"{out_dir}/mlp_{weights}.onnx", weights=weights)
    print(f"{weights}: {report.bytes:,} bytes")  # seed: 79,870 bytes; materialize: 5,264,228 bytes
