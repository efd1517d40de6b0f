"""W2/W4/W5 image: CNN conv(3->16)-pool-conv(16->32)-pool-fc(2048->64)-fc(64->10) on 3x32x32 float32.

3x3 convolutions with padding 1, ReLU after each conv and the hidden fc, 2x2 max-pooling.
Deterministic random weights (build_model() seeds its own RNG).
bench/models_smoke/bench_cnn builds the same class with tiny sizes.
"""

import torch
import torch.nn as nn

SEED = 1002


class CNN(nn.Module):
    def __init__(self, hw: int = 32, c1: int = 16, c2: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * (hw // 4) ** 2, hidden)  # 32 * 8 * 8 = 2048 at full size
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def build_model(**sizes) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return CNN(**sizes).eval()
