import math

import torch

from vae_core.model.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian, discretized_logistic_log_prob


def test_discretized_logistic_sums_to_one_over_256_values():
    values = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # every bin centre
    for mu, log_s in [(0.0, -3.0), (-0.98, -5.0), (0.7, -1.0), (1.3, -6.5), (0.2, 0.5)]:
        lp = discretized_logistic_log_prob(values, torch.full_like(values, mu), torch.full_like(values, log_s))
        assert torch.isfinite(lp).all()
        total = lp.double().exp().sum().item()
        assert abs(total - 1.0) < 2e-3, (mu, log_s, total)


def test_discretized_logistic_image_log_prob_is_sum_over_pixels():
    lik = DiscretizedLogistic(1)
    x_u8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    x, target = lik.prepare(x_u8)
    params = torch.zeros(2, 2, 4, 4)
    lp = lik.log_prob(params, target)
    per_px = discretized_logistic_log_prob(target, torch.zeros_like(target), torch.zeros_like(target))
    torch.testing.assert_close(lp, per_px.flatten(1).sum(1))
    assert (lp < 0).all()


def test_bernoulli_dynamic_binarisation_is_seeded_and_exact():
    lik = Bernoulli(1, binarize=True)
    x_u8 = torch.full((1000, 1, 2, 2), 64, dtype=torch.uint8)
    x1, t1 = lik.prepare(x_u8, torch.Generator().manual_seed(1))
    x2, _ = lik.prepare(x_u8, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and set(x1.unique().tolist()) <= {0.0, 1.0}
    assert abs(x1.mean().item() - 64 / 255) < 0.02
    logits = torch.zeros(1000, 1, 2, 2)  # p = 0.5 everywhere: log p = 4 * log 0.5
    torch.testing.assert_close(lik.log_prob(logits, t1), torch.full((1000,), 4 * math.log(0.5)))


def test_gaussian_is_a_bound_in_8bit_nats_with_learned_scale():
    lik = Gaussian(3)
    assert lik.log_scale.requires_grad and lik.log_scale.shape == (3,)
    x_u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x, target = lik.prepare(x_u8, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(target * 256).to(torch.uint8), x_u8)  # dequantised within its bin
    # With the mean at the target and a large scale, density <= 1 per unit of [0, 1]; so <= -D log 256.
    with torch.no_grad():
        lik.log_scale.fill_(0.0)
    assert (lik.log_prob(target, target) <= -48 * math.log(256) + 1e-3).all()
