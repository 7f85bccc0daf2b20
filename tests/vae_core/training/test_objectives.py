"""The objectives one training loop trains: the autoencoder, the KL/reconstruction ablation, and the
adversarial terms with their own optimizer (see vae_core.training.objectives)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_core import load_config
from vae_core.errors import ConfigError
from vae_core.model.config import list_objectives, list_presets
from vae_core.training.device_metrics import FiniteGuard
from vae_core.training.fit import DISCRIMINATOR, MODEL, Fit, steps_per_epoch
from vae_core.training.loop import TrainState, evaluate, iterate_batches, train_step
from vae_core.training.objectives import adaptive_weight

TINY = ["model.hidden_channels=[8,16]", "model.hidden_dim=32", "train.batch_size=64", "train.num_threads=1"]
GAN = ["objective.adversarial.weight=0.5", "objective.adversarial.feature_weight=1.0",
       "objective.adversarial.start_step=0", "objective.adversarial.channels=[8,16]"]


def _fit(overrides=(), objective=None, rows=512) -> Fit:
    cfg = load_config("digits", [*TINY, *overrides], objective)
    return Fit.create(cfg, steps_per_epoch(rows, cfg.train.batch_size))


def _nhwc(digits_u8: torch.Tensor, n: int = 512) -> torch.Tensor:
    return digits_u8[:n].permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("objective", list_objectives())
@pytest.mark.parametrize("preset", list_presets())
def test_every_objective_lays_over_every_preset(preset, objective):
    cfg = load_config(preset, objective=objective)
    assert cfg.name == f"{preset}+{objective}"
    assert cfg.model.kind == ("ae" if objective == "ae" else "vae")
    assert (cfg.objective.recon_weight == 0) == (objective == "kl-only")
    assert (cfg.train.beta == 0) == (objective in ("ae", "recon-only"))
    assert cfg.objective.adversarial.enabled == (objective == "vae-gan")
    assert (cfg.objective.perceptual.weight > 0) == (objective == "perceptual")


def test_objective_errors_name_the_problem():
    with pytest.raises(FileNotFoundError, match="shipped objectives: ae, elbo, kl-only, perceptual, recon-only"):
        load_config("digits", objective="gan")
    with pytest.raises(ConfigError, match="model.kind=ae has no KL term: set train.beta=0"):
        load_config("digits", ["model.kind=ae"])
    with pytest.raises(ConfigError, match="nothing to minimise"):
        load_config("digits", ["objective.recon_weight=0", "train.beta=0"])
    with pytest.raises(ConfigError, match="objective.adversarial.wieght: no such key; did you mean weight"):
        load_config("digits", ["objective.adversarial.wieght=1"])


def test_the_train_request_offers_the_shipped_objectives_and_a_new_one_is_its_file_alone(tmp_path, monkeypatch):
    """`--objective`'s help is derived from the objective presets as shipped, and a new objective is one YAML
    file: the list (and so the help of a process started with it) and `load_config` both find it."""
    import vae_core.model.config as config
    from vae_core.requests import TrainRequest

    description = TrainRequest.model_fields["objective"].description
    assert description.split(": ", 1)[1].split(" (")[0] == ", ".join(list_objectives())
    assert {"ae", "elbo", "vae-gan", "perceptual"} <= set(list_objectives())

    shipped = Path(str(config.CONFIG_DIR))
    (tmp_path / "objectives").mkdir()
    for p in [*shipped.glob("*.yaml"), *(shipped / "objectives").glob("*.yaml")]:
        (tmp_path / p.relative_to(shipped)).write_bytes(p.read_bytes())
    (tmp_path / "objectives" / "beta-4.yaml").write_text("train:\n  beta: 4.0\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    assert list_objectives() == sorted([*(p.stem for p in (shipped / "objectives").glob("*.yaml")), "beta-4"])
    assert load_config("digits", objective="beta-4").train.beta == 4.0


def test_the_autoencoder_has_a_point_posterior_and_no_kl(digits_u8):
    fit = _fit(objective="ae")
    x = fit.model.prepare_eval(digits_u8[:16])
    posterior = fit.model.encode(x)
    assert torch.equal(posterior.std, torch.zeros_like(posterior.mean))  # variance exactly 0
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(0)), posterior.mean)
    with pytest.raises(ValueError, match="no finite KL"):
        posterior.kl_per_dim()
    assert fit.model.to_posterior.out_features == fit.config.model.latent_dim  # no log-variance head

    step = train_step(fit.model, fit.optimizers[MODEL], digits_u8[:64], TrainState(), fit.schedule,
                      fit.noise(1), fit.objective)
    assert "kl" not in step and "elbo" not in step and "beta" not in step
    assert step["loss"] == pytest.approx(step["recon"], rel=1e-6)  # nothing but the reconstruction term
    val = evaluate(fit.model, [digits_u8[:64]], iw_samples=10)
    assert set(val) == {"loss", "recon", "images"}  # no KL, no IWAE bound: an AE has no likelihood


def test_kl_only_collapses_every_code_to_the_prior(digits_u8):
    fit = _fit(["train.lr=3e-3", "train.kl_warmup_steps=0"], objective="kl-only")
    images = _nhwc(digits_u8)
    for epoch in range(1, 11):
        m = fit.train_epoch(iterate_batches(images, 64, generator=fit.order(epoch)))
    assert m["kl"] < 0.05, m  # the posterior is the prior...
    posterior = fit.model.encode(fit.model.prepare_eval(digits_u8[:512]))
    assert posterior.mean.abs().max() < 0.1  # ...for every image: all codes alike
    assert posterior.logvar.abs().max() < 0.1
    # The reconstruction term was never minimised: the decoder still is what it was at the start.
    assert m["recon"] > 30


def test_the_discriminator_and_the_vae_never_update_each_other(digits_u8):
    fit = _fit(GAN)
    vae, disc, objective = fit.model, fit.modules[DISCRIMINATOR], fit.objective
    x_u8 = digits_u8[:32]
    x, target = vae.likelihood.prepare(x_u8, generator=fit.noise(1))
    params, posterior = vae(x, generator=fit.noise(1))
    terms = objective.vae_loss(vae, x_u8, params, posterior, vae.likelihood.log_prob(params, target), 1.0, 0.0,
                               step=0, generator=fit.noise(1))
    assert {"recon", "kl", "feature", "adversarial", "adaptive_weight", "loss", "objective"} <= set(terms)

    # Each term reaches the VAE; none reaches the discriminator.
    for name in ("recon", "feature", "adversarial"):
        vae.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        assert vae.last_layer.grad is not None and vae.last_layer.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in disc.parameters()), name
    vae.zero_grad(set_to_none=True)
    terms["kl"].backward(retain_graph=True)  # the KL is the encoder's alone
    assert vae.last_layer.grad is None and vae.to_posterior.weight.grad.abs().sum() > 0

    # The discriminator's step: its weights move, the VAE's weights and gradients do not.
    vae.zero_grad(set_to_none=True)
    terms["objective"].backward()
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}
    grads_before = [p.grad.clone() for p in vae.parameters()]
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    d = objective.discriminator_step(0, FiniteGuard(torch.device("cpu")))
    assert set(d) == {"disc_loss", "logits_real", "logits_fake"}
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in vae_before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, vae.parameters()))
    assert any(not torch.equal(v, disc.state_dict()[k]) for k, v in disc_before.items())


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)
    rec = 3.0 * w.sum()  # d/dw = 3 everywhere: norm 6
    adv = 0.5 * w.square().sum()  # d/dw = w: norm sqrt(0.25 + 1 + 4 + 0.0625)
    expected = 6.0 / (math.sqrt(5.3125) + 1e-4)
    assert adaptive_weight(rec, adv, w).item() == pytest.approx(expected, rel=1e-6)
    assert adaptive_weight(rec, adv, w, max_weight=1.0).item() == 1.0  # clamped
    assert not adaptive_weight(rec, adv, w).requires_grad  # a weight, not a path for gradients
    assert adaptive_weight(torch.zeros(()) * 0 + 1.0, adv, w).item() == 0.0  # rec independent of w: 0


def test_adversarial_terms_wait_for_their_start_step(digits_u8):
    fit = _fit([*GAN[:2], "objective.adversarial.start_step=3", "objective.adversarial.channels=[8,16]"])
    state = TrainState()
    steps = [train_step(fit.model, fit.optimizers[MODEL], digits_u8[:64], state, fit.schedule, fit.noise(1),
                        fit.objective) for _ in range(5)]
    assert ["adversarial" in s for s in steps] == [False, False, False, True, True]
    assert ["disc_loss" in s for s in steps] == [False, False, False, True, True]


def test_a_checkpoint_with_both_optimizers_resumes_to_the_same_state(digits_u8, tmp_path: Path):
    images = _nhwc(digits_u8, 256)

    def epoch(fit: Fit, e: int) -> dict[str, float]:
        return fit.train_epoch(iterate_batches(images, 64, generator=fit.order(e)))

    straight = _fit(GAN, rows=256)
    epoch(straight, 1)
    straight.save(str(tmp_path), {"epoch": 1.0})
    epoch(straight, 2)

    resumed = _fit(GAN, rows=256)
    resumed.restore(str(tmp_path))
    assert resumed.state.step == 4 and resumed.optimizers[DISCRIMINATOR].state  # Adam's moments came back
    epoch(resumed, 2)
    for name in (MODEL, DISCRIMINATOR):
        a, b = straight.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        sa, sb = straight.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa), name
    assert resumed.state == straight.state


def test_an_autoencoders_embeddings_carry_its_zero_variance(digits_u8):
    from vae_core.data.embeddings import build_table, latents
    from vae_core.model.encode import encode_images

    fit = _fit(objective="ae")
    mean, logvar = encode_images(fit.model, _nhwc(digits_u8, 8).numpy())
    assert np.isfinite(mean).all() and np.isneginf(logvar).all()
    scores = {"neg_elbo": np.full(8, np.nan), "recon_error": np.zeros(8)}  # an autoencoder has no ELBO
    table = build_table([f"i{k}" for k in range(8)], "test", np.arange(8), mean, logvar, "vae-d-ae", 1, "v1", **scores)
    assert np.isneginf(latents(table)[2]).all()
    logvar[0, 0] = 0.0  # one finite entry among -inf: a broken model, not a point mass
    with pytest.raises(ValueError, match="non-finite logvar for 8 row"):
        build_table([f"i{k}" for k in range(8)], "test", np.arange(8), mean, logvar, "vae-d-ae", 1, "v1", **scores)
