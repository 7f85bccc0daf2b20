import pytest
import torch

from vae_core import ConvVAE, ModelConfig, Posterior
from vae_core.errors import ConfigError
from vae_core.model.posterior import HierarchicalPosterior
from vae_core.model.vae import ResBlock


@pytest.mark.parametrize(
    "size,channels,widths",
    [((28, 28), 1, [32, 64]), ((32, 32), 3, [16, 32, 64]), ((64, 64), 3, [8, 16, 32, 64]),
     ((8, 8), 1, [8, 16]), ((48, 32), 1, [8, 16, 32]), ((28, 28), 3, [8, 16])],
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic"])
@pytest.mark.parametrize("arch", [{}, {"res_blocks": 2}, {"top_latent_dim": 3}], ids=["plain", "residual", "two-layer"])
def test_shapes_for_supported_sizes(size, channels, widths, likelihood, arch):
    cfg = ModelConfig(image_size=size, channels=channels, hidden_channels=widths, latent_dim=5,
                      likelihood=likelihood, norm="group", **arch)
    model = ConvVAE(cfg)
    x_u8 = torch.randint(0, 256, (3, channels, *size), dtype=torch.uint8)
    x, target = model.likelihood.prepare(x_u8)
    params, post = model(x)
    per_px = 2 if likelihood == "logistic" else 1
    latent = 5 + arch.get("top_latent_dim", 0)
    assert params.shape == (3, per_px * channels, *size)
    assert model.latent_dim == latent
    assert post.mean.shape == post.logvar.shape == post.kl_per_dim().shape == (3, latent)
    assert model.likelihood.log_prob(params, target).shape == (3,)
    assert model.sample(4).shape == (4, channels, *size)
    rec = model.reconstruct(x_u8)
    assert rec.shape == (3, channels, *size) and 0 <= rec.min() and rec.max() <= 1
    assert model.interpolate(x_u8[0], x_u8[1], steps=6).shape == (6, channels, *size)


def test_wrong_input_shape_is_a_clear_error():
    model = ConvVAE(ModelConfig())
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        model.encode(torch.zeros(2, 3, 28, 28))


def test_kl_matches_closed_form_and_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(4, 6), torch.randn(4, 6) * 0.5
    post = Posterior(mean, logvar)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    closed = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(post.kl(), closed, rtol=1e-5, atol=1e-5)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(post.kl(), mc, rtol=0.03, atol=0.03)
    torch.testing.assert_close(post.log_prob(z[:3]), q.log_prob(z[:3]).sum(-1))


def test_reparameterised_sample_carries_gradients_to_mean_and_logvar():
    mean = torch.zeros(3, 4, requires_grad=True)
    logvar = torch.zeros(3, 4, requires_grad=True)
    z = Posterior(mean, logvar).sample(torch.Generator().manual_seed(0))
    (z.square().sum()).backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_mode_is_mean_and_sample_is_seeded():
    post = Posterior(torch.randn(2, 3), torch.zeros(2, 3))
    assert torch.equal(post.mode(), post.mean)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)


def test_a_fresh_residual_model_computes_what_its_plain_stack_does():
    """Each residual block starts as the identity, so a deep model starts as the shallow one it wraps."""
    plain_cfg = ModelConfig(hidden_channels=[8, 16], latent_dim=4)
    torch.manual_seed(0)
    deep = ConvVAE(plain_cfg.model_copy(update={"res_blocks": 2}))
    plain = ConvVAE(plain_cfg)
    blocks = sum(isinstance(m, ResBlock) for m in deep.modules())
    assert blocks == 2 * 2 * 2  # two per stage, two stages, encoder and decoder
    plain_layers = [m for m in plain.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                                                  torch.nn.Linear))]
    deep_layers = [m for m in deep.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                                                torch.nn.Linear)) and not _in_block(deep, m)]
    for a, b in zip(plain_layers, deep_layers, strict=True):
        a.load_state_dict(b.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(deep.encode(x).mean, plain.encode(x).mean)
    z = torch.randn(3, 4)
    torch.testing.assert_close(deep.decode(z), plain.decode(z))


def _in_block(model, layer) -> bool:
    return any(layer is m for block in model.modules() if isinstance(block, ResBlock) for m in block.modules())


def _two_layer(seed: int = 0) -> ConvVAE:
    torch.manual_seed(seed)
    model = ConvVAE(ModelConfig(hidden_channels=[8, 16], latent_dim=4, top_latent_dim=2)).eval()
    with torch.no_grad():  # a prior p(z1|z2) that depends on z2, as a trained one does (it starts at N(0, I))
        for p in model.prior_net.parameters():
            p.normal_(0, 0.2)
    return model


def test_two_layer_kl_is_the_expected_log_ratio_of_posterior_and_prior():
    """The analytic per-draw KL, averaged over draws of z2, is E_q[log q(z|x) - log p(z)]: the two
    layers' closed forms agree with the densities `log_prob` and `prior_log_prob` give."""
    model = _two_layer()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        post = model.encode(x)
        assert isinstance(post, HierarchicalPosterior)
        gen = torch.Generator().manual_seed(0)
        kls = []
        for _ in range(20_000):
            post.sample(gen)
            kls.append(post.kl())
        analytic = torch.stack(kls).mean(0)
        z = post.sample_n(200_000, torch.Generator().manual_seed(1))
        mc = (post.log_prob(z) - model.prior_log_prob(z)).mean(0)
    torch.testing.assert_close(analytic, mc, rtol=0.03, atol=0.03)
    assert (analytic > 0.5).all()  # the layers disagree enough for the check to mean something


def test_two_layer_densities_match_torch_distributions():
    model = _two_layer()
    with torch.no_grad():
        post = model.encode(torch.rand(2, 1, 28, 28))
        z = torch.randn(5, 2, 6)
        z1, z2 = z[..., :4], z[..., 4:]
        q1 = post.bottom(z2)
        normal = torch.distributions.Normal
        expected_q = (normal(post.top.mean, post.top.std).log_prob(z2).sum(-1)
                      + normal(q1.mean, q1.std).log_prob(z1).sum(-1))
        p1 = model.conditional_prior(z2)
        expected_p = normal(0.0, 1.0).log_prob(z2).sum(-1) + normal(p1.mean, p1.std).log_prob(z1).sum(-1)
    torch.testing.assert_close(post.log_prob(z), expected_q)
    torch.testing.assert_close(model.prior_log_prob(z), expected_p)


def test_two_layer_prior_samples_are_ancestral_and_seeded():
    model = _two_layer()
    a = model.prior_sample(20_000, torch.Generator().manual_seed(3))
    b = model.prior_sample(20_000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (20_000, 6)
    # z1 given z2 is N(p(z1|z2)): its standardised residual is N(0, 1), while z1 itself is not.
    with torch.no_grad():
        p1 = model.conditional_prior(a[:, 4:])
    resid = (a[:, :4] - p1.mean) / p1.std
    assert resid.mean().abs() < 0.03 and (resid.std() - 1).abs() < 0.03
    assert (a[:, :4].std(0) - 1).abs().max() > 0.1


def test_two_layer_kl_needs_a_draw_and_mode_is_the_mean_path():
    model = _two_layer()
    with torch.no_grad():
        post = model.encode(torch.rand(2, 1, 28, 28))
        with pytest.raises(ValueError, match="call sample"):
            post.kl_per_dim()
        at_mean = post.bottom(post.top.mean)
    torch.testing.assert_close(post.mode(), torch.cat([at_mean.mean, post.top.mean], -1))


def test_an_autoencoder_has_no_second_stochastic_layer():
    with pytest.raises((ConfigError, ValueError), match="top_latent_dim=0"):
        ModelConfig(kind="ae", top_latent_dim=2)
