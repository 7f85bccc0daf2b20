import json
import math

import pytest
import torch

from vae_core import ConvVAE, load_config
from vae_core.errors import NonFiniteLossError
from vae_core.model.weights import load_model, model_from_bytes, model_to_bytes, save_model
from vae_core.training.fit import make_optimizer
from vae_core.training.loop import TrainState, evaluate, iterate_batches, train_epoch, train_step


def _tiny(overrides=()):
    # the digits preset's warm-up counted in steps, as the loop functions called here on their own need it
    return load_config("digits", ["model.hidden_channels=[8,16]", "model.hidden_dim=32", "train.kl_warmup_steps=200",
                                  *overrides])


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 8, 8, 1), generator=g, dtype=torch.uint8)


def _run_steps(cfg, n_steps=5):
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model = ConvVAE(cfg.model)
    opt = make_optimizer(model, cfg.train)
    state = TrainState()
    batch = _images(32).permute(0, 3, 1, 2)
    return [train_step(model, opt, batch, state, cfg.train, gen)["loss"] for _ in range(n_steps)], model


@pytest.mark.parametrize("extra", [[], ["model.res_blocks=2"], ["model.top_latent_dim=4"]],
                         ids=["plain", "residual", "two-layer"])
def test_same_seed_same_loss_and_different_seed_differs(extra):
    cfg = _tiny(extra)
    a, _ = _run_steps(cfg)
    b, _ = _run_steps(cfg)
    c, _ = _run_steps(_tiny(["train.seed=1", *extra]))
    assert a == b
    assert a != c


def test_the_logged_loss_is_the_elbo_at_beta_one_and_the_objective_is_what_is_minimised():
    """`loss` compares with validation's -ELBO whatever β is; the β-weighted objective has its own name."""
    cfg = _tiny(["train.beta=0.25", "train.kl_warmup_steps=0"])
    model = ConvVAE(cfg.model)
    step = train_step(model, make_optimizer(model, cfg.train), _images(32).permute(0, 3, 1, 2), TrainState(),
                      cfg.train, torch.Generator().manual_seed(0))
    assert step["loss"] == pytest.approx(step["recon"] + step["kl"], rel=1e-5)
    assert step["objective"] == pytest.approx(step["recon"] + 0.25 * step["kl"], rel=1e-5)


@pytest.mark.parametrize("likelihood,extra", [("bernoulli", ""), ("gaussian", ""), ("logistic", ""),
                                              ("bernoulli", "model.res_blocks=1"),
                                              ("bernoulli", "model.top_latent_dim=4")])
def test_tiny_model_overfits_one_batch(likelihood, extra, digits_u8):
    cfg = _tiny([f"model.likelihood={likelihood}", "model.binarize=false", "train.lr=3e-3",
                 "train.kl_warmup_steps=0", "train.beta=0.1", *([extra] if extra else [])])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ConvVAE(cfg.model)
    opt, state = make_optimizer(model, cfg.train), TrainState()
    batch = digits_u8[:16]
    error_before = (model.reconstruct(batch) - batch / 255).abs().mean().item()
    losses = [train_step(model, opt, batch, state, cfg.train, gen)["loss"] for _ in range(400)]
    error_after = (model.eval().reconstruct(batch) - batch / 255).abs().mean().item()
    assert losses[-1] < losses[0]
    assert error_after < 0.1 < error_before, (error_before, error_after)


def test_nan_loss_stops_with_a_clear_error():
    cfg = _tiny()
    model = ConvVAE(cfg.model)
    with torch.no_grad():
        model.to_posterior.weight.fill_(float("nan"))
    opt = make_optimizer(model, cfg.train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"loss is nan \(gradient norm nan\) at step 0"):
        train_step(model, opt, _images(8).permute(0, 3, 1, 2), TrainState(), cfg.train)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_epoch_and_evaluation_report_metrics():
    cfg = _tiny()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ConvVAE(cfg.model)
    opt = make_optimizer(model, cfg.train)
    state = TrainState()
    data = _images(100)
    m = train_epoch(model, opt, iterate_batches(data, 32, generator=gen), state, cfg.train, generator=gen)
    assert state.epoch == 1 and state.step == 4 and m["images"] == 100 and m["images_per_s"] > 0
    ev = evaluate(model, iterate_batches(data, 50, shuffle=False), gen, iw_samples=10)
    assert ev["nll"] <= ev["loss"] + 1.0 and ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * 0.6931471805599453))


def test_batches_split_disjointly_across_ranks():
    data = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    seen = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(3)
        seen.append(torch.cat([b.flatten() for b in iterate_batches(data, 2, generator=gen, rank=rank, world_size=2)]))
    assert len(seen[0]) == len(seen[1]) == 5
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    # An odd split: validation (no drop_last) still scores every image once; training ranks stay equal.
    odd = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    parts = [torch.cat(list(iterate_batches(odd, 4, shuffle=False, rank=r, world_size=2))).flatten().tolist()
             for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(11))
    equal = [sum(len(b) for b in iterate_batches(odd, 1, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert equal == [5, 5]
    batch = next(iterate_batches(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), 4))
    assert batch.shape == (4, 3, 8, 8) and batch.is_contiguous(memory_format=torch.channels_last)


def test_weights_round_trip_safely(tmp_path):
    _, model = _run_steps(_tiny(), n_steps=2)
    model.eval()
    url = str(tmp_path / "m" / "model.safetensors")
    save_model(model, url, extra={"dataset_version": "abc"})
    loaded = load_model(url).eval()
    assert loaded.config == model.config
    x = _images(4).permute(0, 3, 1, 2)
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))
    # A safetensors file and nothing else: an 8-byte header length, a JSON header naming every tensor, then
    # exactly their raw bytes; no room for a pickle (torch.save writes a zip: "PK\x03\x04...", no such header).
    blob = (tmp_path / "m" / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert blob[8:9] == b"{" and 8 + n <= len(blob), blob[:16]
    header = json.loads(blob[8 : 8 + n])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors.keys() == model.state_dict().keys()
    assert 8 + n + max(v["data_offsets"][1] for v in tensors.values()) == len(blob)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="no model config"):
        from safetensors.torch import save

        model_from_bytes(save({"w": torch.zeros(1)}))
    assert model_to_bytes(model) == model_to_bytes(loaded)


# --- the step never waits for the device -----------------------------------------------------------------

class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts `.item()`, `float(t)`, `bool(t)`: the reads that make the host wait for a GPU, one by one."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _fit_and_data(overrides=()):
    from vae_core.training.fit import Fit, steps_per_epoch

    cfg = _tiny(["train.batch_size=16", *overrides])
    data = _images(160, seed=3)  # 10 steps
    return Fit.create(cfg, steps_per_epoch(len(data), 16)), data


def test_an_epoch_reads_the_device_once_per_log_every_steps_and_at_its_last(monkeypatch):
    import vae_core.training.loop as train_module

    fit, data = _fit_and_data(["train.log_every=4"])
    reads, logged = [], []
    real_read = train_module.read_scalars
    monkeypatch.setattr(train_module, "read_scalars", lambda ts: reads.append(len(ts)) or real_read(ts))
    with _ScalarReads() as scalar_reads:
        m = fit.train_epoch(iterate_batches(data, 16, generator=fit.order(1)),
                            on_step=lambda metrics, state: logged.append(state.step))
    assert scalar_reads.count == 0  # no .item(), float() or bool() of a tensor in any step
    # 10 steps: steps 4, 8 and the epoch's last (so a run shorter than log_every has per-step metrics too),
    # then the epoch's sums
    assert len(reads) == 4 and logged == [4, 8, 10]
    assert m["images"] == 160 and {"loss", "recon", "kl", "grad_norm", "beta", "lr"} <= set(m)


def test_epoch_metrics_equal_the_step_by_step_ones():
    batched, data = _fit_and_data(["train.log_every=1000"])
    m = batched.train_epoch(iterate_batches(data, 16, generator=batched.order(1)))
    alone, _ = _fit_and_data()
    noise = alone.noise(1)  # one generator for the epoch, as train_epoch draws from
    steps = []
    for x in iterate_batches(data, 16, generator=alone.order(1)):
        steps.append(train_step(alone.model, alone.optimizers["model"], x, alone.state, alone.schedule, noise,
                                alone.objective))
        alone.schedulers["model"].step()
    for key in ("loss", "objective", "recon", "kl", "grad_norm", "beta"):
        assert m[key] == pytest.approx(sum(s[key] for s in steps) / len(steps), rel=1e-5), key
    assert all(torch.equal(a, b) for a, b in zip(batched.model.state_dict().values(),
                                                 alone.model.state_dict().values()))


def test_a_nan_at_a_known_step_leaves_the_weights_as_before_it_and_names_it():
    fit, data = _fit_and_data(["train.log_every=4"])
    calls, before = {"n": 0}, {}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 6:  # the forward of step 5 (counting from 0)
            before.update(weights={k: v.clone() for k, v in fit.model.state_dict().items()},
                          moments={i: s["exp_avg"].clone() for i, s in fit.optimizers["model"].state_dict()["state"].items()})
            return output * float("nan")
        return output

    fit.model.decoder.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss: loss is nan .* at step 5 \(epoch 1\)"):
        fit.train_epoch(iterate_batches(data, 16, generator=fit.order(1)))
    assert calls["n"] == 8  # found at the read after step 8: steps 6 and 7 ran, and changed nothing either
    assert all(torch.equal(v, fit.model.state_dict()[k]) for k, v in before["weights"].items())
    state = fit.optimizers["model"].state_dict()["state"]
    assert all(torch.equal(m, state[i]["exp_avg"]) for i, m in before["moments"].items())
    assert all(int(s["step"]) == 5 for s in state.values())  # five updates landed, the skipped ones uncounted


@pytest.mark.parametrize("floor", [0.1, 0.0])
def test_cosine_schedule_runs_from_the_peak_to_its_floor(floor):
    from vae_core.training.fit import make_scheduler

    cfg = _tiny([f"train.lr_floor={floor}", "train.lr=1e-3"])
    opt = make_optimizer(ConvVAE(cfg.model), cfg.train)
    sched = make_scheduler(opt, cfg.train, steps_per_epoch=10, epochs=10)
    rates = []
    for _ in range(120):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(1e-3)
    assert rates[50] == pytest.approx(1e-3 * (floor + (1 - floor) / 2))
    assert rates[100] == rates[119] == pytest.approx(1e-3 * floor, abs=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("done, elapsed, expected", [
    (0, 0.0, 40),     # nothing measured yet: train.epochs
    (3, 30.0, 6),     # 10 s an epoch, 30 s of 60 left: three more
    (3, 35.0, 5),     # 25 s left: two whole epochs more, not a third that would overrun
    (3, 75.0, 3),     # over the budget already: end now
    (1, 0.5, 40),     # a fast run: still at most train.epochs
])
def test_a_time_budget_plans_the_epochs_that_fit(done, elapsed, expected):
    from vae_core.training.fit import planned_epochs

    assert planned_epochs(_tiny(["train.epochs=40", "train.time_budget_minutes=1"]).train, done, elapsed) == expected
    assert planned_epochs(_tiny(["train.epochs=40"]).train, done, elapsed) == 40  # no budget: the epochs


def test_a_budgeted_cosine_runs_down_over_the_planned_epochs_and_resumes_with_them(tmp_path):
    """Fit.plan moves the schedule's horizon; the checkpoint carries it and the time spent, so a resumed run
    continues the same cosine towards the same end."""
    from vae_core.training.fit import Fit

    cfg = _tiny(["train.epochs=100", "train.time_budget_minutes=1", "train.lr=1e-3", "train.lr_floor=0",
                 "train.kl_warmup_fraction=0.5"])
    data = _images(64)
    fit = Fit.create(cfg, steps_per_epoch=4)
    assert fit.plan() == 100
    assert fit.schedule.kl_warmup_steps == 200  # half of 100 epochs of 4 steps
    fit.train_epoch(iterate_batches(data, 16, generator=fit.order(1)))
    schedule = fit.schedulers["model"].lr_lambdas[0]
    assert schedule(fit.state.step) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 400)))
    fit.state.elapsed_s = 15.0  # as if the epoch had taken 15 s: four fit in a minute
    assert fit.plan() == 4
    assert fit.schedule.kl_warmup_steps == 8  # the KL warm-up, a fraction of the run, follows the plan too
    # Step 4 of 16 planned: a quarter of the way down the cosine.
    assert schedule(fit.state.step) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    fit.save(str(tmp_path), {})

    resumed = Fit.create(cfg, steps_per_epoch=4)
    resumed.restore(str(tmp_path))
    assert resumed.state.elapsed_s == 15.0 and resumed.state.epoch == 1
    assert resumed.schedulers["model"].lr_lambdas[0].epochs == 4
    assert resumed.plan() == 4 and resumed.schedule.kl_warmup_steps == 8
    for epoch in range(2, 5):
        resumed.train_epoch(iterate_batches(data, 16, generator=resumed.order(epoch)))
    assert resumed.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at the floor
