import pytest
import torch

from vae_core import ConvVAE, load_config
from vae_core.model.config import TrainConfig
from vae_core.model.iwae import iwae_log_likelihood
from vae_core.errors import ConfigError
from vae_core.model.losses import beta_at, free_bits_kl, kl_shortfall, negative_elbo


def test_beta_schedules():
    lin = TrainConfig(beta=2.0, kl_schedule="linear", kl_warmup_steps=100)
    assert [beta_at(s, lin) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    cyc = TrainConfig(kl_schedule="cyclical", kl_cycle_steps=100, kl_cycle_ratio=0.5)
    assert [beta_at(s, cyc) for s in (0, 25, 50, 99, 100, 125)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    assert beta_at(0, TrainConfig(beta=0.3, kl_schedule="constant")) == 0.3


def test_a_warm_up_in_epochs_or_as_a_fraction_is_counted_in_steps_of_the_run():
    epochs = TrainConfig(beta=2.0, kl_warmup_epochs=2).for_run(steps_per_epoch=10, epochs=5)
    assert epochs.kl_warmup_steps == 20 and [beta_at(s, epochs) for s in (0, 10, 20, 49)] == [0.0, 1.0, 2.0, 2.0]
    share = TrainConfig(kl_warmup_fraction=0.25)
    assert share.for_run(10, 8).kl_warmup_steps == 20 and share.for_run(10, 40).kl_warmup_steps == 100
    assert TrainConfig(kl_warmup_steps=7).for_run(10, 8).kl_warmup_steps == 7  # steps stay steps
    with pytest.raises(ValueError, match="count it in steps first"):  # never read as "no warm-up"
        beta_at(5, share)


def test_one_warm_up_length_and_an_override_replaces_the_presets():
    with pytest.raises(ValueError, match="kl_warmup_steps and kl_warmup_epochs are both set"):
        TrainConfig(kl_warmup_steps=5, kl_warmup_epochs=1)
    preset = load_config("mnist").train
    assert preset.kl_warmup_fraction == 0.15 and preset.kl_warmup_steps == 0
    steps = load_config("mnist", ["train.kl_warmup_steps=50"]).train
    assert steps.kl_warmup_steps == 50 and steps.kl_warmup_fraction == 0
    with pytest.raises(ConfigError, match="kl_warmup_fraction=1.5"):
        load_config("mnist", ["train.kl_warmup_fraction=1.5"])


def test_a_run_that_ends_before_its_warm_up_does_is_named():
    """1,579 images in batches of 128 for 3 epochs (39 steps) against a warm-up of 2,000 steps: beta 0.0195."""
    short = kl_shortfall(TrainConfig(kl_warmup_steps=2000), steps_per_epoch=13, epochs=3)
    assert short.startswith("training ended with beta 0.0195, below its target 1 (its KL warm-up is 2,000 steps "
                            "and the run 39)"), short
    assert kl_shortfall(load_config("mnist").train, 13, 3) is None  # the preset's fraction: any size of data
    assert kl_shortfall(TrainConfig(kl_warmup_steps=39), 13, 3) is None
    assert "cyclical KL schedule stopped mid-ramp" in kl_shortfall(
        TrainConfig(kl_schedule="cyclical", kl_cycle_steps=100), 13, 3)  # 39 of a 50-step ramp
    assert kl_shortfall(TrainConfig(beta=0.0, kl_warmup_steps=2000), 13, 3) is None  # no KL term to weigh


def test_free_bits_only_penalises_dims_above_the_floor():
    kl = torch.tensor([[0.1, 2.0, 0.0], [0.3, 4.0, 0.0]])  # batch means: 0.2, 3.0, 0.0
    assert free_bits_kl(kl, 0.0).item() == pytest.approx(3.2)
    assert free_bits_kl(kl, 0.5).item() == pytest.approx(0.5 + 3.0 + 0.5)


def test_negative_elbo_terms():
    log_px = torch.tensor([-10.0, -20.0])
    kl = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = negative_elbo(log_px, kl, beta=0.5)
    assert t["recon"].item() == 15.0 and t["kl"].item() == 5.0
    assert t["loss"].item() == 15.0 + 0.5 * 5.0 and t["elbo"].item() == -20.0 and t["beta"] == 0.5


def _trained_tiny_model(digits_u8, extra=()):
    """A briefly trained model: its posterior is informative, so the bounds differ by more than noise."""
    from vae_core.training.fit import make_optimizer
    from vae_core.training.loop import TrainState, train_step

    cfg = load_config("digits", ["model.hidden_channels=[8,16]", "model.hidden_dim=32", "model.latent_dim=4",
                                 "train.kl_warmup_steps=0", "train.lr=3e-3", *extra])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ConvVAE(cfg.model)
    x_u8 = digits_u8[:32]
    opt, state = make_optimizer(model, cfg.train), TrainState()
    for _ in range(300):
        train_step(model, opt, x_u8, state, cfg.train, gen)
    x, target = model.likelihood.prepare(x_u8, torch.Generator().manual_seed(0))
    return model.eval(), x, target


@pytest.mark.parametrize("extra", [(), ("model.res_blocks=1",), ("model.top_latent_dim=4",)],
                         ids=["plain", "residual", "two-layer"])
def test_iwae_bound_is_above_elbo_and_grows_with_k(digits_u8, extra):
    model, x, target = _trained_tiny_model(digits_u8, extra)
    with torch.no_grad():
        post = model.encode(x)
        elbo = torch.stack([
            model.likelihood.log_prob(model.decode(post.sample()), target) - post.kl() for _ in range(400)
        ]).mean().item()
    # Average each bound over repeats so that the comparison is about the bound, not the draw.
    means = []
    for k in (1, 10, 100, 1000):
        reps = max(2, 2000 // k)
        est = [iwae_log_likelihood(model, x, target, k=k, chunk=64, generator=torch.Generator().manual_seed(r))
               for r in range(reps)]
        means.append(torch.stack(est).mean().item())
    assert means[0] == pytest.approx(elbo, abs=0.5)
    # Non-decreasing in K up to the estimates' noise (the bound saturates once K is large for a small model).
    assert all(b >= a - 0.01 for a, b in zip(means, means[1:])), means
    assert means[-1] > elbo + 0.1, (means, elbo)


def test_iwae_rejects_bad_arguments(digits_u8):
    model, x, target = _trained_tiny_model(digits_u8[:4])
    with pytest.raises(ValueError, match="k and chunk"):
        iwae_log_likelihood(model, x, target, k=0)
