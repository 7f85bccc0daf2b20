from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from vae_core.evaluation.report import format_value, render_html


class _Page(HTMLParser):
    """Collects start tags with their attributes and the page's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _pictures() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    return {
        "interpolation": Image.fromarray(rng.integers(0, 256, (42, 102), dtype=np.uint8)),
        "latent_pca": Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)),
    }


def _render(**kwargs) -> str:
    args = dict(
        title="digits VAE, version 3",
        facts={"model": "digits-vae", "version": "3", "dataset": "digits", "split": "test", "K": "64", "seed": "0"},
        metrics={"test/elbo": -23.456789, "test/bits_per_dim": 0.123456, "active_units": 7.0,
                 "probe/knn_accuracy": 0.95, "huge": 123456789.0},
        pictures=_pictures(),
        notes=["k-NN left out 5 unlabelled test rows"],
    )
    args.update(kwargs)
    return render_html(**args)


def test_every_metric_name_and_value_appears():
    page = _parse(_render())
    text = "\n".join(page.text)
    for name, value in {"test/elbo": "-23.46", "test/bits_per_dim": "0.1235", "active_units": "7",
                        "probe/knn_accuracy": "0.95", "huge": "1.235e+08"}.items():
        assert name in text
        assert value in text
    for group in ("test", "probe"):
        assert group in page.text
    for fact in ("digits-vae", "split", "K"):
        assert fact in page.text
    assert "k-NN left out 5 unlabelled test rows" in page.text
    assert "digits VAE, version 3" in text


def test_metrics_are_grouped_by_prefix():
    page = _parse(_render(metrics={"a/x": 1.0, "b/y": 2.0, "a/z": 3.0, "plain": 4.0}))
    cells = [t for t in page.text if t in {"a", "b", "a/x", "a/z", "b/y", "plain"}]
    assert cells == ["plain", "a", "a/x", "a/z", "b", "b/y"]


def test_format_value_keeps_four_significant_digits():
    assert format_value(0.123456) == "0.1235"
    assert format_value(1234.56) == "1235"
    assert format_value(-23.456789) == "-23.46"
    assert format_value(float("nan")) == "nan"
    assert format_value(3) == "3"


def test_pictures_are_inlined_pngs_of_the_same_size():
    pictures = _pictures()
    page = _parse(_render())
    imgs = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(imgs) == len(pictures)
    for attrs, (name, original) in zip(imgs, pictures.items()):
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert decoded.size == original.size
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(original))
        assert attrs["alt"] == name
        assert name in page.text


def test_small_pictures_are_scaled_up_pixelated():
    page = _parse(_render())
    small, large = [attrs for tag, attrs in page.tags if tag == "img"]
    assert "pixelated" in small["style"] and int(small["width"]) >= 256
    assert int(small["width"]) % 102 == 0  # a whole multiple keeps source pixels square
    assert "style" not in large and large["width"] == "600"


def test_page_is_self_contained():
    raw = _render()
    page = _parse(raw)
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http://", "https://", "//")), (tag, key, value)
        assert tag not in {"script", "link", "iframe"}
    assert "http://" not in raw and "https://" not in raw


def test_text_is_escaped():
    evil = "<script>alert(1)</script>"
    raw = _render(title=evil, facts={evil: evil}, metrics={evil: 1.0, f"g/{evil}": 2.0}, notes=[evil],
                  pictures={evil: Image.new("L", (8, 8))})
    page = _parse(raw)
    assert all(tag != "script" for tag, _ in page.tags)
    assert "<script>" not in raw
    assert sum(evil in t for t in page.text) >= 5
    img = next(attrs for tag, attrs in page.tags if tag == "img")
    assert img["alt"] == evil


def test_empty_sections():
    page = _parse(render_html("t", {}, {}, {}))
    assert "No metrics." in page.text
    assert not [t for t, _ in page.tags if t == "img"]
