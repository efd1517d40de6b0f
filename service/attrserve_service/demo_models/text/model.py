"""Text demo: a bag-of-embeddings sentiment classifier -> 2 class logits.

Input: int64 token ids of shape (B, 12), vocabulary of 50 (id 0 = padding).
Planted signal (see train.py): ids 3, 4, 5 ("good", "great", "excellent")
are positive, ids 6, 7, 8 ("bad", "awful", "terrible") negative; the label
is 1 when positive words outnumber negative ones. Everything else is filler.
"""

import torch.nn as nn
from torch import Tensor

SEQ_LEN = 12
PAD_ID = 0
UNK_ID = 1
POSITIVE_IDS = (3, 4, 5)
NEGATIVE_IDS = (6, 7, 8)

# fmt: off
VOCAB = [
    "<pad>", "<unk>", "the",
    "good", "great", "excellent",
    "bad", "awful", "terrible",
    "a", "movie", "film", "was", "is", "it", "this", "and", "plot", "story",
    "acting", "actor", "scene", "i", "we", "they", "saw", "watched", "felt",
    "very", "quite", "really", "of", "to", "in", "on", "with", "for", "at",
    "ending", "music", "cast", "director", "time", "book", "show", "script",
    "character", "day", "night", "people",
]
# fmt: on
assert len(VOCAB) == 50
VOCAB_SIZE = len(VOCAB)


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, 16, padding_idx=PAD_ID)
        self.fc1 = nn.Linear(16, 16)
        self.tanh = nn.Tanh()
        self.fc2 = nn.Linear(16, 2)

    def forward(self, token_ids: Tensor) -> Tensor:
        # Mean over all SEQ_LEN positions; the padding embedding is fixed at 0,
        # so an all-padding input embeds to the zero vector.
        pooled = self.embedding(token_ids).mean(dim=1)
        return self.fc2(self.tanh(self.fc1(pooled)))


def build_model() -> nn.Module:
    return TextClassifier()
