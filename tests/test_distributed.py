"""Rewritten models under ``torch.distributed`` on the CPU (gloo, two processes, ``tests/distributed_worker.py``):
ranks agree on regenerated weights without communicating them, DDP and FSDP2 train them with identical parameters on
every rank, and garbage collection removes the same channels on every rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(tmp_path: Path, mode: str) -> list[dict]:
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(init), mode, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_train_a_rewritten_gpt2_to_identical_parameters(tmp_path, mode):
    first, second = _run(tmp_path, mode)
    assert first["gpt2"] and second["gpt2"]  # still the user's class (FSDP2 subclasses it)
    assert first["regenerated"] == second["regenerated"]  # each rank regenerated it alone, from the seed
    assert first["parameters"] == second["parameters"]
    assert any(name.endswith("c_fc.bias") for name in first["parameters"])  # the trainable bias was trained
    assert not any(name.endswith("c_fc.weight") for name in first["parameters"])  # the weight is not a parameter


def test_garbage_collection_under_ddp_removes_the_same_channels_on_every_rank(tmp_path):
    first, second = _run(tmp_path, "gc")
    assert first["removed"] and first["removed"] == second["removed"]
    assert first["shapes"] == second["shapes"]
    assert first["parameters"] == second["parameters"]  # training went on, re-wrapped, in step
