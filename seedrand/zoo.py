"""Small real models with random weights, built from configs (no downloads), and example inputs for them.

Each factory returns ``(model, example_inputs)`` with the model in eval mode; ``example_inputs`` is a tuple with a
batch of 2. Used by the tests, the examples and ``seedrand inspect --model seedrand.zoo:NAME``. The ``transformers``
models are deliberately tiny (a few layers, narrow widths) so that tracing and tests stay fast on a CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ._optional import require

__all__ = ["mlp", "cnn", "resnet", "mobilenet_v2", "vit", "gpt2", "bert", "convnext", "llama", "FACTORIES", "digits_task", "digits_data", "Digits"]


def _inputs(*shape: int) -> tuple[torch.Tensor]:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)


def _tokens(vocab: int, batch: int = 2, length: int = 8) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)),)


def _seeded(build):
    """Build under a fixed, local RNG state so factories are deterministic without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def mlp() -> tuple[nn.Module, tuple]:
    """An MLP 64-128-128-10 for 8x8 digits: input (2, 64) float32, output (2, 10)."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                          nn.Linear(128, 10)))
    return model, _inputs(2, 64)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, pooling, a classifier: input (N, 1, 8, 8), output (N, 10)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def cnn() -> tuple[nn.Module, tuple]:
    """:class:`SmallCNN` with input (2, 1, 8, 8)."""
    return _seeded(SmallCNN), _inputs(2, 1, 8, 8)


def resnet() -> tuple[nn.Module, tuple]:
    """transformers ResNet (2 stages, bottleneck, BatchNorm, residual adds): input (2, 3, 32, 32)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return _seeded(lambda: tf.ResNetForImageClassification(cfg)), _inputs(2, 3, 32, 32)


def mobilenet_v2() -> tuple[nn.Module, tuple]:
    """transformers MobileNetV2 (depthwise convs, ReLU6): input (2, 3, 32, 32)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return _seeded(lambda: tf.MobileNetV2ForImageClassification(cfg)), _inputs(2, 3, 32, 32)


def vit() -> tuple[nn.Module, tuple]:
    """transformers ViT (patch embedding conv, 2 attention layers): input (2, 3, 32, 32)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    return _seeded(lambda: tf.ViTForImageClassification(cfg)), _inputs(2, 3, 32, 32)


def gpt2() -> tuple[nn.Module, tuple]:
    """transformers GPT-2 LM (HF ``Conv1D`` layers, tied embeddings), ``use_cache=False``: input ids (2, 8)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: tf.GPT2LMHeadModel(cfg)), _tokens(128)


def bert() -> tuple[nn.Module, tuple]:
    """transformers BERT sequence classifier (2 layers): input ids (2, 8)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return _seeded(lambda: tf.BertForSequenceClassification(cfg)), _tokens(128)


def convnext() -> tuple[nn.Module, tuple]:
    """transformers ConvNeXt (depthwise 7x7 convs, LayerNorm, inverted-bottleneck Linears, layer scale):
    input (2, 3, 32, 32)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, image_size=32)
    return _seeded(lambda: tf.ConvNextForImageClassification(cfg)), _inputs(2, 3, 32, 32)


def llama() -> tuple[nn.Module, tuple]:
    """A Llama-style transformers causal LM (RMSNorm, rotary embeddings, gated SiLU MLP, grouped-query attention),
    ``use_cache=False``: input ids (2, 8)."""
    tf = require("transformers", "seedrand.zoo's transformers models")
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return _seeded(lambda: tf.LlamaForCausalLM(cfg)), _tokens(128)


FACTORIES = {f.__name__: f for f in (mlp, cnn, resnet, mobilenet_v2, vit, gpt2, bert, convnext, llama)}


class Digits(NamedTuple):
    """scikit-learn's digits split 75/25 (stratified, fixed): float32 inputs ``(n, 64)`` in [0, 1], int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data() -> Digits:
    """The bundled scikit-learn digits (no download) as :class:`Digits`."""
    datasets = require("sklearn.datasets", "the bundled digits data")
    split = require("sklearn.model_selection", "the bundled digits data").train_test_split

    data = datasets.load_digits()
    x_train, x_test, y_train, y_test = split(data.data / 16.0, data.target, test_size=0.25, random_state=0,
                                                        stratify=data.target)
    return Digits(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train),
                  torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test))


def digits_task(hidden: int = 100, steps: int = 300, lr: float = 1e-2):
    """scikit-learn's bundled digits (8x8 images, 10 classes; no download) and an MLP ``64-hidden-hidden-10``, as a
    :class:`seedrand.intrinsic.Task`: full-batch Adam for ``steps`` steps on a fixed 75/25 split (inputs scaled to
    [0, 1]); the score is test accuracy. Everything is deterministic and leaves the global RNG alone."""
    from .intrinsic import Task

    data = digits_data()
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test

    def factory() -> nn.Module:
        return _seeded(lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                             nn.Linear(hidden, 10)))

    def train(model: nn.Module) -> None:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train), y_train).backward()
            optimizer.step()
        model.eval()

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(x_test).argmax(-1) == y_test).float().mean().item()

    return Task(factory, train, evaluate, (x_train[:2],))
