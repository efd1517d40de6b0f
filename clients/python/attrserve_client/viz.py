"""Pictures of explanations, from numpy arrays: image heat maps and overlays (PNG), highlighted tokens (HTML or PNG)
and bar charts of tabular features (PNG). `render` picks one from the file's suffix and the attributions' shape.

An optional extra (`pip install 'attrserve-client[viz]'`): matplotlib is imported inside the functions that draw,
never when this module is imported, so the client and its CLI run without it (and never need torch).

Images follow Captum's `visualize_image_attr` (captum/attr/_utils/visualization.py) in numpy: the attributions are
summed over channels, the sign is chosen (`absolute_value`, `positive`, `negative` or `all`), divided by the value
at which the cumulative sum of the sorted |values| reaches 100 - `outlier_perc` percent of their total, and clipped
to [-1, 1]; the methods (`heat_map`, `blended_heat_map`, `original_image`, `masked_image`, `alpha_scaling`) and
the default colour maps are Captum's. Each input pixel becomes a `scale` x `scale` block of the PNG (nearest
neighbour), so the picture's size is exact: a 16x16 input at scale 16 is a 256x256 PNG.
"""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("heat_map", "blended_heat_map", "original_image", "masked_image", "alpha_scaling")
SIGNS = ("absolute_value", "positive", "negative", "all")
KINDS = ("auto", "image", "text", "tabular")
MISSING_MATPLOTLIB = "drawing needs matplotlib: pip install 'attrserve-client[viz]'"

_HTML_SUFFIXES = (".html", ".htm")
_POSITIVE = "#2ca02c"  # matplotlib's tab:green and tab:red, for the bars
_NEGATIVE = "#d62728"

Array = npt.NDArray[Any]


def require_matplotlib() -> None:
    """Raises ImportError with the install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(MISSING_MATPLOTLIB) from e


# --- Captum's normalisation ------------------------------------------------------------------------------------


def cumulative_sum_threshold(values: npt.ArrayLike, percentile: float) -> float:
    """The smallest sorted value at which the cumulative sum reaches `percentile` percent of the total (values >= 0)."""
    if not 0 <= percentile <= 100:
        raise ValueError("percentile for thresholding must be between 0 and 100 inclusive")
    sorted_values = np.sort(np.asarray(values).reshape(-1))
    cum_sums = np.cumsum(sorted_values)
    index = int(np.nonzero(cum_sums >= cum_sums[-1] * 0.01 * percentile)[0][0])
    return float(sorted_values[index])


def normalize_attr(attr: npt.ArrayLike, sign: str = "absolute_value", outlier_perc: float = 2) -> Array:
    """Captum's `_normalize_attr`: the chosen sign of `attr`, scaled so that the top `outlier_perc` percent of the
    total |attribution| saturates, clipped to [-1, 1] (to [0, 1] for one sign; `negative` comes back positive)."""
    a = np.asarray(attr, dtype=np.float64)
    if sign == "positive":
        a = np.maximum(a, 0)
    elif sign == "negative":
        a = np.minimum(a, 0)
    elif sign == "absolute_value":
        a = np.abs(a)
    elif sign != "all":
        raise ValueError(f"unknown sign {sign!r}; one of: {', '.join(SIGNS)}")
    threshold = cumulative_sum_threshold(np.abs(a), 100.0 - outlier_perc)
    if threshold == 0:
        raise ValueError("cannot normalise attributions that are all 0 (for this sign)")
    if sign == "negative":
        threshold = -threshold
    return np.clip(a / threshold, -1, 1)


# --- images ----------------------------------------------------------------------------------------------------


def to_hwc(array: npt.ArrayLike, layout: str = "auto") -> Array:
    """One image as (H, W, C): (H, W) gains a channel; (C, H, W), as PyTorch models take images, is transposed.
    `auto` reads 3 dims as HWC only when the last is 1, 3 or 4 channels and the first is not, else as CHW."""
    a = np.asarray(array)
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"an image has 2 or 3 dims (CHW, HWC or HW), not shape {a.shape}")
    if layout == "auto":
        layout = "HWC" if a.shape[2] in (1, 3, 4) and a.shape[0] not in (1, 3, 4) else "CHW"
    if layout == "CHW":
        return np.transpose(a, (1, 2, 0))
    if layout == "HWC":
        return a
    raise ValueError(f"unknown layout {layout!r}; one of: auto, CHW, HWC")


def _prepare_image(image: Array) -> Array:
    """Captum's handling of the original image: values <= 1 are scaled to 0-255; then truncated to ints in 0-255.
    Returned as RGB floats in [0, 1] (one channel is grey; other channel counts are shown as their mean)."""
    img = image * 255 if np.max(image) <= 1.0 else image
    img = np.clip(img.astype(int), 0, 255).astype(np.float64) / 255
    if img.shape[2] == 4:
        img = img[:, :, :3]  # RGBA: Captum's imshow shows it over white; the alpha of an input is rarely meant
    elif img.shape[2] != 3:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    return img


def _colormap(name_or_colors: str | Sequence[str]) -> Any:
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    if isinstance(name_or_colors, str):
        return matplotlib.colormaps[name_or_colors]
    return LinearSegmentedColormap.from_list("attrserve", list(name_or_colors))


def _default_cmap(sign: str) -> tuple[Any, float, float]:
    """Captum's default colour map and bounds for a sign."""
    if sign == "all":
        return _colormap(("red", "white", "green")), -1.0, 1.0
    return _colormap({"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}[sign]), 0.0, 1.0


def image_rgb(
    attributions: npt.ArrayLike,
    image: npt.ArrayLike | None = None,
    *,
    method: str = "heat_map",
    sign: str = "absolute_value",
    outlier_perc: float = 2,
    alpha_overlay: float = 0.5,
    cmap: str | None = None,
    layout: str = "auto",
) -> Array:
    """One picture as (H, W, 3) floats in [0, 1], pixel for pixel what Captum's `visualize_image_attr` shows
    (`alpha_scaling` composited over white). `attributions` and `image` are one example each: CHW, HWC or HW."""
    require_matplotlib()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of: {', '.join(METHODS)}")
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}; one of: {', '.join(SIGNS)}")
    attr = to_hwc(attributions, layout).astype(np.float64).sum(axis=2)
    img: Array | None = None
    if image is not None:
        img = _prepare_image(to_hwc(image, layout))
        if img.shape[:2] != attr.shape:
            raise ValueError(
                f"attributions of {attr.shape[0]}x{attr.shape[1]} pixels do not match an image of {img.shape[0]}x{img.shape[1]}"
            )
    elif method != "heat_map":
        raise ValueError(f"method {method} needs the input image")
    if method == "original_image":
        assert img is not None
        return img
    if method in ("masked_image", "alpha_scaling") and sign == "all":
        raise ValueError(f"{method} cannot show both signs: choose sign positive, negative or absolute_value")
    norm = normalize_attr(attr, sign, outlier_perc)
    if method in ("heat_map", "blended_heat_map"):
        default, vmin, vmax = _default_cmap(sign)
        colormap = default if cmap is None else _colormap(cmap)
        heat = np.asarray(colormap((norm - vmin) / (vmax - vmin)), dtype=np.float64)[:, :, :3]
        if method == "heat_map":
            return heat
        assert img is not None
        grey = img.mean(axis=2)  # Captum: imshow(mean over channels, cmap="gray"), which scales it to min..max
        span = grey.max() - grey.min()
        grey = (grey - grey.min()) / span if span > 0 else np.zeros_like(grey)
        grey_rgb = np.asarray(_colormap("gray")(grey), dtype=np.float64)[:, :, :3]
        return alpha_overlay * heat + (1 - alpha_overlay) * grey_rgb
    assert img is not None
    if method == "masked_image":
        return np.clip((img * 255 * norm[:, :, None]).astype(int), 0, 255) / 255
    alpha = np.clip((norm * 255).astype(int), 0, 255)[:, :, None] / 255  # alpha_scaling
    return img * alpha + (1 - alpha)


def default_scale(height: int, width: int) -> int:
    """Pixels per input pixel: enough for about 256 pixels along the longer side, at least 1."""
    return max(1, 256 // max(height, width))


def save_image(
    attributions: npt.ArrayLike,
    image: npt.ArrayLike | None,
    path: str | Path,
    *,
    method: str | Sequence[str] = "heat_map",
    sign: str = "absolute_value",
    outlier_perc: float = 2,
    alpha_overlay: float = 0.5,
    cmap: str | None = None,
    layout: str = "auto",
    scale: int | None = None,
) -> None:
    """Writes `image_rgb` as a PNG, each input pixel a `scale` x `scale` block. Several methods are drawn side by
    side (e.g. ("original_image", "blended_heat_map")), with a white gap of max(4, scale) pixels between them."""
    require_matplotlib()
    from matplotlib import image as mpimg

    methods = [method] if isinstance(method, str) else list(method)
    if not methods:
        raise ValueError("no method to draw")
    panels = [
        image_rgb(
            attributions, image, method=m, sign=sign, outlier_perc=outlier_perc, alpha_overlay=alpha_overlay, cmap=cmap, layout=layout
        )
        for m in methods
    ]
    height, width = panels[0].shape[:2]
    s = default_scale(height, width) if scale is None else scale
    if s < 1:
        raise ValueError("scale must be at least 1")
    big = [np.repeat(np.repeat(p, s, axis=0), s, axis=1) for p in panels]
    gap = np.ones((height * s, max(4, s), 3))
    row = [big[0]]
    for p in big[1:]:
        row += [gap, p]
    mpimg.imsave(str(path), np.clip(np.concatenate(row, axis=1), 0, 1), format="png")


# --- text ------------------------------------------------------------------------------------------------------


def token_values(attributions: npt.ArrayLike, count: int, scale: float | None = None) -> Array:
    """The first `count` of one example's per-token attributions divided by `scale` (default: the largest |value|
    among them), so they lie in [-1, 1]."""
    values = np.asarray(attributions, dtype=np.float64).reshape(-1)
    if values.size < count:
        raise ValueError(f"{count} tokens but only {values.size} attributions")
    values = values[:count]
    if scale is None:
        scale = float(np.max(np.abs(values))) if values.size else 0.0
    return np.clip(values / scale, -1, 1) if scale > 0 else np.zeros_like(values)


def token_color(value: float) -> str:
    """Captum's colour of a token with an attribution in [-1, 1]: green for positive, red for negative, deeper with
    the size, white at 0 (a CSS hsl() colour)."""
    value = max(-1.0, min(1.0, float(value)))
    lightness = 100 - int(50 * value) if value > 0 else 100 - int(-40 * value)
    return f"hsl({120 if value > 0 else 0}, 75%, {lightness}%)"


def _rgb_of(value: float) -> tuple[float, float, float]:
    value = max(-1.0, min(1.0, float(value)))
    lightness = (100 - int(50 * value) if value > 0 else 100 - int(-40 * value)) / 100
    return colorsys.hls_to_rgb((120 if value > 0 else 0) / 360, lightness, 0.75)


def text_html(tokens: Sequence[str], attributions: npt.ArrayLike, *, scale: float | None = None) -> str:
    """A <div> with one <span> per token (HTML-escaped), its background `token_color` of its scaled attribution
    and its raw attribution as the tooltip."""
    raw = np.asarray(attributions, dtype=np.float64).reshape(-1)[: len(tokens)]
    values = token_values(attributions, len(tokens), scale)
    spans = [
        f'<span title="{r:+.4g}" style="background-color: {token_color(v)}; padding: 0.1em 0.25em; border-radius: 0.2em">'
        f"{html.escape(str(t))}</span>"
        for t, v, r in zip(tokens, values, raw)
    ]
    return '<div style="font-family: sans-serif; line-height: 2.2">' + " ".join(spans) + "</div>"


def save_text_html(
    tokens: Sequence[str], attributions: npt.ArrayLike, path: str | Path, *, scale: float | None = None, title: str | None = None
) -> None:
    """Writes `text_html` as a whole HTML page (needs no matplotlib)."""
    heading = "" if title is None else f"<p>{html.escape(title)}</p>\n"
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
        + html.escape(title or "attributions")
        + "</title></head>\n<body>\n"
        + heading
        + text_html(tokens, attributions, scale=scale)
        + "\n</body></html>\n"
    )
    Path(path).write_text(page, encoding="utf-8")


def save_text_png(
    tokens: Sequence[str],
    attributions: npt.ArrayLike,
    path: str | Path,
    *,
    scale: float | None = None,
    title: str | None = None,
    width: int = 800,
    fontsize: float = 14,
    show_values: bool = True,
    dpi: int = 100,
) -> None:
    """The same highlighting as `text_html`, drawn to an image `width` pixels wide (tokens wrap onto more lines),
    each token's raw attribution under it when `show_values`."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import FancyBboxPatch

    raw = np.asarray(attributions, dtype=np.float64).reshape(-1)[: len(tokens)]
    values = token_values(attributions, len(tokens), scale)
    labels = [str(t) for t in tokens]
    fig = Figure(dpi=dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()
    font = FontProperties(size=fontsize)
    small = FontProperties(size=fontsize * 0.6)
    px = fontsize * dpi / 72  # the font size in pixels
    margin, pad, space = px, px * 0.3, px * 0.4
    box_h = px * 1.5
    line_h = box_h + (px * 1.1 if show_values else 0) + px * 0.6
    title_lines: list[str] = []  # the title's words, wrapped at the width
    for word in (title or "").split():
        joined = f"{title_lines[-1]} {word}" if title_lines else word
        if title_lines and renderer.get_text_width_height_descent(joined, font, ismath=False)[0] <= width - 2 * margin:
            title_lines[-1] = joined
        else:
            title_lines.append(word)
    title_h = px * (1.4 * len(title_lines) + 0.4) if title_lines else 0.0

    # Lay the tokens out in pixels, from the top left, wrapping at the width.
    boxes: list[tuple[float, int, float]] = []  # (x, line, box width)
    x, line = margin, 0
    for label, r in zip(labels, raw):
        w = renderer.get_text_width_height_descent(label, font, ismath=False)[0]
        if show_values:
            w = max(w, renderer.get_text_width_height_descent(f"{r:+.2f}", small, ismath=False)[0])
        w += 2 * pad
        if x + w > width - margin and x > margin:
            x, line = margin, line + 1
        boxes.append((x, line, w))
        x += w + space
    height = math.ceil(2 * margin + title_h + (line + 1) * line_h - px * 0.6)
    fig.set_size_inches((width + 0.5) / dpi, (height + 0.5) / dpi)  # + half a pixel: the canvas truncates

    def fy(y_from_top: float) -> float:
        return 1 - y_from_top / height

    for i, text in enumerate(title_lines):
        fig.text(margin / width, fy(margin + px * (1 + 1.4 * i)), text, fontproperties=font, parse_math=False, va="baseline")
    for (x0, ln, w), label, v, r in zip(boxes, labels, values, raw):
        top = margin + title_h + ln * line_h
        fig.add_artist(
            FancyBboxPatch(
                (x0 / width, fy(top + box_h)),
                w / width,
                box_h / height,
                boxstyle="round,pad=0,rounding_size=0.004",
                transform=fig.transFigure,
                facecolor=_rgb_of(v),
                edgecolor=(0.8, 0.8, 0.8),
                linewidth=0.5,
            )
        )
        fig.text((x0 + w / 2) / width, fy(top + box_h * 0.72), label, fontproperties=font, ha="center", va="baseline", parse_math=False)
        if show_values:
            fig.text(
                (x0 + w / 2) / width,
                fy(top + box_h + px * 0.85),
                f"{r:+.2f}",
                fontproperties=small,
                ha="center",
                va="baseline",
                color="0.35",
                parse_math=False,
            )
    fig.savefig(str(path), dpi=dpi, facecolor="white")


# --- tabular ---------------------------------------------------------------------------------------------------


def tabular_figure(
    values: npt.ArrayLike,
    feature_names: Sequence[str] | None = None,
    *,
    max_features: int | None = None,
    title: str | None = None,
    width: int = 640,
    bar_height: int = 24,
    dpi: int = 100,
) -> Figure:
    """A horizontal bar per feature, largest |attribution| at the top, green for positive and red for negative;
    `max_features` keeps the largest. The figure is `width` x (bar_height * bars + 72, + 24 with a title) pixels."""
    require_matplotlib()
    from matplotlib.figure import Figure

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    names = [f"feature {i}" for i in range(v.size)] if feature_names is None else [str(n) for n in feature_names]
    if len(names) != v.size:
        raise ValueError(f"{len(names)} feature names for {v.size} attributions")
    order = np.argsort(-np.abs(v), kind="stable")[: max_features if max_features is not None else v.size]
    n = len(order)
    top, bottom = (40 if title else 16), 56
    height = bar_height * n + top + bottom
    fig = Figure(figsize=((width + 0.5) / dpi, (height + 0.5) / dpi), dpi=dpi)  # + half a pixel: the canvas truncates
    ax = fig.add_axes((0.25, bottom / height, 0.7, bar_height * n / height))
    positions = np.arange(n)[::-1]  # the first (largest) bar on top
    shown = v[order]
    ax.barh(positions, shown, height=0.7, color=[_POSITIVE if x >= 0 else _NEGATIVE for x in shown])
    ax.set_yticks(positions, [names[i] for i in order])
    ax.set_ylim(-0.6, n - 0.4)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.set_xlabel("attribution")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=11)
    return fig


def save_tabular(
    values: npt.ArrayLike,
    path: str | Path,
    feature_names: Sequence[str] | None = None,
    *,
    max_features: int | None = None,
    title: str | None = None,
) -> None:
    """Writes `tabular_figure` (a PNG for a .png path)."""
    fig = tabular_figure(values, feature_names, max_features=max_features, title=title)
    fig.savefig(str(path), dpi=fig.dpi, facecolor="white")


# --- one entry point -------------------------------------------------------------------------------------------


def _one(array: npt.ArrayLike, batched_ndim: int, example: int) -> Array:
    """Example `example` of a batch (dim 0 = examples, as the server returns them) when `array` has `batched_ndim` dims."""
    a = np.asarray(array)
    return a[example] if a.ndim == batched_ndim else a


def render(
    attributions: npt.ArrayLike,
    inputs: npt.ArrayLike | None,
    path: str | Path,
    *,
    kind: str = "auto",
    tokens: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    method: str | Sequence[str] | None = None,
    sign: str = "absolute_value",
    example: int = 0,
    layout: str = "auto",
    outlier_perc: float = 2,
    scale: int | None = None,
    title: str | None = None,
) -> str:
    """Draws one example's attributions to `path` and returns the kind drawn ("image", "text" or "tabular").

    `auto` picks text when `tokens` are given or the path ends in .html; else an image for attributions of 3 dims
    (one CHW/HWC image) or 4 (a batch of them), else bars of features (1 dim, or 2: a batch of rows). Batched
    arrays (dim 0 = examples, as `AttributionClient.attribute` returns them) are drawn for example `example`.

    - image (PNG): `method` is one of METHODS or a sequence of them, side by side (default: `blended_heat_map`
      with `inputs`, `heat_map` without); `inputs` is the image, CHW, HWC or HW.
    - text (.html: spans; any other suffix: a picture): `tokens` are the words (default: the input ids); the
      attributions are one value per token, or per token and embedding dim (summed, as from a layer method on
      an embedding), with or without the batch dim.
    - tabular (PNG): bars sorted by |attribution|; `feature_names` label them (default "feature i").
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of: {', '.join(KINDS)}")
    suffix = Path(path).suffix.lower()
    attr = np.asarray(attributions)
    if kind == "auto":
        kind = "text" if tokens is not None or suffix in _HTML_SUFFIXES else "image" if attr.ndim >= 3 else "tabular"
    if kind != "text" and suffix in _HTML_SUFFIXES:
        raise ValueError(f"{suffix} is for text (tokens); draw an {kind} to a .png")

    if kind == "image":
        one = _one(attr, 4, example)
        image = None if inputs is None else _one(inputs, 4, example)
        chosen = method if method is not None else ("heat_map" if image is None else "blended_heat_map")
        save_image(one, image, path, method=chosen, sign=sign, outlier_perc=outlier_perc, layout=layout, scale=scale)
    elif kind == "text":
        values = _one(attr, 3, example).sum(axis=-1) if attr.ndim == 3 else _one(attr, 2, example)
        if tokens is None:
            if inputs is None:
                tokens = [str(i) for i in range(values.size)]
            else:
                tokens = [str(t) for t in _one(inputs, 2, example).reshape(-1).tolist()]
        if suffix in _HTML_SUFFIXES:
            save_text_html(tokens, values, path, title=title)
        else:
            save_text_png(tokens, values, path, title=title)
    elif kind == "tabular":
        values = _one(attr, 2, example) if attr.ndim <= 2 else attr[example]
        save_tabular(values, path, feature_names, title=title)
    return kind
