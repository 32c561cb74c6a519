"""Tracing time: ``seedrand.rewrite`` (empty policy, so tracing and the train/eval comparison are what is timed)
against one static ``torch.export.export`` of the same model, for tiny GPT-2, Llama and Swin models of growing
depth. Prints seconds (median of ``--repeats`` runs) and their ratio side by side; the target is within 2.5x of one
export and linear in depth.

    python benchmarks/trace_time.py [--depths 1,4,16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, SwinConfig, SwinModel

import seedrand


def gpt2(depth: int):
    model = GPT2LMHeadModel(GPT2Config(n_layer=depth, n_embd=32, n_head=2, vocab_size=128, use_cache=False))
    return model.eval(), (torch.randint(0, 128, (2, 8)),)


def llama(depth: int):
    config = LlamaConfig(num_hidden_layers=depth, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_cache=False)
    return LlamaForCausalLM(config).eval(), (torch.randint(0, 128, (2, 8)),)


def swin(depth: int):
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[depth, 1], num_heads=[2, 2],
                        window_size=4)
    return SwinModel(config).eval(), (torch.randn(2, 3, 32, 32),)


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':8} {'layers':>6} {'export s':>9} {'rewrite s':>10} {'ratio':>6}")
    for name, factory in (("gpt2", gpt2), ("llama", llama), ("swin", swin)):
        for depth in map(int, args.depths.split(",")):
            model, inputs = factory(depth)
            export = seconds(lambda: torch.export.export(model, inputs, strict=False), args.repeats)
            rewrite = seconds(lambda: seedrand.rewrite(model, {"version": 1, "rules": []}, inputs), args.repeats)
            print(f"{name:8} {depth:6d} {export:9.2f} {rewrite:10.2f} {rewrite / export:6.2f}", flush=True)


if __name__ == "__main__":
    main()
