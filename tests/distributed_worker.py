"""One rank of the distributed tests (``tests/test_distributed.py`` starts two): trains a rewritten model under
DDP or FSDP2 on the CPU (gloo) and writes, per rank, what the test compares across ranks to ``OUT/rank{r}.json``.

Usage: ``python distributed_worker.py RANK WORLD INIT_FILE MODE OUT`` with MODE ``ddp``, ``fsdp`` or ``gc``.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import seedrand
from seedrand import zoo
from seedrand.passes.filter_gates import FilterGate

GPT2_POLICY = {"version": 1, "seed": 5, "rules": [
    {"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\.c_fc"]}, "random": {"bias": "trainable"}},
    {"match": {"modules": [r"re:transformer\.h\.\d+\.attn\.c_attn"]}, "freeze_fraction": {"fraction": 0.5}}]}


def sums(model: torch.nn.Module) -> dict[str, float]:
    """Per parameter (whole, also when sharded), the sum of its values as float64: equal across ranks iff equal."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().double().sum().item()
    return out


def gpt2(rank: int, world: int, mode: str) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(rank)  # each rank initializes differently: only DDP's broadcast or the seed makes them agree
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, use_cache=False))
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kept = seedrand.rewrite(model, GPT2_POLICY, (ids,)).train()
    regenerated = kept.transformer.h[0].mlp.c_fc.weight.double().sum().item()  # before any communication
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        with torch.no_grad():  # FSDP2 does not broadcast: start every rank from rank 0's values
            for p in kept.parameters():
                dist.broadcast(p, 0)
        for block in kept.transformer.h:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(kept, mesh=mesh)
    else:
        wrapped = DDP(kept)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    data = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(100 + rank))  # each rank its batch
    for _ in range(3):
        optimizer.zero_grad()
        wrapped(input_ids=data, labels=data).loss.backward()
        optimizer.step()
    return {"gpt2": isinstance(kept, GPT2LMHeadModel), "regenerated": regenerated, "parameters": sums(kept)}


def gc(rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    model, inputs = zoo.cnn()
    kept = seedrand.rewrite(model.eval(), {"version": 1, "rules": [
        {"match": {"types": ["Conv2d"]}, "filter_gates": {"init": "uniform"}}]}, inputs)
    if rank == 0:  # DDP's first broadcast gives every rank these dead channels
        with torch.no_grad():
            for gate in (m for m in kept.modules() if isinstance(m, FilterGate)):
                gate.theta[: len(gate.theta) // 3] = -1.0
    ddp = DDP(kept.train())
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    batch = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100 + rank))
    ddp(batch).square().mean().backward()
    optimizer.step()
    report = seedrand.collect_garbage(ddp.module, optimizer)
    ddp = DDP(ddp.module)  # DDP's gradient buckets hold the old sizes: wrap again
    for _ in range(2):
        optimizer.zero_grad()
        ddp(batch).square().mean().backward()
        optimizer.step()
    return {"removed": report.removed, "parameters": sums(kept),
            "shapes": {n: list(p.shape) for n, p in kept.named_parameters()}}


def main() -> None:
    rank, world, init, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = gc(rank, world) if mode == "gc" else gpt2(rank, world, mode)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears gloo down while its peer still has collectives in flight
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
