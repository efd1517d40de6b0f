"""Train the demo models on synthetic data with planted signals.

Usage:  python service/attrserve_service/demo_models/train.py [--no-save]

Deterministic (fixed seeds, one CPU thread, deterministic algorithms) and
CPU-only; takes a few seconds. Prints the held-out accuracy of each model and
writes <model>/weights.pt next to each model.py. The `toy` model has fixed
weights in code and is not trained.

The data generators (`make_tabular`, `make_image`, `make_text`) are also used
by the tests, so keep their signatures stable.
"""

import argparse
import importlib.util
import pathlib
import time
import types

import torch
import torch.nn as nn

HERE = pathlib.Path(__file__).resolve().parent


def load_model_module(name: str) -> types.ModuleType:
    """Import <name>/model.py by file path (as the server's loader does)."""
    path = HERE / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"demo_{name}_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------


def make_tabular(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, 1)^16; y = 1 iff 1.5*x2 - 2*x7 + x11 > 0."""
    x = torch.randn(n, 16, generator=generator)
    y = (1.5 * x[:, 2] - 2.0 * x[:, 7] + x[:, 11] > 0).long()
    return x, y


PATCH_ROWS = (2, 6)  # rows 2..5
PATCH_COLS = (9, 13)  # cols 9..12


def make_image(n: int, generator: torch.Generator, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise background U(0, 0.6); class 1 adds a bright 4x4 patch (~1.0) at
    rows 2-5, cols 9-12 in all channels. `label` forces one class."""
    x = 0.6 * torch.rand(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator) if label is None else torch.full((n,), int(label), dtype=torch.long)
    patch = 0.9 + 0.2 * torch.rand(n, 3, 4, 4, generator=generator)
    r0, r1 = PATCH_ROWS
    c0, c1 = PATCH_COLS
    sel = y == 1
    x[sel, :, r0:r1, c0:c1] = patch[sel]
    return x, y


SEQ_LEN = 12
POSITIVE_IDS = (3, 4, 5)
NEGATIVE_IDS = (6, 7, 8)
FILLER_IDS = (1, 2) + tuple(range(9, 50))


def make_text(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 5..12 tokens (right-padded with 0 to 12) of filler words
    plus 0..3 positive and 0..3 negative sentiment words (never equally many);
    y = 1 iff positives outnumber negatives."""
    g = generator
    ids = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    y = torch.zeros(n, dtype=torch.long)
    fillers = torch.tensor(FILLER_IDS)
    pos = torch.tensor(POSITIVE_IDS)
    neg = torch.tensor(NEGATIVE_IDS)
    for i in range(n):
        length = int(torch.randint(5, SEQ_LEN + 1, (1,), generator=g))
        while True:
            n_pos, n_neg = torch.randint(0, 4, (2,), generator=g).tolist()
            if n_pos != n_neg:
                break
        row = fillers[torch.randint(0, len(fillers), (length,), generator=g)]
        slots = torch.randperm(length, generator=g)[: n_pos + n_neg]
        words = torch.cat(
            [
                pos[torch.randint(0, 3, (n_pos,), generator=g)],
                neg[torch.randint(0, 3, (n_neg,), generator=g)],
            ]
        )
        row[slots] = words
        ids[i, :length] = row
        y[i] = int(n_pos > n_neg)
    return ids, y


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    weight_decay: float = 0.0,
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_tabular(seed: int = 0) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = load_model_module("tabular").build_model()
    x, y = make_tabular(6000, g)
    xt, yt = make_tabular(2000, g)
    fit(model, x, y, epochs=40, lr=3e-3, batch_size=128, generator=g)
    return model, accuracy(model, xt, yt)


def train_image(seed: int = 1) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = load_model_module("image").build_model()
    x, y = make_image(2000, g)
    xt, yt = make_image(1000, g)
    fit(model, x, y, epochs=8, lr=3e-3, batch_size=64, generator=g)
    return model, accuracy(model, xt, yt)


def train_text(seed: int = 2) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = load_model_module("text").build_model()
    # Small initial embeddings: filler words that carry no signal then stay
    # near zero, so attributions concentrate on the sentiment words.
    with torch.no_grad():
        model.embedding.weight.normal_(0.0, 0.1, generator=g)
        model.embedding.weight[0].zero_()
    x, y = make_text(6000, g)
    xt, yt = make_text(2000, g)
    fit(model, x, y, epochs=30, lr=1e-2, batch_size=128, generator=g)
    return model, accuracy(model, xt, yt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-save", action="store_true", help="train and report accuracy, write nothing")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    for name, train in (("tabular", train_tabular), ("image", train_image), ("text", train_text)):
        t0 = time.perf_counter()
        model, acc = train()
        dt = time.perf_counter() - t0
        line = f"{name:8s} held-out accuracy {acc * 100:6.2f}%  ({dt:.1f}s)"
        if not args.no_save:
            path = HERE / name / "weights.pt"
            torch.save(model.state_dict(), path)
            line += f"  -> {path.relative_to(HERE)} ({path.stat().st_size} bytes)"
        print(line, flush=True)
        if acc < 0.95:
            raise SystemExit(f"{name}: accuracy {acc:.4f} below 0.95")


if __name__ == "__main__":
    main()
