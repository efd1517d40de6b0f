"""Draws the README's pictures (docs/images/*.png, text_tokens.html) from a running demo server.

    .venv/bin/attrserve serve                                  # the demo models, on 127.0.0.1:50051
    .venv/bin/python docs/images/make_pictures.py [ADDRESS]    # another terminal

It starts nothing itself: it asks the server at ADDRESS (default 127.0.0.1:50051) for three explanations with the
light client and draws them with attrserve_client.viz (needs matplotlib: pip install 'attrserve-client[viz]').
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from attrserve_client import AttributionClient, viz

HERE = Path(__file__).resolve().parent
# The first 20 words of the demo text model's vocabulary (service/attrserve_service/demo_models/text/model.py).
VOCAB = [
    "<pad>", "<unk>", "the", "good", "great", "excellent", "bad", "awful", "terrible", "a",
    "movie", "film", "was", "is", "it", "this", "and", "plot", "story", "acting",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port of a server with the demo models")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the pictures (default: next to this script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with AttributionClient(args.address) as client:
        # image: Integrated Gradients for class 1 on an image with the planted bright patch (rows 2-5, cols 9-12);
        # the input, the heat map and the heat map over the input in grey, side by side (green for, red against).
        rng = np.random.default_rng(0)
        image = rng.uniform(0, 0.6, (1, 3, 16, 16)).astype(np.float32)
        image[:, :, 2:6, 9:13] = 1.0
        r = client.attribute("image", "integrated_gradients", image, baselines=0.0, target=1)
        viz.render(r.attributions, image, args.out / "image_ig.png", method=("original_image", "heat_map", "blended_heat_map"), sign="all")

        # text: Layer Integrated Gradients on the embedding, padding (id 0) as the baseline, summed over the embedding dim.
        words = ["the", "movie", "was", "great", "and", "the", "acting", "was", "excellent", "but", "bad"]
        ids = [[VOCAB.index(w) if w in VOCAB else 1 for w in words] + [0] * (12 - len(words))]
        r = client.attribute("text", "layer_integrated_gradients", ids, baselines=0, target=1, layer="embedding")
        title = "LayerIntegratedGradients on `embedding`, target 1 (positive); green: for, red: against"
        for name in ("text_tokens.png", "text_tokens.html"):
            viz.render(r.attributions, ids, args.out / name, tokens=words, title=title)

        # tabular: Integrated Gradients for class 1 (1.5*f2 - 2*f7 + f11 > 0) on one example; 13 features are noise.
        x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
        x[0, [2, 7, 11]] = [1.2, -0.8, 0.6]
        r = client.attribute("tabular", "integrated_gradients", x, baselines=0.0, target=1)
        names = [f"f{i} = {v:+.2f}" for i, v in enumerate(x[0])]
        viz.render(
            r.attributions, x, args.out / "tabular_bars.png", feature_names=names, title="IntegratedGradients, demo tabular model, target 1"
        )

    for path in sorted(args.out.glob("*_*.*")):
        if path.suffix in (".png", ".html"):
            print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
