"""Image demo: a small CNN on 3x16x16 float32 images -> 2 class logits.

Planted signal (see train.py): class-1 images carry a bright 4x4 patch at
rows 2-5, cols 9-12 on a noisy background; class-0 images do not.
"""

import torch.nn as nn
from torch import Tensor

IMAGE_SHAPE = (3, 16, 16)
PATCH_ROWS = (2, 6)  # half-open: rows 2..5
PATCH_COLS = (9, 13)  # half-open: cols 9..12


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(self.flatten(x))


def build_model() -> nn.Module:
    return SmallCNN()
