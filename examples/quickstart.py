import torch, seedrand
from seedrand import zoo

model, inputs = zoo.gpt2()                    # a transformers GPT-2 built from a config
policy = seedrand.load_policy("examples/policies/gpt2_learn_only_layernorm.yaml")
gm = seedrand.rewrite(model, policy, inputs)  # a torch.fx.GraphModule; `model` is untouched
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
