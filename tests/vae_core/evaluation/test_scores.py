"""The scoring pass of an evaluation, each number against an independent computation on real digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae_core import load_config
from vae_core.data.sources.digits import load_digits_u8
from vae_core.evaluation.scores import devices_for, score_split, ssim_kernel
from vae_core.model.vae import ConvVAE
from vae_core.training.fit import Fit, steps_per_epoch
from vae_core.training.loop import iterate_batches

CONFIG = load_config("digits")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = load_digits_u8()
    return images  # uint8 (1797, 8, 8, 1)


def _train(digits: np.ndarray, overrides: dict) -> ConvVAE:
    cfg = load_config("digits", {"train.epochs": 4, **overrides})
    x = torch.from_numpy(digits[:1500])
    fit = Fit.create(cfg, steps_per_epoch(len(x), cfg.train.batch_size))
    for epoch in range(1, 5):
        fit.train_epoch(iterate_batches(x, cfg.train.batch_size, generator=fit.order(epoch)))
    return fit.model.eval()


@pytest.fixture(scope="module")
def trained(digits) -> ConvVAE:
    """A model with a real posterior (a few epochs on 1,500 digits), so IWAE has a gap to close."""
    return _train(digits, {})


def test_a_two_layer_model_scores_and_embeds_its_whole_latent_vector(digits):
    model = _train(digits, {"model.top_latent_dim": 4})
    test = digits[1500:1700]
    s = score_split(model, test, k=100, seed=3)
    assert s.mean.shape == s.logvar.shape == (200, 8 + 4) and s.kl_per_dim.shape == (12,)
    from vae_core.model.encode import encode_images

    np.testing.assert_allclose(s.mean, encode_images(model, test)[0], rtol=1e-5, atol=1e-5)
    summary = s.summary()
    assert summary["nll_k100"] < summary["neg_elbo"]
    assert summary["neg_elbo"] == pytest.approx(summary["recon_nll"] + summary["kl"], rel=1e-5)


def test_iwae_bound_is_above_the_elbo_and_rises_with_k(trained, digits):
    test = digits[1500:]
    nll = {k: score_split(trained, test, k=k, seed=3).summary()[f"nll_k{k}"] for k in (1, 10, 100)}
    neg_elbo = score_split(trained, test, k=1, seed=3).summary()["neg_elbo"]
    # K = 1 is the ELBO itself (another draw of it): within sampling noise of it.
    assert abs(nll[1] - neg_elbo) < 0.02 * neg_elbo
    assert nll[100] < nll[10] < nll[1]
    assert nll[100] < neg_elbo


def test_elbo_terms_and_latents_match_a_direct_computation(trained, digits):
    test = digits[1500:1600]
    s = score_split(trained, test, k=5, seed=1, batch_size=32)
    x = torch.from_numpy(test).permute(0, 3, 1, 2)
    with torch.no_grad():
        embedding = trained.encode(trained.prepare_eval(x))
        # The ELBO's posterior is of the binarised input, drawn from each batch's seeded generator.
        binary, _ = trained.likelihood.prepare(x[:32], generator=torch.Generator().manual_seed(1 * 1_000_003 + 0))
        posterior = trained.encode(binary)
    np.testing.assert_allclose(s.mean, embedding.mean.numpy(), rtol=1e-5, atol=1e-5)
    from vae_core.model.encode import encode_images

    np.testing.assert_allclose(s.mean, encode_images(trained, test)[0], rtol=1e-5, atol=1e-5)
    kl = posterior.kl_per_dim()
    np.testing.assert_allclose(s.kl[:32], kl.sum(-1).numpy(), rtol=1e-4, atol=1e-4)
    assert s.kl_per_dim.shape == (8,) and (s.kl_per_dim >= 0).all()
    np.testing.assert_allclose(s.kl_per_dim.sum(), s.kl.mean(), rtol=1e-4)
    summary = s.summary()
    assert summary["neg_elbo"] == pytest.approx(summary["recon_nll"] + summary["kl"], rel=1e-5)
    assert summary["bits_per_dim_k5"] == pytest.approx(summary["nll_k5"] / (64 * math.log(2)), rel=1e-6)


def test_reconstruction_mse_and_psnr_match_numpy(trained, digits):
    test = digits[1500:1564]
    s = score_split(trained, test, k=1)
    original = test.transpose(0, 3, 1, 2).astype(np.float64) / 255
    recon = trained.reconstruct(torch.from_numpy(test).permute(0, 3, 1, 2)).double().numpy()
    mse = ((recon - original) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(s.mse, mse, rtol=1e-4)
    np.testing.assert_allclose(s.psnr, 10 * np.log10(1 / mse), rtol=1e-4)
    np.testing.assert_array_equal(s.reconstructions, np.round(recon * 255).astype(np.uint8))


def test_psnr_and_ssim_on_known_images():
    """Constant images a (input) and b (a decoder that outputs b everywhere): PSNR = -10 log10((a-b)^2),
    and SSIM reduces to its luminance term (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2."""
    model = ConvVAE(CONFIG.model).eval()
    b = 0.25
    last = model.decoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(b / (1 - b)))  # Bernoulli mean = sigmoid(logit) = b
    a_u8 = 204
    a = a_u8 / 255
    images = np.full((4, 8, 8, 1), a_u8, np.uint8)
    s = score_split(model, images, k=1)
    np.testing.assert_allclose(s.psnr, -10 * math.log10((a - b) ** 2), rtol=1e-4)
    c1 = 0.01**2
    # SSIM's window is Gaussian-weighted in float32: the luminance term agrees to 1e-3.
    np.testing.assert_allclose(s.ssim, (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-3)
    assert ssim_kernel(8, 8) == 7 and ssim_kernel(28, 28) == 11 and ssim_kernel(64, 10) == 9


def test_same_seed_same_numbers_on_any_number_of_devices(trained, digits):
    test = digits[1500:1700]
    one = score_split(trained, test, k=8, seed=5, batch_size=50)
    two = score_split(trained, test, k=8, seed=5, batch_size=50, devices=[torch.device("cpu")] * 2)
    np.testing.assert_array_equal(one.iwae, two.iwae)
    np.testing.assert_array_equal(one.log_px, two.log_px)
    other = score_split(trained, test, k=8, seed=6, batch_size=50)
    assert not np.array_equal(one.iwae, other.iwae)


def test_bad_input_is_named_before_scoring(trained, digits):
    with pytest.raises(ValueError, match="split is empty"):
        score_split(trained, digits[:0], k=1)
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        score_split(trained, np.zeros((3, 28, 28, 1), np.uint8), k=1)
    with pytest.raises(ValueError, match="k=0"):
        score_split(trained, digits[:4], k=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for 2 CUDA devices, but this machine has 0"):
            devices_for(2)
    assert devices_for(0) == [torch.device("cpu")]
