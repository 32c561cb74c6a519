"""Compile time of the ``seedrand`` backend with a policy (``random`` on the MLP layers) against Inductor on the
same model without one: seconds of the first call (compile and run, caches disabled), forward only and forward plus
backward, for tiny GPT-2 and Llama models; ratios side by side.

    python benchmarks/compile_time.py
"""

from __future__ import annotations

import copy
import os
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # measure compiling, not reading a cache

import torch  # noqa: E402

from seedrand import zoo  # noqa: E402

POLICIES = {
    "gpt2": {"version": 1, "seed": 2, "rules": [{"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\..*"],
                                                           "types": ["Conv1D"]}, "random": {}}]},
    "llama": {"version": 1, "seed": 2, "rules": [{"match": {"modules": [r"re:model\.layers\.\d+\.mlp\..*"],
                                                            "types": ["Linear"]}, "random": {}}]},
}


def first_call(model, inputs, backward: bool, **compile_args) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), **compile_args)
    start = time.perf_counter()
    out = compiled(*inputs).logits
    if backward:
        out.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    warm, warm_inputs = zoo.gpt2()
    first_call(warm.eval(), warm_inputs, True)  # the process's one-time costs (imports, Inductor's own set-up)
    print(f"{'model':6} {'pass':8} {'inductor s':>11} {'seedrand+policy s':>18} {'ratio':>6}")
    for name, policy in POLICIES.items():
        model, inputs = getattr(zoo, name)()
        model.eval()
        for backward in (False, True):
            plain = first_call(model, inputs, backward)
            ours = first_call(model, inputs, backward, backend="seedrand", options={"policy": policy})
            label = "fwd+bwd" if backward else "forward"
            print(f"{name:6} {label:8} {plain:11.2f} {ours:18.2f} {ours / plain:6.2f}", flush=True)


if __name__ == "__main__":
    main()
