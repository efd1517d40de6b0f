"""Captum's overview ToyModel: lin2(relu(lin1(x))) with fixed weights.

Deterministic in code, so the folder ships no weights.pt.
"""

import torch
import torch.nn as nn


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 3)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(3, 2)

        # Fixed weights, as in Captum's getting-started example.
        self.lin1.weight = nn.Parameter(torch.arange(-4.0, 5.0).view(3, 3))
        self.lin1.bias = nn.Parameter(torch.zeros(3))
        self.lin2.weight = nn.Parameter(torch.arange(-3.0, 3.0).view(2, 3))
        self.lin2.bias = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(x)))


def build_model() -> nn.Module:
    return ToyModel()
