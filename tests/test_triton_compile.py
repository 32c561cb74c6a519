"""The Triton kernels build for real GPUs: every variant the launchers use is compiled ahead of time to a cubin for
Ampere (sm_80) and Hopper (sm_90) without a GPU. The interpreter tests cannot see compile errors: the interpreter
runs kernels as Python and accepts programs the compiler rejects."""

import os
import subprocess
import sys

import pytest

from seedrand.kernels import triton_aot


@pytest.mark.parametrize("arch", [80, 90])
def test_every_launched_variant_compiles(arch):
    # a child process: this one runs the kernels under TRITON_INTERPRET=1 (conftest), where they cannot compile
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "seedrand.kernels.triton_aot", "--arch", str(arch)], env=env,
                            capture_output=True, text=True, timeout=1800)
    count = len(triton_aot.variants())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert f"sm_{arch}: {count} of {count} kernel variants compiled" in result.stdout


def test_refuses_under_the_interpreter():
    assert os.environ["TRITON_INTERPRET"] == "1"
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        triton_aot.compile_variant(triton_aot.variants()[0], 90)
