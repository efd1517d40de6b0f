"""Tabular demo: an MLP on 16 float32 features -> 2 class logits.

Planted signal (see train.py): label = 1 iff 1.5*x[2] - 2*x[7] + x[11] > 0;
the other 13 features are noise.
"""

import torch.nn as nn
from torch import Tensor

NUM_FEATURES = 16
SIGNAL_FEATURES = (2, 7, 11)
FEATURE_NAMES = [f"f{i}" for i in range(NUM_FEATURES)]


class TabularMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def build_model() -> nn.Module:
    return TabularMLP()
