"""W6 payload: a small CNN on 3x224x224 float32 with global average pooling -> 10 logits.

conv(3->16, 3x3, stride 2)-ReLU-conv(16->32, 3x3, stride 2)-ReLU-global avg pool-fc(32->10); any H, W.
Deterministic random weights (build_model() seeds its own RNG).
"""

import torch
import torch.nn as nn

SEED = 1006


class GapCNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def build_model(**sizes) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return GapCNN(**sizes).eval()
