from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_core import ConvVAE, load_config
from vae_core.data.sources.digits import load_digits_u8
from vae_core.evaluation.pictures import (_legend_labels, _scatter_figure, _traversal_latents, interpolation_grid,
                                          latent_maps, scatter_2d, traversal_grid)
from vae_core.model.pictures import MIN_WIDTH, grid


@pytest.fixture
def model() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(load_config("digits").model).eval()


def _scale(cols: int, w: int = 8) -> int:
    """The whole factor a grid of `cols` tiles `w` wide (padding 2) is scaled up by to reach MIN_WIDTH."""
    return -(-MIN_WIDTH // (cols * (w + 2) + 2))


def _grid_size(rows: int, cols: int, h: int, w: int) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid with padding=2, scaled up to MIN_WIDTH."""
    return _scale(cols, w) * (cols * (w + 2) + 2), _scale(cols, w) * (rows * (h + 2) + 2)


def _tile(img, row: int, col: int, cols: int, h: int = 8, w: int = 8) -> np.ndarray:
    """Pixels of the tile at (row, col) of a padding-2 grid of `cols` columns, at their own size."""
    scale = _scale(cols, w)
    arr = np.asarray(img)[::scale, ::scale]
    y, x = 2 + row * (h + 2), 2 + col * (w + 2)
    return arr[y : y + h, x : x + w]


def test_interpolation_grid_has_one_row_per_pair(model, digits_u8):
    pairs = digits_u8[:6].reshape(3, 2, 1, 8, 8)
    img = interpolation_grid(model, pairs, steps=7)
    assert img.size == _grid_size(3, 7, 8, 8)
    expected = grid(model.interpolate(pairs[1, 0], pairs[1, 1], 7), nrow=7)
    for col in range(7):
        np.testing.assert_array_equal(_tile(img, 1, col, 7), _tile(expected, 0, col, 7))
    with pytest.raises(ValueError, match=r"\(6, 1, 8, 8\)"):
        interpolation_grid(model, digits_u8[:6])


def test_traversal_latents_change_only_the_swept_dimension():
    z = torch.arange(5, dtype=torch.float32)
    batch = _traversal_latents(z, [3, 0], span=2.0, steps=5)
    assert batch.shape == (10, 5)
    sweep = torch.linspace(-2.0, 2.0, 5)
    for i, d in enumerate([3, 0]):
        rows = batch[i * 5 : (i + 1) * 5]
        torch.testing.assert_close(rows[:, d], sweep)
        others = [j for j in range(5) if j != d]
        torch.testing.assert_close(rows[:, others], z[others].expand(5, -1))


def test_traversal_grid_size_and_determinism(model, digits_u8):
    img = traversal_grid(model, digits_u8[0], dims=[0, 2, 5], steps=9)
    assert img.size == _grid_size(3, 9, 8, 8)
    again = traversal_grid(model, digits_u8[0], dims=[0, 2, 5], steps=9)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(again))


def test_traversal_of_a_dead_decoder_input_is_constant(model, digits_u8):
    dead, live = 3, 5
    with torch.no_grad():
        model.from_latent[0].weight[:, dead] = 0.0
        model.from_latent[0].weight[:, live] *= 5.0  # a clearly visible effect, even untrained
    img = traversal_grid(model, digits_u8[0], dims=[dead, live], steps=7)
    dead_tiles = [_tile(img, 0, c, 7) for c in range(7)]
    live_tiles = [_tile(img, 1, c, 7) for c in range(7)]
    assert all(np.array_equal(t, dead_tiles[0]) for t in dead_tiles)
    assert not np.array_equal(live_tiles[0], live_tiles[-1])


@pytest.mark.parametrize("dims", [[8], [-1], [0, 9], []])
def test_traversal_rejects_bad_dims(model, digits_u8, dims):
    with pytest.raises(ValueError, match=r"outside \[0, 8\)|at least one"):
        traversal_grid(model, digits_u8[0], dims=dims)


def test_legend_labels_sorted_with_unlabelled_last():
    assert _legend_labels(np.array([3, -1, 0, 3, 10])) == ["0", "3", "10", "unlabelled"]
    assert _legend_labels(np.array([2, 1])) == ["1", "2"]
    assert _legend_labels(None) == ["unlabelled"]


def test_scatter_2d_is_600_square_rgb_with_a_legend():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(120, 2))
    labels = np.repeat([2, 0, 1, -1], 30)
    img = scatter_2d(points, labels, "test")
    assert img.size == (600, 600) and img.mode == "RGB"
    fig = _scatter_figure(points, labels, "test")
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2", "unlabelled"]
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
    plain = scatter_2d(points, None, "test")
    assert plain.size == (600, 600)
    assert not np.array_equal(np.asarray(img), np.asarray(plain))
    with pytest.raises(ValueError, match=r"\(120, 3\)"):
        scatter_2d(rng.normal(size=(120, 3)), None, "bad")


def test_latent_maps_on_encoded_digits(model, digits_u8):
    _, labels = load_digits_u8()
    with torch.no_grad():
        means = model.encode(model.prepare_eval(digits_u8[:500])).mean.numpy()
    maps = latent_maps(means, labels[:500], max_points=300)
    assert set(maps) == {"latent_pca", "latent_tsne"}
    for img in maps.values():
        assert img.size == (600, 600) and img.mode == "RGB"
    with pytest.raises(ValueError, match=r"\(500, 1\)"):
        latent_maps(means[:, :1], None)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        latent_maps(means[:2], None)


def test_latent_maps_subsample_is_deterministic_and_bounded(monkeypatch):
    import sklearn.manifold

    seen: list[int] = []
    real = sklearn.manifold.TSNE.fit_transform

    def spy(self, X, *args, **kwargs):
        seen.append(len(X))
        return real(self, X, *args, **kwargs)

    monkeypatch.setattr(sklearn.manifold.TSNE, "fit_transform", spy)
    means = np.random.default_rng(1).normal(size=(400, 4))
    a = latent_maps(means, None, max_points=60, seed=3)
    b = latent_maps(means, None, max_points=60, seed=3)
    assert seen == [60, 60]
    np.testing.assert_array_equal(np.asarray(a["latent_pca"]), np.asarray(b["latent_pca"]))
