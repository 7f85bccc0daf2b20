from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import typing

import numpy as np
import pytest
import torch
from PIL import Image

from vae_core import ConvVAE, load_config
from vae_core.data.shards.read import RowBatch
from vae_core.evaluation.evaluate import EvalData, evaluate_model
from vae_core.evaluation.gate import HIGHER_IS_BETTER, GateMetric
from vae_core.evaluation.report import CAPTIONS, HIGHER, LOWER, METRICS, format_value, metric_unit, render_html
from vae_core.model.pictures import ROW_NAMES, upscale


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


def _decoded(attrs: dict[str, str | None]) -> np.ndarray:
    src = attrs["src"] or ""
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_pictures_are_inlined_pngs_as_saved():
    pictures = _pictures()
    page = _parse(_render())
    imgs = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(imgs) == len(pictures)
    for attrs, (name, original) in zip(imgs, pictures.items()):
        np.testing.assert_array_equal(_decoded(attrs), np.asarray(upscale(original)))
        assert attrs["alt"] == name
        assert name in page.text


def test_small_pictures_are_scaled_up_by_the_artifacts_function():
    page = _parse(_render())
    small, large = [attrs for tag, attrs in page.tags if tag == "img"]
    original = np.asarray(_pictures()["interpolation"])  # 102 x 42
    assert small["width"] == "306" and small["height"] == "126"  # a whole multiple keeps source pixels square
    np.testing.assert_array_equal(_decoded(small), np.kron(original, np.ones((3, 3), dtype=original.dtype)))
    assert large["width"] == "600"


def test_every_metric_shows_its_unit_and_which_way_is_better():
    rows = _parse(_render(metrics={"test/nll_k100": 80.0, "test/psnr": 20.0, "test/kl_dim_03": 0.5,
                                   "test/sharpness_samples": 0.7, "mystery": 1.0})).text
    assert rows[rows.index("test/nll_k100"):][:4] == ["test/nll_k100", "80", "nats/image", LOWER]
    assert rows[rows.index("test/psnr"):][:4] == ["test/psnr", "20", "dB", HIGHER]
    assert rows[rows.index("test/kl_dim_03"):][2] == "nats/image"
    assert rows[rows.index("test/sharpness_samples"):][3] == "closer to 1 is better"
    assert metric_unit("mystery") == ("", "")


def test_the_gates_metrics_read_their_direction_from_the_gate():
    for metric in typing.get_args(GateMetric):
        unit, better = METRICS[metric]
        assert unit and better == (HIGHER if metric in HIGHER_IS_BETTER else LOWER), metric


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_every_number_an_evaluation_reports_has_a_unit(digits_u8, kind):
    torch.manual_seed(0)
    config = load_config("digits").model.model_copy(update={"kind": kind})
    images = digits_u8[:40].permute(0, 2, 3, 1).numpy()
    labels = np.arange(40) % 4
    reference = RowBatch(images[:20], labels[:20].astype(np.int32), [str(i) for i in range(20)])
    evaluation = evaluate_model(ConvVAE(config).eval(), EvalData.from_arrays(images[20:], labels[20:], reference),
                                k=2, batch_size=20)
    names = [*evaluation.metrics, "frechet_samples", "frechet_reconstructions"]  # no feature net here
    assert [n for n in names if not all(metric_unit(n))] == []


def test_reconstructions_caption_says_which_rows_are_originals():
    page = _parse(_render(pictures={"reconstructions": Image.new("L", (300, 100))}))
    caption = CAPTIONS["reconstructions"]
    assert caption in page.text
    assert all(f'"{name}"' in caption for name in ROW_NAMES) and "row below" in caption


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
