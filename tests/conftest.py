"""Test configuration. TRITON_INTERPRET must be set before anything imports triton, so Triton kernels run on CPU
tensors on machines without a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from seedrand import zoo  # noqa: E402


@pytest.fixture(scope="session")
def zoo_models():
    """Built once per session: ``name -> (model, example_inputs)`` from :mod:`seedrand.zoo`."""
    return {name: factory() for name, factory in zoo.FACTORIES.items()}


def logits(output):
    """The main tensor of a model output (transformers ModelOutput, tuple or tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
