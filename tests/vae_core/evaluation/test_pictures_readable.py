"""Pictures a person can read as saved: small grids scaled up by a whole factor with sharp pixels, the rows of a
reconstruction grid labelled, and latent maps whose legends name the dataset's classes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vae_core import ConvVAE, load_config
from vae_core.evaluation.pictures import _scatter_figure, latent_maps
from vae_core.model.pictures import MIN_WIDTH, _tiles, grid, previews, reconstruction_grid, upscale


def test_small_grids_are_scaled_up_by_a_whole_factor_keeping_pixel_edges(digits_u8):
    images = digits_u8[:64].float() / 255
    raw = np.asarray(_tiles(images, 8, 2))
    assert raw.shape == (82, 82)  # 8x8 digits, 8 a row: too small to read as it is
    img = np.asarray(grid(images))
    assert img.shape == (328, 328) and img.shape[1] >= MIN_WIDTH  # 82 x 4: the smallest whole factor
    # Nearest neighbour: every source pixel is a 4x4 block of its own value, no blending at the edges.
    np.testing.assert_array_equal(img, np.kron(raw, np.ones((4, 4), dtype=raw.dtype)))
    wide = Image.new("RGB", (600, 600))
    assert upscale(wide) is wide


def test_reconstruction_rows_are_labelled_original_and_recon(digits_u8):
    originals, recons = digits_u8[:16].float() / 255, torch.zeros(16, 1, 8, 8)
    img = np.asarray(reconstruction_grid(originals, recons))
    plain = np.asarray(grid(torch.cat([originals[:8], recons[:8], originals[8:], recons[8:]])))
    strip = img.shape[1] - plain.shape[1]
    assert img.shape[0] == plain.shape[0] and 20 < strip < 80
    np.testing.assert_array_equal(img[:, strip:], plain)  # the grid itself, rows alternating
    scale = plain.shape[1] // 82  # 8 tiles of 8 px and padding 2, scaled up
    top, pitch = 2 * scale, 10 * scale
    labels = [img[top + r * pitch : top + (r + 1) * pitch, :strip] for r in range(4)]
    assert all((lab < 128).sum() > 20 for lab in labels)  # dark text at the left of every row
    np.testing.assert_array_equal(labels[0], labels[2])  # "original", "recon", "original", "recon"
    np.testing.assert_array_equal(labels[1], labels[3])
    assert not np.array_equal(labels[0], labels[1])


def test_training_previews_are_readable_as_saved(digits_u8):
    torch.manual_seed(0)
    model = ConvVAE(load_config("digits").model).eval()
    pictures = previews(model, digits_u8[:16], torch.Generator().manual_seed(0))
    assert set(pictures) == {"samples", "reconstructions", "interpolation"}
    assert all(p.width >= MIN_WIDTH for p in pictures.values())


def test_legends_name_classes_by_the_datasets_label_names():
    points = np.random.default_rng(0).normal(size=(40, 2))
    labels = np.repeat([2, 0, 1, -1], 10)

    def legend(names):
        return [t.get_text() for t in _scatter_figure(points, labels, "t", names).axes[0].get_legend().get_texts()]

    assert legend(["cat", "dog", "bird"]) == ["cat", "dog", "bird", "unlabelled"]
    assert legend(None) == ["0", "1", "2", "unlabelled"]  # indices only where the dataset has no names
    assert legend(["cat"]) == ["cat", "1", "2", "unlabelled"]  # a name list too short: the index


def test_latent_maps_pass_the_label_names_to_their_legends():
    rng = np.random.default_rng(1)
    means, labels = rng.normal(size=(12, 3)), np.arange(12) % 3
    named = latent_maps(means, labels, label_names=["cat", "dog", "bird"])
    plain = latent_maps(means, labels)
    for key in ("latent_pca", "latent_tsne"):
        assert not np.array_equal(np.asarray(named[key]), np.asarray(plain[key])), key


def test_an_evaluations_pictures_show_every_class_and_name_them(digits_u8):
    from vae_core.data.sources.digits import load_digits_u8
    from vae_core.evaluation.evaluate import EvalData, draw_pictures, evaluate_model

    _, labels = load_digits_u8()
    torch.manual_seed(0)
    model = ConvVAE(load_config("digits").model).eval()
    images = digits_u8[:100].permute(0, 2, 3, 1).numpy()
    evaluation = evaluate_model(model, EvalData.from_arrays(images, labels[:100]), k=1, batch_size=100)
    counts = np.bincount(evaluation.pictures["label"], minlength=10)
    assert counts.min() == 3 and counts.max() == 4  # 32 reconstructions, every class in turn
    names = [f"digit {i}" for i in range(10)]
    drawn = draw_pictures(model, evaluation, map_points=10, label_names=names)
    sample = evaluation.sample
    named = latent_maps(sample["mean"], sample["label"], max_points=10, label_names=names)["latent_pca"]
    np.testing.assert_array_equal(np.asarray(drawn["latent_pca"]), np.asarray(named))
