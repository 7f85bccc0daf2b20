import pytest
import torch

from vae_core import ConvVAE, ModelConfig, Posterior
from vae_core.model import ResBlock


@pytest.mark.parametrize(
    "size,channels,widths",
    [((28, 28), 1, [32, 64]), ((32, 32), 3, [16, 32, 64]), ((64, 64), 3, [8, 16, 32, 64]),
     ((8, 8), 1, [8, 16]), ((48, 32), 1, [8, 16, 32]), ((28, 28), 3, [8, 16])],
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic"])
@pytest.mark.parametrize("res_blocks", [0, 2])
def test_shapes_for_supported_sizes(size, channels, widths, likelihood, res_blocks):
    cfg = ModelConfig(image_size=size, channels=channels, hidden_channels=widths, latent_dim=5,
                      likelihood=likelihood, norm="group", res_blocks=res_blocks)
    model = ConvVAE(cfg)
    x_u8 = torch.randint(0, 256, (3, channels, *size), dtype=torch.uint8)
    x, target = model.likelihood.prepare(x_u8)
    params, post = model(x)
    per_px = 2 if likelihood == "logistic" else 1
    assert params.shape == (3, per_px * channels, *size)
    assert post.mean.shape == post.logvar.shape == (3, 5)
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
