"""Test configuration. TRITON_INTERPRET must be set before anything imports triton, so Triton kernels run on CPU
tensors on machines without a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from seedrand import zoo  # noqa: E402


@pytest.fixture(scope="session")
def zoo_models():
    """Built once per session: ``name -> (model, example_inputs)`` from :mod:`seedrand.zoo`."""
    return {name: factory() for name, factory in zoo.FACTORIES.items()}


def seeded(build):
    """``build()`` under torch seed 0, the caller's RNG untouched (models whose init must not vary)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def logits(output):
    """The main tensor of a model output (transformers ModelOutput, tuple or tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class AllLayers(torch.nn.Module):
    """One of every layer type the weight actions support, symbolically traceable: Embedding (with padding_idx),
    Linear, transformers Conv1D, Conv1d, Conv2d, Conv3d. Input: int64 token ids ``(B, T)``; output ``(B, 3, T)``."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = torch.nn.Embedding(20, 8, padding_idx=0)
        self.fc = torch.nn.Linear(8, 12)
        self.proj = Conv1D(6, 12)
        self.conv1 = torch.nn.Conv1d(6, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 5, 3, padding=1)
        self.conv3 = torch.nn.Conv3d(5, 3, 1)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))
        h = self.conv1(self.proj(h).transpose(1, 2))
        h = self.conv2(h.unsqueeze(-1))
        return self.conv3(h.unsqueeze(-1)).flatten(2)


LAYER_NAMES = ("emb", "fc", "proj", "conv1", "conv2", "conv3")


def all_layers(dtype=torch.float32):
    """``(AllLayers model in eval mode and ``dtype``, (ids,))`` with fixed weights; ids include the padding row 0."""
    gen = torch.Generator().manual_seed(0)
    model = AllLayers()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ids = torch.randint(0, 20, (2, 7), generator=gen)
    ids[0, 0] = 0
    return model.to(dtype).eval(), (ids,)
