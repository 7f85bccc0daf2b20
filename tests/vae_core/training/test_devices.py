"""Every vae_core path on every device there is: the CPU always, CUDA when present (`-m gpu`).

These tests import torch and vae_core only (no Prefect, Ray or MLflow), so they run on a bare GPU
machine: `python -m pytest -m gpu tests/vae_core/training/test_devices.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_core import load_config
from vae_core.model.encode import encode_images
from vae_core.training.fit import Fit, steps_per_epoch
from vae_core.training.loop import iterate_batches

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA device")]),
]
BATCH = 64


def _config(epochs: int = 3):
    return load_config("digits", {"train.epochs": epochs, "train.batch_size": BATCH, "train.eval_iw_samples": 20})


def _fit(images_nhwc: torch.Tensor, device: str, epochs: int = 3) -> Fit:
    cfg = _config(epochs)
    return Fit.create(cfg, steps_per_epoch(len(images_nhwc), BATCH), device)


def _epoch(fit: Fit, images_nhwc: torch.Tensor) -> dict[str, float]:
    epoch = fit.state.epoch + 1
    return fit.train_epoch(iterate_batches(images_nhwc, BATCH, generator=fit.order(epoch)))


@pytest.fixture(scope="module")
def bars():
    """1,800 8x8 images of one bright bar (row or column, random place and brightness): data with
    structure to learn, made here so that a bare GPU machine (torch only) needs no dataset package."""
    g = torch.Generator().manual_seed(0)
    n = 1800
    images = torch.zeros(n, 8, 8, 1, dtype=torch.uint8)
    where, vertical = torch.randint(0, 8, (n,), generator=g), torch.rand(n, generator=g) < 0.5
    level = torch.randint(160, 256, (n,), generator=g, dtype=torch.uint8)
    for i in range(n):
        bar = images[i, :, where[i]] if vertical[i] else images[i, where[i]]
        bar.fill_(level[i])
    return images  # uint8 (N, 8, 8, 1), as shards hold them


@pytest.mark.parametrize("device", DEVICES)
def test_train_epochs_on_the_device_learn_and_repeat_exactly(bars, device):
    train = bars[:1024]
    fit = _fit(train, device)
    assert next(fit.model.parameters()).device.type == device
    assert fit.noise(1).device.type == device  # generators live on the device they feed
    losses = [_epoch(fit, train)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses
    again = _fit(train, device)
    assert _epoch(again, train)["loss"] == pytest.approx(losses[0], rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_and_iwae_bound_on_the_device(bars, device):
    fit = _fit(bars[:512], device)
    _epoch(fit, bars[:512])
    m = fit.evaluate(iterate_batches(bars[1500:], 100, shuffle=False))
    assert m["images"] == len(bars) - 1500
    # The importance-weighted bound is tighter than the ELBO: NLL <= -ELBO (up to sampling noise).
    assert 0 < m["nll"] <= m["loss"] + 0.5
    assert m["bits_per_dim"] == pytest.approx(m["nll"] / (64 * np.log(2)))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_reconstruct_interpolate_and_pictures(bars, device):
    fit = _fit(bars[:256], device)
    model = fit.model
    gen = lambda: torch.Generator(device=device).manual_seed(3)  # noqa: E731
    a, b = model.sample(5, generator=gen()), model.sample(5, generator=gen())
    assert a.shape == (5, 1, 8, 8) and a.device.type == device and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    x = bars[:4].permute(0, 3, 1, 2)  # CPU uint8: the model moves it to its device
    recon = model.reconstruct(x)
    assert recon.shape == (4, 1, 8, 8) and recon.device.type == device
    line = model.interpolate(x[0], x[1], steps=6)
    assert line.shape == (6, 1, 8, 8)
    # The ends of the line are the decoded posterior means, i.e. the reconstructions.
    torch.testing.assert_close(line[[0, -1]], recon[:2], atol=1e-5, rtol=1e-4)
    pictures = fit.previews(x)
    assert set(pictures) == {"samples", "reconstructions", "interpolation"}
    # 8 per row, 2 px padding, scaled up by the whole factor that makes them at least 256 px wide.
    assert pictures["samples"].size == (4 * (8 * 10 + 2), 4 * (8 * 10 + 2))
    assert pictures["interpolation"].size == (3 * (10 * 10 + 2), 3 * (10 + 2))


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_round_trip_resumes_exactly(bars, device, tmp_path):
    train = bars[:512]
    fit = _fit(train, device, epochs=3)
    _epoch(fit, train)
    fit.save(str(tmp_path), {"loss": 1.5})
    resumed = _fit(train, device, epochs=3)
    assert resumed.restore(str(tmp_path)) == {"loss": 1.5}
    assert (resumed.state.epoch, resumed.state.step) == (fit.state.epoch, fit.state.step) == (1, 8)
    for (k, v), w in zip(fit.model.state_dict().items(), resumed.model.state_dict().values()):
        assert w.device.type == device and torch.equal(v, w), k
    assert resumed.schedulers["model"].get_last_lr() == fit.schedulers["model"].get_last_lr()
    # Optimizer moments came back too: the next epoch is the same step for step.
    assert _epoch(resumed, train)["loss"] == pytest.approx(_epoch(fit, train)["loss"], rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_encoder_matches_the_model_in_any_batch_size(bars, device):
    fit = _fit(bars[:256], device)
    images = bars[:300].numpy()
    mean, logvar = encode_images(fit.model, images, batch_size=128)
    assert mean.shape == logvar.shape == (300, fit.model.latent_dim) and mean.dtype == np.float32
    one_batch, _ = encode_images(fit.model, images, batch_size=1000)
    np.testing.assert_allclose(mean, one_batch, atol=1e-5)
    with torch.no_grad():
        direct = fit.model.encode(fit.model.prepare_eval(torch.from_numpy(images[:10]).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(mean[:10], direct.mean.cpu().numpy(), atol=1e-5)
    if device == "cuda":  # bf16 on the GPU differs from fp32 by rounding only
        bf16, _ = encode_images(fit.model, images, batch_size=128, amp=True)
        np.testing.assert_allclose(bf16, mean, atol=0.05)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 8, 8, 1\)"):
        encode_images(fit.model, images[:, :4])


@pytest.mark.parametrize("device", DEVICES)
def test_bundle_holds_any_number_of_modules_optimizers_and_schedulers(bars, device, tmp_path):
    """A second network with its own optimizer (a discriminator) is one more entry, not a second trainer."""
    train = bars[:256]

    def with_critic(fit: Fit) -> Fit:
        torch.manual_seed(1)
        critic = torch.nn.Linear(64, 1).to(device)
        fit.modules["critic"] = critic
        fit.optimizers["critic"] = torch.optim.AdamW(critic.parameters(), lr=1e-2)
        fit.schedulers["critic"] = torch.optim.lr_scheduler.StepLR(fit.optimizers["critic"], step_size=1, gamma=0.5)
        return fit

    fit = with_critic(_fit(train, device))
    critic = fit.modules["critic"]
    critic(torch.randn(4, 64, device=device)).sum().backward()
    fit.optimizers["critic"].step()
    fit.schedulers["critic"].step()
    _epoch(fit, train)
    fit.save(str(tmp_path), {})
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "critic.safetensors"}

    resumed = with_critic(_fit(train, device))
    resumed.restore(str(tmp_path))
    torch.testing.assert_close(resumed.modules["critic"].weight, critic.weight, rtol=0, atol=0)
    assert resumed.schedulers["critic"].get_last_lr() == [5e-3]
    moments = resumed.optimizers["critic"].state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(moments, fit.optimizers["critic"].state_dict()["state"][0]["exp_avg"])
    assert moments.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_scoring_pass_on_the_device(bars, device):
    """`vae evaluate --gpus N` scores on the cards: the same pass, repeatable for a seed, latents equal to
    the CPU's, and the IWAE bound tighter than the ELBO."""
    from vae_core.evaluation.scores import score_split

    fit = _fit(bars, device, epochs=2)
    for _ in range(2):
        _epoch(fit, bars)
    test = bars[:300].numpy()
    a = score_split(fit.model, test, k=50, seed=1, batch_size=100, devices=[torch.device(device)])
    b = score_split(fit.model, test, k=50, seed=1, batch_size=100, devices=[torch.device(device)])
    np.testing.assert_array_equal(a.iwae, b.iwae)
    cpu_mean, _ = encode_images(fit.model.to("cpu"), test)
    np.testing.assert_allclose(a.mean, cpu_mean, rtol=1e-3, atol=1e-3)
    s = a.summary()
    assert s["nll_k50"] < s["neg_elbo"] and np.isfinite(a.ssim).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_epoch_with_its_data_on_the_gpu_synchronises_only_at_its_reads(monkeypatch):
    """CUDA's own sync detector: between the loop's reads (every log_every steps and at the end), no step
    makes the host wait for the GPU."""
    import warnings

    import vae_core.training.loop as train_module

    cfg = load_config("mnist", {"train.log_every": 5, "train.batch_size": BATCH})
    data = torch.randint(0, 256, (10 * BATCH, 28, 28, 1), dtype=torch.uint8, device="cuda")
    fit = Fit.create(cfg, steps_per_epoch(len(data), BATCH), "cuda")
    fit.train_epoch(iterate_batches(data, BATCH, generator=fit.order(0)))  # warm-up: allocations, autotuning
    reads = []
    real_read = train_module.read_scalars
    monkeypatch.setattr(train_module, "read_scalars", lambda ts: reads.append(1) or real_read(ts))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit.train_epoch(iterate_batches(data, BATCH, generator=fit.order(1)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(reads) == 3  # steps 5 and 10, and the epoch's end
    assert len(syncs) <= len(reads), [str(w.message) for w in syncs]
