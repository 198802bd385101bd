"""A study of your own: two interleaved crescents, classified by a time-dependent Neural ODE.

tune-node finds ``load`` and ``build`` through ``crescents.toml`` beside this file
(``dataset = "crescents:load"``, ``model = "crescents:build"``); nothing else is set up.
"""

import math

import torch
from torch import nn

from tune_node.datasets import Dataset
from tune_node.models import NeuralODEClassifier


def _crescents(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Half of the points on an upper arc, half on a lower arc shifted right and down, with noise.
    half = n // 2
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.stack([torch.cos(angle[:half]), torch.sin(angle[:half])], 1)
    lower = torch.stack([1 - torch.cos(angle[half:]), 0.5 - torch.sin(angle[half:])], 1)
    x = torch.cat([upper, lower]) + 0.1 * torch.randn(n, 2, generator=generator)
    y = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(n - half, dtype=torch.int64)])
    return x.float(), y


def load(seed: int) -> Dataset:
    """1000 training and 500 test points; the seed fixes both."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = _crescents(1000, generator)
    x_test, y_test = _crescents(500, generator)
    return Dataset("crescents", x_train, y_train, x_test, y_test, classes=2)


class TimeDependentField(nn.Module):
    """f(t, z) = W2 tanh(W1 [z, t] + b1) + b2: the time enters as one more input."""

    def __init__(self, dim: int = 2, hidden: int = 32):
        super().__init__()
        self.inner = nn.Linear(dim + 1, hidden)
        self.outer = nn.Linear(hidden, dim)

    def forward(self, t, z):
        tz = torch.cat([z, t.expand(len(z), 1)], 1)
        return self.outer(torch.tanh(self.inner(tz)))


def build(dataset: Dataset) -> NeuralODEClassifier:
    """The field on the data's 2-D points, and a linear read-out of z(T)."""
    features = dataset.input_shape[0]
    return NeuralODEClassifier(TimeDependentField(features), features, dataset.classes)
