"""W3 text: Embedding(1000, 64) + 2-layer TransformerEncoder (4 heads, d_ff 256) + mean-pool + Linear(64, 2).

Input: int64 token ids, 32 per example. Explained with LayerIntegratedGradients
on `embedding`. Deterministic random weights (build_model() seeds its own RNG);
dropout 0 and eval mode, so the forward is deterministic.
bench/models_smoke/bench_text builds the same class with tiny sizes.
"""

import torch
import torch.nn as nn

SEED = 1003


class TextTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 64, heads: int = 4, layers: int = 2, classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, classes)

    def forward(self, token_ids):
        h = self.encoder(self.embedding(token_ids))
        return self.fc(h.mean(dim=1))


def build_model(**sizes) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return TextTransformer(**sizes).eval()
