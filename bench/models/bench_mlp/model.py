"""W1 tabular: MLP 64 -> 128 -> 128 -> 2 (ReLU), float32 inputs of 64 features.

Weights are random but deterministic: build_model() seeds its own RNG (the
server's global torch RNG is left as it was), so every process that builds it
— attrserve, the B2 baseline, the bench itself — gets the same model.
bench/models_smoke/bench_mlp builds the same class with tiny sizes.
"""

import torch
import torch.nn as nn

SEED = 1001


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def build_model(**sizes) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return MLP(**sizes).eval()
