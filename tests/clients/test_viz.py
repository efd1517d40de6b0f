"""attrserve_client.viz against Captum's visualization code (the oracle), the PNG/HTML files it writes, and
`attrserve attribute --render` against an in-process fake server."""

import html
import os
import pathlib
import re
import subprocess
import sys

import grpc
import matplotlib.image as mpimg
import numpy as np
import pytest
from captum.attr._utils import visualization as captum_viz

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import cli, from_tensor_proto, to_tensor_proto, viz
from servers import fake_server as serve_fake

CLIENT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "clients" / "python"
HINT = "pip install 'attrserve-client[viz]'"


def patch_image(size=16, patch=(slice(2, 6), slice(9, 13)), seed=0):
    """A CHW image on a mid-grey noisy background and attributions that are large on a patch, small elsewhere."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.4, 0.6, (3, size, size))
    attributions = rng.normal(0, 0.01, (3, size, size))
    attributions[:, patch[0], patch[1]] += 1.0
    return image, attributions


# --- the normalisation is Captum's -------------------------------------------------------------------------------

@pytest.mark.parametrize("percentile", [0, 50, 98, 100])
def test_cumulative_sum_threshold_matches_captum(percentile):
    values = np.abs(np.random.default_rng(1).normal(size=(7, 9)))
    assert viz.cumulative_sum_threshold(values, percentile) == captum_viz._cumulative_sum_threshold(values, percentile)


@pytest.mark.parametrize("sign", viz.SIGNS)
@pytest.mark.parametrize("outlier_perc", [2, 10])
def test_normalize_attr_matches_captum(sign, outlier_perc):
    rng = np.random.default_rng(2)
    for shape in [(16, 16), (5, 31)]:
        attr = rng.normal(size=shape) * rng.uniform(0.1, 10)
        ours = viz.normalize_attr(attr, sign, outlier_perc)
        np.testing.assert_allclose(ours, captum_viz._normalize_attr(attr, sign, outlier_perc), rtol=1e-12, atol=0)
        assert ours.min() >= (-1 if sign == "all" else 0) and ours.max() <= 1
        assert np.isclose(np.abs(ours).max(), 1.0)  # the outliers saturate


def test_normalize_attr_rejects_what_captum_rejects():
    with pytest.raises(ValueError, match="unknown sign"):
        viz.normalize_attr(np.ones((2, 2)), "both")
    with pytest.raises(ValueError, match="all 0"):
        viz.normalize_attr(np.ones((2, 2)), "negative")


def captum_picture(attr_hwc, image_hwc, method, sign):
    """What Captum's visualize_image_attr draws, as (H, W, 3) floats: its AxesImages' colours, blended as imshow does."""
    fig, ax = captum_viz.visualize_image_attr(attr_hwc, image_hwc, method=method, sign=sign, use_pyplot=False)
    images = ax.get_images()
    if method == "heat_map":
        return images[0].to_rgba(images[0].get_array())[..., :3]
    if method == "blended_heat_map":
        grey = images[0].to_rgba(images[0].get_array())[..., :3]
        heat = images[1].to_rgba(images[1].get_array())[..., :3]
        return 0.5 * heat + 0.5 * grey
    pixels = np.asarray(images[0].get_array(), dtype=np.float64) / 255
    if method == "alpha_scaling":  # RGBA over the white axes
        return pixels[..., :3] * pixels[..., 3:] + (1 - pixels[..., 3:])
    return pixels


@pytest.mark.parametrize("method,sign", [
    ("heat_map", "absolute_value"), ("heat_map", "all"), ("heat_map", "negative"),
    ("blended_heat_map", "positive"), ("blended_heat_map", "all"),
    ("masked_image", "absolute_value"), ("alpha_scaling", "positive"), ("original_image", "all"),
])
def test_image_pixels_are_captums(method, sign):
    image, attributions = patch_image(seed=3)
    attributions += np.random.default_rng(4).normal(0, 0.3, attributions.shape)  # both signs, everywhere
    ours = viz.image_rgb(attributions, image, method=method, sign=sign)  # CHW, as the server returns it
    expected = captum_picture(attributions.transpose(1, 2, 0), image.transpose(1, 2, 0), method, sign)
    assert ours.shape == (16, 16, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    # HWC input draws the same picture
    np.testing.assert_array_equal(viz.image_rgb(attributions.transpose(1, 2, 0), image.transpose(1, 2, 0), method=method, sign=sign), ours)


def test_image_errors():
    image, attributions = patch_image()
    with pytest.raises(ValueError, match="cannot show both signs"):
        viz.image_rgb(attributions, image, method="masked_image", sign="all")
    with pytest.raises(ValueError, match="needs the input image"):
        viz.image_rgb(attributions, None, method="blended_heat_map")
    with pytest.raises(ValueError, match="do not match"):
        viz.image_rgb(attributions[:, :8, :8], image, method="blended_heat_map")
    with pytest.raises(ValueError, match="unknown method"):
        viz.image_rgb(attributions, image, method="contour")


# --- PNG files ---------------------------------------------------------------------------------------------------

def test_image_png_size(tmp_path):
    image, attributions = patch_image(size=16)
    image, attributions = image[:, :, :12], attributions[:, :, :12]  # 16 high, 12 wide
    viz.save_image(attributions, image, tmp_path / "one.png", method="heat_map", scale=8)
    assert mpimg.imread(tmp_path / "one.png").shape[:2] == (128, 96)
    viz.save_image(attributions, None, tmp_path / "default.png")  # 256 // 16 = 16 per pixel
    assert mpimg.imread(tmp_path / "default.png").shape[:2] == (256, 192)
    viz.save_image(attributions, image, tmp_path / "two.png", method=("original_image", "blended_heat_map"), scale=8)
    two = mpimg.imread(tmp_path / "two.png")
    assert two.shape[:2] == (128, 96 + 8 + 96)
    np.testing.assert_array_equal(two[:, 96:104, :3], 1.0)  # the white gap
    assert (tmp_path / "two.png").stat().st_size < 100_000


def read_png(path):
    return mpimg.imread(path)[..., :3].astype(np.float64)


def test_blended_masked_and_alpha_pixels_follow_the_attributions(tmp_path):
    image, attributions = patch_image()
    s = 4
    inside, outside = (3 * s + 1, 10 * s + 1), (12 * s + 1, 3 * s + 1)  # (row, col) in the PNG
    viz.save_image(attributions, image, tmp_path / "blend.png", method="blended_heat_map", sign="positive", scale=s)
    blend = read_png(tmp_path / "blend.png")
    green = lambda px: px[1] - (px[0] + px[2]) / 2  # noqa: E731
    assert green(blend[inside]) > 0.08 and abs(green(blend[outside])) < 0.03  # Greens on the patch, grey elsewhere
    viz.save_image(attributions, image, tmp_path / "masked.png", method="masked_image", sign="absolute_value", scale=s)
    masked = read_png(tmp_path / "masked.png")
    assert masked[inside].min() > 0.35 and masked[outside].max() < 0.05  # the image on the patch, black elsewhere
    viz.save_image(attributions, image, tmp_path / "alpha.png", method="alpha_scaling", sign="absolute_value", scale=s)
    alpha = read_png(tmp_path / "alpha.png")
    assert alpha[inside].max() < 0.65 and alpha[outside].min() > 0.95  # the image on the patch, white elsewhere
    # what shows on the patch is the image itself (times a normalised attribution of about 1)
    expected = np.floor(image[:, 3, 10] * 255) / 255
    np.testing.assert_allclose(masked[inside], expected, atol=0.02)


# --- text --------------------------------------------------------------------------------------------------------

TOKENS = ["the", "<b>great</b>", "&", "awful", "film", '"quoted"']
TOKEN_ATTR = np.array([0.0, 2.0, 0.5, -4.0, -0.1, 1.0])


def spans(page):
    return re.findall(r'<span title="([^"]*)" style="background-color: hsl\((\d+), 75%, (\d+)%\)[^"]*">(.*?)</span>', page)


def test_text_html_escapes_every_token_and_colours_by_sign(tmp_path):
    viz.save_text_html(TOKENS, TOKEN_ATTR, tmp_path / "t.html", title="IG <on> embedding")
    page = (tmp_path / "t.html").read_text()
    assert "<b>" not in page and "<on>" not in page and "IG &lt;on&gt; embedding" in page
    found = spans(page)
    assert [html.unescape(text) for *_, text in found] == TOKENS
    assert [text for *_, text in found] == [html.escape(t) for t in TOKENS]
    hues = [int(h) for _, h, _, _ in found]
    lightness = [int(light) for _, _, light, _ in found]
    assert hues == [0, 120, 120, 0, 0, 120]  # green for positive, red for negative (Captum's colours)
    assert lightness[0] == 100  # 0 is white
    assert lightness[3] == 60 and lightness[3] < lightness[4]  # the largest |value| is the deepest red
    assert lightness[1] == 75 and lightness[1] < lightness[5] < lightness[2]  # greens deepen with the value
    assert [float(title) for title, *_ in found] == TOKEN_ATTR.tolist()  # the raw values as tooltips


def test_token_color_is_captums():
    for value in [-1.0, -0.6, -0.01, 0.0, 0.3, 1.0, 2.5]:
        assert viz.token_color(value) == captum_viz._get_color(value)


def test_text_png(tmp_path):
    viz.save_text_png(TOKENS, TOKEN_ATTR, tmp_path / "t.png", title="title $x$")
    one_line = mpimg.imread(tmp_path / "t.png")
    assert one_line.shape[1] == 800
    viz.save_text_png(TOKENS * 12, np.tile(TOKEN_ATTR, 12), tmp_path / "long.png")
    many_lines = mpimg.imread(tmp_path / "long.png")
    assert many_lines.shape[1] == 800 and many_lines.shape[0] > 3 * one_line.shape[0]  # the tokens wrap
    pixels = one_line[..., :3].reshape(-1, 3)
    reds = (pixels[:, 0] > 0.8) & (pixels[:, 1] < 0.5)  # the box of "awful"
    greens = (pixels[:, 1] > 0.8) & (pixels[:, 0] < 0.6)  # the box of "<b>great</b>"
    assert reds.sum() > 100 and greens.sum() > 100
    viz.save_text_png(TOKENS, TOKEN_ATTR, tmp_path / "wrapped.png", title=" ".join(["a long title"] * 30))
    assert mpimg.imread(tmp_path / "wrapped.png").shape[0] > one_line.shape[0] + 40  # the title wraps too


# --- tabular -----------------------------------------------------------------------------------------------------

def test_bar_chart_orders_by_magnitude_and_colours_by_sign(tmp_path):
    values = np.array([0.1, -3.0, 0.0, 2.0, -0.5, 1.0])
    names = [f"f{i}" for i in range(6)]
    fig = viz.tabular_figure(values, names)
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda bar: -bar.get_y())  # top to bottom
    assert [bar.get_width() for bar in bars] == [-3.0, 2.0, 1.0, -0.5, 0.1, 0.0]
    by_position = {round(tick): label.get_text() for tick, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert [by_position[round(bar.get_y() + bar.get_height() / 2)] for bar in bars] == ["f1", "f3", "f5", "f4", "f0", "f2"]
    red, green = (0.839, 0.153, 0.157), (0.173, 0.627, 0.173)
    assert [tuple(round(c, 3) for c in bar.get_facecolor()[:3]) for bar in bars] == [red, green, green, red, green, green]
    top = viz.tabular_figure(values, max_features=2).axes[0]
    assert len(top.patches) == 2 and [t.get_text() for t in top.get_yticklabels()] == ["feature 3", "feature 1"][::-1]  # bottom up
    viz.save_tabular(values, tmp_path / "bars.png", names)
    assert mpimg.imread(tmp_path / "bars.png").shape[:2] == (24 * 6 + 72, 640)
    with pytest.raises(ValueError, match="3 feature names for 6"):
        viz.tabular_figure(values, names[:3])


# --- render --------------------------------------------------------------------------------------------------------

def test_render_picks_the_kind(tmp_path):
    image, attributions = patch_image()
    assert viz.render(attributions[None], image[None], tmp_path / "i.png") == "image"
    assert mpimg.imread(tmp_path / "i.png").shape[:2] == (256, 256)
    assert viz.render(np.ones((2, 5)) * [1, -2, 3, 0, 1], None, tmp_path / "t.png", feature_names=list("abcde")) == "tabular"
    assert viz.render(np.ones((1, 6, 4)), np.zeros((1, 6), np.int64), tmp_path / "x.html", tokens=TOKENS) == "text"
    assert [html.unescape(t) for *_, t in spans((tmp_path / "x.html").read_text())] == TOKENS
    assert viz.render(np.arange(1, 5)[None], [[7, 8, 9, 0]], tmp_path / "ids.html") == "text"  # the ids as tokens
    assert [t for *_, t in spans((tmp_path / "ids.html").read_text())] == ["7", "8", "9", "0"]
    assert viz.render(np.ones((1, 6, 4)), None, tmp_path / "tokens.png", tokens=TOKENS) == "text"
    assert mpimg.imread(tmp_path / "tokens.png").shape[1] == 800
    with pytest.raises(ValueError, match="is for text"):
        viz.render(attributions, image, tmp_path / "i.html", kind="image")
    with pytest.raises(ValueError, match="unknown kind"):
        viz.render(attributions, image, tmp_path / "i.png", kind="video")


def test_without_matplotlib_drawing_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=re.escape(HINT)):
        viz.render(np.ones((3, 4, 4)), None, tmp_path / "x.png")
    with pytest.raises(ImportError, match=re.escape(HINT)):
        viz.require_matplotlib()
    viz.save_text_html(["a"], [1.0], tmp_path / "x.html")  # HTML needs no matplotlib
    assert not (tmp_path / "x.png").exists()


def test_client_and_cli_import_without_matplotlib_or_torch():
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['torch'] = None\n"
            "import attrserve_client.cli, attrserve_client.viz\n"
            "assert not any(m.startswith(('matplotlib', 'torch')) for m in sys.modules if sys.modules[m] is not None)\n"
            "sys.exit(attrserve_client.cli.main(['attribute', '--help']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--render FILE" in done.stdout


# --- the CLI -------------------------------------------------------------------------------------------------------

class Fake(pb_grpc.AttributionServiceServicer):
    """Attributions are the inputs times 2 (minus 1 for floats, so both signs show); no model has a config."""

    def __init__(self):
        self.requests = []

    def Attribute(self, request, context):
        self.requests.append(request)
        attributions = []
        for t in request.inputs:
            x = from_tensor_proto(t)
            attributions.append(to_tensor_proto((x * 2 - 1).astype(np.float32) if x.dtype.kind == "f" else x.astype(np.float32)))
        return pb.AttributeResponse(request_id=request.request_id, attributions=attributions, model_version="1", seed=1)

    def GetModel(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")


@pytest.fixture
def fake_server():
    fake = Fake()
    with serve_fake(fake, workers=2) as address:
        yield address, fake


def attribute(address, *extra):
    return cli.main(["attribute", "--target-address", address, "--model", "m", "--algorithm", "saliency", *extra])


def test_cli_render_writes_pictures(fake_server, tmp_path, capsys):
    address, _ = fake_server
    image, _ = patch_image(size=8)
    np.save(tmp_path / "image.npy", image[None].astype(np.float32))
    assert attribute(address, "--inputs", str(tmp_path / "image.npy"), "--render", str(tmp_path / "image.png"), "--json") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("{") and f"wrote {tmp_path / 'image.png'} (image)" in captured.err
    picture = read_png(tmp_path / "image.png")
    assert picture.shape == (256, 256, 3)
    np.testing.assert_allclose(picture, viz.image_rgb(image * 2 - 1, image, method="blended_heat_map").repeat(32, 0).repeat(32, 1), atol=1 / 255)

    assert attribute(address, "--inputs", "[[0.9, 0.1, 0.2, 0.0]]", "--render", str(tmp_path / "bars.png"),
                     "--render-feature-names", '["a", "b", "c", "d"]') == 0
    assert mpimg.imread(tmp_path / "bars.png").shape[:2] == (24 * 4 + 72, 640)

    assert attribute(address, "--inputs", "[[3, 4, 6, 0]]", "--render", str(tmp_path / "text.html"),
                     "--render-tokens", "good <great> bad <pad>") == 0
    found = spans((tmp_path / "text.html").read_text())
    assert [t for *_, t in found] == ["good", "&lt;great&gt;", "bad", "&lt;pad&gt;"]
    assert "(text)" in capsys.readouterr().err


def test_cli_render_errors(fake_server, tmp_path, capsys):
    address, fake = fake_server
    assert attribute(address, "--inputs", "[[1.0, 2.0]]", "--render", str(tmp_path / "x.png"), "--render-feature-names", '"a"') == 2
    assert capsys.readouterr().err == "error: --render: --render-feature-names must be a JSON list\n"
    assert attribute(address, "--inputs", "[[1.0, 2.0]]", "--render", str(tmp_path / "x.html"), "--render-kind", "tabular") == 2
    assert "is for text" in capsys.readouterr().err


def test_cli_render_without_matplotlib(fake_server, tmp_path, capsys, monkeypatch):
    address, fake = fake_server
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert attribute(address, "--inputs", "[[1.0, 2.0]]", "--render", str(tmp_path / "x.png")) == 2
    assert capsys.readouterr().err == f"error: {viz.MISSING_MATPLOTLIB}\n"
    assert HINT in viz.MISSING_MATPLOTLIB
    assert fake.requests == [] and not (tmp_path / "x.png").exists()  # refused before asking the server
    assert attribute(address, "--inputs", "[[1.0, 2.0]]") == 0  # without --render nothing needs matplotlib
