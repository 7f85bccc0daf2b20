"""The sharpness measure (Laplacian variance relative to real images), on scikit-learn's real 8x8 digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from vae_core import load_config
from vae_core.data.sources.digits import load_digits_u8
from vae_core.evaluation.evaluate import EvalData, evaluate_model
from vae_core.evaluation.sharpness import SharpnessMeter, laplacian_variance
from vae_core.model.feature_net import FeatureNet, FrechetScorer
from vae_core.model.tv import import_torchvision
from vae_core.model.vae import ConvVAE


def blur(images_u8: torch.Tensor, sigma: float) -> torch.Tensor:
    import_torchvision()  # through vae_core's shim, where torchvision's compiled extension cannot load
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images_u8.float() / 255.0, [5, 5], [sigma, sigma])


@pytest.fixture(scope="module")
def meter(digits_u8) -> SharpnessMeter:
    m = SharpnessMeter()
    for batch in digits_u8.split(400):  # real images streamed in batches, like evaluate_model does
        m.add_real(batch)
    return m


def test_laplacian_variance_matches_scipy_on_grey_levels():
    rgb = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    got = laplacian_variance(rgb)
    assert got.shape == (4,) and got.dtype == torch.float32
    for image, value in zip(rgb.double().numpy(), got):
        response = scipy.ndimage.laplace(image.mean(axis=0))[1:-1, 1:-1]  # the valid part: no border
        assert float(value) == pytest.approx(response.var(), rel=1e-5)


def test_originals_score_one_and_blur_scores_lower_monotonically(meter, digits_u8):
    assert meter.relative(digits_u8.split(500)) == pytest.approx(1.0, rel=1e-9)
    scores = [meter.relative(blur(digits_u8, sigma).split(500)) for sigma in (0.5, 0.8, 1.2, 2.0)]
    assert 0 < scores[-1] < scores[-2] < scores[-3] < scores[0] < 1.0
    # Per image too, not only on average: blur removes edges from every digit.
    per_image = laplacian_variance(blur(digits_u8, 0.8)) < laplacian_variance(digits_u8)
    assert bool(per_image.all())


def test_uint8_and_float_inputs_agree(meter, digits_u8):
    floats = digits_u8.float() / 255.0
    torch.testing.assert_close(laplacian_variance(digits_u8), laplacian_variance(floats))
    assert meter.relative([floats]) == pytest.approx(meter.relative([digits_u8]), rel=1e-6)
    # Batching changes nothing: per-image values, and the mean over all images.
    assert meter.relative(digits_u8.split(7)) == pytest.approx(meter.relative([digits_u8]), rel=1e-9)


def test_degenerate_real_images_raise(digits_u8):
    flat = SharpnessMeter()
    flat.add_real(torch.full((5, 1, 8, 8), 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no edges"):
        flat.relative([digits_u8])
    with pytest.raises(ValueError, match="0 real"):
        SharpnessMeter().relative([digits_u8])
    with pytest.raises(ValueError, match=r"H, W >= 3"):
        laplacian_variance(torch.zeros(2, 1, 2, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_number_on_the_gpu(meter, digits_u8):
    on_gpu = SharpnessMeter()
    on_gpu.add_real(digits_u8.cuda())
    blurred = blur(digits_u8, 0.8)
    assert on_gpu.relative([blurred.cuda()]) == pytest.approx(meter.relative([blurred]), rel=1e-5)


def _untrained(**overrides) -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(load_config("digits", overrides).model).eval()


def test_evaluate_model_reports_sharpness_of_the_samples_the_frechet_distance_saw():
    images, labels = load_digits_u8()
    data = EvalData.from_arrays(images[1500:], labels[1500:])  # 297 digits: batches of 128, 128, 41
    model, seed, batch = _untrained(), 5, 128
    torch.manual_seed(0)
    scorer = FrechetScorer(FeatureNet((1, 8, 8), 10))
    scorer.add_real(torch.from_numpy(images[1500:]).permute(0, 3, 1, 2))

    metrics = evaluate_model(model, data, k=1, seed=seed, batch_size=batch, frechet=scorer).metrics
    for key in ("sharpness_reconstructions", "sharpness_samples"):
        # An untrained decoder draws near-flat grey: far blurrier than real digits.
        assert math.isfinite(metrics[key]) and 0 < metrics[key] < 1, (key, metrics[key])

    # The same prior draws as before sharpness existed, seen by both measures.
    generator = torch.Generator().manual_seed(seed)
    samples = [model.sample(min(batch, len(images) - 1500 - i), generator=generator)
               for i in range(0, len(images) - 1500, batch)]
    real = SharpnessMeter()
    real.add_real(torch.from_numpy(images[1500:]).permute(0, 3, 1, 2))
    assert metrics["frechet_samples"] == pytest.approx(scorer.distance(samples), rel=1e-6)
    assert metrics["sharpness_samples"] == pytest.approx(real.relative(samples), rel=1e-9)
    # Without a scorer, the same samples and the same number.
    alone = evaluate_model(model, data, k=1, seed=seed, batch_size=batch).metrics
    assert "frechet_samples" not in alone
    assert alone["sharpness_samples"] == pytest.approx(metrics["sharpness_samples"], rel=1e-9)
    assert alone["sharpness_reconstructions"] == pytest.approx(metrics["sharpness_reconstructions"], rel=1e-9)


def test_evaluate_model_reports_sharpness_for_an_autoencoder_and_notes_a_blank_split():
    images, labels = load_digits_u8()
    ae = _untrained(**{"model.kind": "ae", "train.beta": 0})
    metrics = evaluate_model(ae, EvalData.from_arrays(images[:64], labels[:64]), k=1).metrics
    for key in ("sharpness_reconstructions", "sharpness_samples"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics[key])
    blank = evaluate_model(ae, EvalData.from_arrays(np.zeros((16, 8, 8, 1), np.uint8), np.full(16, -1)), k=1)
    assert not any(key.startswith("sharpness") for key in blank.metrics)
    assert any("sharpness skipped" in note and "no edges" in note for note in blank.notes)
