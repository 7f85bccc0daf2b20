"""The training objectives side by side at an equal training budget: what each one buys and costs.

    .venv/bin/python bench/objectives.py [--minutes 5] [--variants ae,recon-only,kl-only,elbo,vae-gan,perceptual]
    .venv/bin/python bench/objectives.py --dataset mnist@3f2a --home ~/.vae --iw-samples 100 --eval-limit 2000
    .venv/bin/python bench/objectives.py --minutes 0.1 --eval-limit 300 --iw-samples 5 --out /tmp/objbench  # smoke

MNIST (from ../shared/data/mnist) is ingested into the bench's own VAE_HOME (a temporary folder, or --home)
unless --dataset names one already ingested (under --home, or else under the caller's data root).

1. Budget: each variant's images/s is probed in this process (`Fit.train_epoch` on 20 batches of the train
   split after a warm-up batch; VAE-GAN also with its discriminator on, since it only starts at
   objective.adversarial.start_step), and gets the epochs nearest to --minutes of training. Every variant is
   then trained through the real `train-vae` flow (Ray Train, MLflow, registration), its time measured.
2. `evaluate-vae` on the test split (first --eval-limit images, IWAE at K = --iw-samples, no champion gate).
3. Own measurements on the same images: latent continuity, the Fréchet distance to the real images of
   decoded midpoints between the posterior means of random pairs from different classes (beside the
   evaluation's prior samples), and the 2-D PCA of the latent means.
4. Writes `<out>/objectives-<dataset>.md` (tables, pictures, and each expected claim checked against the
   numbers: HOLDS or CONTRADICTED), `<out>/objectives-<dataset>.json` and the pictures under
   `<out>/objectives-<dataset>/`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO.parent / "shared" / "data" / "mnist"
VARIANTS = ("ae", "recon-only", "kl-only", "elbo", "vae-gan", "perceptual")
ABLATION = ("recon-only", "kl-only", "elbo", "ae")  # the latent-map figure and table 1
SHARP = ("elbo", "vae-gan", "perceptual")  # table 2
PROBE_BATCHES = 20
T0 = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {line}", flush=True)


# --- where things live --------------------------------------------------------------------------------


def setup_home(home_arg: str | None, dataset_arg: str | None) -> Path:
    """A VAE_HOME of the bench's own, so its runs and models never mix with a user's; a dataset named with
    --dataset but no --home is read from the caller's data root, resolved before VAE_HOME moves."""
    from vae_core import settings

    caller_root = settings.data_root() if dataset_arg and not home_arg else None
    home = Path(home_arg).expanduser().resolve() if home_arg else Path(tempfile.mkdtemp(prefix="vae-objectives-"))
    home.mkdir(parents=True, exist_ok=True)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "VAE_DATA_ROOT", "VAE_CHECKPOINT_ROOT",
                "VAE_FEATURE_NET_ROOT", "VAE_REPORTS_ROOT", "VAE_EMBEDDINGS_ROOT"):
        os.environ.pop(var, None)
    os.environ["VAE_HOME"] = str(home)
    if caller_root:
        os.environ["VAE_DATA_ROOT"] = caller_root
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keep the bench's own lines readable
    return home


def open_or_ingest(dataset_arg: str | None) -> Any:
    """The DatasetInfo to train on: MNIST ingested now, or the named one; a missing one exits 2."""
    from vae_core.data.shards import open_dataset
    from vae_core.names import parse_dataset_ref
    from vae_core.settings import data_root

    if dataset_arg is None:
        from vae_core.ingestion.ingest import run_ingest
        from vae_core.requests import IngestRequest

        result = run_ingest(IngestRequest(source=str(MNIST), name="mnist", data_root=data_root()))
        return open_dataset(data_root(), "mnist", result.version)
    try:
        return open_dataset(data_root(), *parse_dataset_ref(dataset_arg))
    except (FileNotFoundError, ValueError) as e:
        print(f"objectives: {e}", file=sys.stderr)
        sys.exit(2)


# --- 1. equal budget ----------------------------------------------------------------------------------


# Every variant has one stochastic layer, as the autoencoder has one code: the comparison is of
# objectives on the same encoder and decoder, whatever the preset's own depth.
SAME_NETWORKS = {"model.top_latent_dim": 0}


def variant_config(preset: str, variant: str, info: Any, overrides: dict[str, Any] | None = None) -> Any:
    """What train-vae builds for this variant: preset + objective + the dataset's image shape."""
    from vae_core.model.config import load_config

    h, w, c = info.shape
    return load_config(preset, {**SAME_NETWORKS, **(overrides or {})}, variant).with_image_shape(h, w, c)


def probe_rate(cfg: Any, train_x: torch.Tensor, perceptual_url: str | None) -> float:
    """Training images/s in this process over PROBE_BATCHES batches, after a warm-up batch (allocations)."""
    from vae_core.training.fit import Fit, steps_per_epoch
    from vae_core.training.loop import iterate_batches

    bs = cfg.train.batch_size
    fit = Fit.create(cfg, steps_per_epoch(len(train_x), bs), perceptual_weights=perceptual_url)
    batches = iterate_batches(train_x, bs, generator=fit.order(1))
    fit.train_epoch(itertools.islice(batches, 1))
    return fit.train_epoch(itertools.islice(batches, PROBE_BATCHES))["images_per_s"]


def epochs_for(budget_s: float, rows: int, rate: float, rate_after: float, switch_images: float) -> int:
    """Epochs whose predicted time is nearest the budget, at least 1; images past `switch_images` (an
    adversarial start step) train at `rate_after`. With one rate this is round(budget * rate / rows)."""
    def seconds(epochs: int) -> float:
        images = epochs * rows
        before = min(images, switch_images)
        return before / rate + (images - before) / rate_after

    epochs = 1
    while seconds(epochs) < budget_s:
        epochs += 1
    return epochs if epochs == 1 or seconds(epochs) - budget_s < budget_s - seconds(epochs - 1) else epochs - 1


def plan(variants: list[str], preset: str, info: Any, minutes: float, perceptual_url: str,
         rounds: int = 3) -> dict[str, dict]:
    """Probe every variant (and VAE-GAN with its discriminator on) in interleaved rounds and keep each one's
    best rate: on a shared machine other jobs only ever slow a probe down, and interleaving spreads a
    burst of them over all variants instead of one."""
    from vae_core.data.shards import read_split_u8

    train_x = torch.from_numpy(read_split_u8(info, "train")[0])
    rows = len(train_x)
    cfgs = {v: variant_config(preset, v, info) for v in variants}
    probes = {(v, False): cfgs[v] for v in variants}
    for v, cfg in cfgs.items():  # the probe never reaches a later start step: probe it started too
        if cfg.objective.adversarial.enabled and cfg.objective.adversarial.start_step > 0:
            probes[(v, True)] = variant_config(preset, v, info, {"objective.adversarial.start_step": 0})
    rates: dict[tuple[str, bool], float] = {}
    for _ in range(rounds):
        for key, cfg in probes.items():
            url = perceptual_url if cfg.objective.perceptual.weight > 0 else None
            rates[key] = max(rates.get(key, 0.0), probe_rate(cfg, train_x, url))
    out = {}
    for v, cfg in cfgs.items():
        adv, bs = cfg.objective.adversarial, cfg.train.batch_size
        rate, after = rates[(v, False)], rates.get((v, True), rates[(v, False)])
        switch = adv.start_step * bs if (v, True) in rates else float("inf")
        epochs = epochs_for(minutes * 60, rows, rate, after, switch)
        steps = epochs * -(-rows // bs)
        out[v] = {"images_per_s": rate, "images_per_s_adversarial": after if adv.enabled else None,
                  "epochs": epochs, "steps": steps, "adversarial_start_step": adv.start_step if adv.enabled else None}
        extra = f", {after:.0f} with the discriminator on (from step {adv.start_step})" if adv.enabled else ""
        never = " (the discriminator never starts!)" if adv.enabled and steps < adv.start_step else ""
        say(f"plan {v:11s} {rate:6.0f} images/s{extra} -> {epochs} epoch(s), {steps} steps{never}")
    return out


def train(dataset: str, preset: str, variant: str, epochs: int) -> dict[str, Any]:
    import mlflow

    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    t0 = time.perf_counter()
    out = train_vae(TrainRequest(dataset=dataset, preset=preset, objective=variant, epochs=epochs,
                                 overrides=SAME_NETWORKS,
                                 model_name=f"vae-{dataset.split('@')[0]}-{variant}", max_failures=0))
    wall = time.perf_counter() - t0
    # What the budget plans: the optimizer steps, from each epoch's images / images-per-s as the worker
    # reported them. The fit adds the worker group's start, validation, previews and checkpoints; the
    # wall time adds Ray's start and the model's registration.
    history = {key: {h.step: h.value for h in mlflow.MlflowClient().get_metric_history(out.run_id, key)}
               for key in ("epoch/images", "epoch/images_per_s")}
    steps_s = sum(n / history["epoch/images_per_s"][e] for e, n in history["epoch/images"].items())
    m = out.metrics
    return {"uri": f"models:/{out.model_name}/{out.model_version}", "run_id": out.run_id,
            "train_s": steps_s, "fit_s": m["startup/total_fit_s"] - m["startup/ray_s"], "wall_s": wall}


# --- 2./3. evaluation and own measurements ------------------------------------------------------------


def evaluate(uri: str, dataset: str, iw_samples: int, limit: int) -> dict[str, Any]:
    from flows.evaluate import evaluate_vae
    from vae_core.requests import EvaluateRequest

    out = evaluate_vae(EvaluateRequest(model=uri, dataset=dataset, split="test", iw_samples=iw_samples,
                                       promote=False, limit=limit))
    return {"metrics": {k.split("/", 1)[1]: v for k, v in out.metrics.items()}, "report": out.report,
            "notes": out.notes, "feature_classifier": out.feature_classifier.model_dump()}


@torch.no_grad()
def latent_means(model: Any, images_u8: np.ndarray, batch: int = 500) -> torch.Tensor:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2)
    return torch.cat([model.encode(model.prepare_eval(x[i : i + batch])).mean.cpu() for i in range(0, len(x), batch)])


def midpoint_pairs(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One random partner per image, from another class where labels exist: the path must cross the
    space between classes, where a latent space without a prior may have holes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    a, b = np.arange(n), rng.integers(0, n, n)
    clash = (b == a) | ((labels >= 0) & (labels[b] == labels[a]))
    for _ in range(100):  # resample the clashes; each round keeps ~(1 - 1/classes) of them fixed
        if not clash.any():
            break
        b[clash] = rng.integers(0, n, int(clash.sum()))
        clash = (b == a) | ((labels >= 0) & (labels[b] == labels[a]))
    return a[~clash], b[~clash]


@torch.no_grad()
def midpoint_fd(model: Any, means: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray], scorer: Any,
                batch: int = 500) -> float:
    device = next(model.parameters()).device
    z = ((means[pairs[0]] + means[pairs[1]]) / 2).to(device)
    return scorer.distance(model.likelihood.mean(model.decode(z[i : i + batch])) for i in range(0, len(z), batch))


def own_measurements(uri: str, images: np.ndarray, labels: np.ndarray, scorer: Any) -> dict[str, Any]:
    """Midpoint Fréchet distance and the 2-D PCA of the latent means, on the registered model's weights."""
    from sklearn.decomposition import PCA

    from flows.tracking import registry

    model = registry.load_pinned(registry.pin_model(uri)).eval()
    means = latent_means(model, images)
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(means.double().numpy())
    fd = midpoint_fd(model, means, midpoint_pairs(labels), scorer) if scorer is not None else None
    return {"fd_midpoints": fd, "pca_xy": xy,
            "pca_explained": [float(r) for r in pca.explained_variance_ratio_]}


def real_scorer(info: Any, images: np.ndarray) -> Any | None:
    """A Fréchet scorer on the dataset's cached classifier (the one evaluate-vae used), holding `images`;
    None on a dataset without labels."""
    from vae_core.data.shards import read_split_u8
    from vae_core.model.feature_net import FrechetScorer, load_or_train_feature_net

    try:
        net, _ = load_or_train_feature_net(info.name, info.version, read_split_u8(info, "train")[:2],
                                           lambda: read_split_u8(info, "test")[:2])
    except ValueError as e:  # no labels: no classifier, so no Fréchet distances (the evaluation skips them too)
        say(f"no feature classifier: {e}")
        return None
    scorer = FrechetScorer(net)
    real = torch.from_numpy(images).permute(0, 3, 1, 2)
    for i in range(0, len(real), 500):
        scorer.add_real(real[i : i + 500])
    say(f"feature classifier ready; {len(real)} real test images scored")
    return scorer


# --- 4. pictures --------------------------------------------------------------------------------------


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a bench machine
    import matplotlib.pyplot as plt

    return plt


def draw_pca(results: dict[str, dict], labels: np.ndarray, path: Path) -> bool:
    """One panel per variant of the ablation (and the autoencoder): the test latent means' first two PCs."""
    plt = pyplot()
    shown = [v for v in ABLATION if v in results]
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.4), squeeze=False)
    classes = sorted(int(c) for c in np.unique(labels) if c >= 0)
    for ax, variant in zip(axes[0], shown):
        xy, knn = results[variant]["pca_xy"], results[variant]["metrics"].get("knn_accuracy")
        for c in classes or [-1]:
            keep = labels == c
            ax.scatter(xy[keep, 0], xy[keep, 1], s=4, alpha=0.7, color=plt.cm.tab10(c % 10), label=str(c))
        ax.set_title(f"{variant}  (k-NN {knn:.3f})" if knn is not None else variant)
        ax.set(xlabel="PC 1", ylabel="PC 2")
    axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def copy_report_pictures(results: dict[str, dict], folder: Path) -> None:
    for variant, r in results.items():
        for name in ("samples", "interpolations", "reconstructions"):
            src = r["report"].get(name, "").removeprefix("file://")
            if src and Path(src).is_file():
                shutil.copyfile(src, folder / f"{name}-{variant}.png")


def draw_sharpness(results: dict[str, dict], folder: Path) -> bool:
    """Samples beside reconstructions, one row per variant of table 2, from the copied report pictures."""
    plt = pyplot()
    rows = [v for v in SHARP if v in results and all((folder / f"{kind}-{v}.png").is_file()
                                                     for kind in ("samples", "reconstructions"))]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 4.2 * len(rows)), squeeze=False)
    for (ax_s, ax_r), v in zip(axes, rows):
        for ax, kind in ((ax_s, "samples"), (ax_r, "reconstructions")):
            ax.imshow(plt.imread(folder / f"{kind}-{v}.png"), cmap="gray")
            ax.set_title(f"{v}: {kind}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "sharpness.png", dpi=110)
    plt.close(fig)
    return True


# --- 5. the report ------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def claims(results: dict[str, dict], chance: float) -> list[str]:
    """One sentence per expected claim, with its numbers and HOLDS / CONTRADICTED / NOT TESTED."""
    def g(v: str, key: str) -> float | None:
        return results[v]["metrics"].get(key) if v in results else None

    def line(claim: str, needs: list[float | None], holds: Any, detail: str) -> str:
        if any(x is None for x in needs):
            return f"- {claim}: NOT TESTED (a variant or number is missing)."
        return f"- {claim}: {detail}. **{'HOLDS' if holds() else 'CONTRADICTED'}**."

    fs, fm, fr = "frechet_samples", "fd_midpoints", "frechet_reconstructions"
    sr, ss = "sharpness_reconstructions", "sharpness_samples"
    # One claim per number, so that a story half borne out reads as such rather than as one verdict.
    out = [line("The autoencoder's prior samples are worse than the ELBO VAE's", [g("ae", fs), g("elbo", fs)],
                lambda: g("ae", fs) > g("elbo", fs), f"FD {fmt(g('ae', fs))} (ae) vs {fmt(g('elbo', fs))} (elbo)"),
           line("The autoencoder's interpolation midpoints are worse than the ELBO VAE's",
                [g("ae", fm), g("elbo", fm)], lambda: g("ae", fm) > g("elbo", fm),
                f"FD {fmt(g('ae', fm))} (ae) vs {fmt(g('elbo', fm))} (elbo)"),
           line("KL-only: every posterior is the prior (KL < 0.5 nats, no active unit)",
                [g("kl-only", "kl"), g("kl-only", "active_units")],
                lambda: g("kl-only", "kl") < 0.5 and g("kl-only", "active_units") == 0,
                f"KL {fmt(g('kl-only', 'kl'), 3)} nats, {fmt(g('kl-only', 'active_units'), 0)} active units"),
           line(f"KL-only: its codes say nothing of the class (k-NN accuracy within 0.1 of chance, {chance:.2f})",
                [g("kl-only", "knn_accuracy")], lambda: g("kl-only", "knn_accuracy") <= chance + 0.1,
                f"k-NN accuracy {fmt(g('kl-only', 'knn_accuracy'), 3)}, linear probe "
                f"{fmt(g('kl-only', 'linear_probe_accuracy'), 3)} (the codes differ by ~1e-3, but k-NN ignores scale)"),
           line("Recon-only: reconstructs at least as well as the ELBO VAE",
                [g("recon-only", "recon_nll"), g("elbo", "recon_nll")],
                lambda: g("recon-only", "recon_nll") <= g("elbo", "recon_nll"),
                f"recon NLL {fmt(g('recon-only', 'recon_nll'))} vs {fmt(g('elbo', 'recon_nll'))} (elbo)"),
           line("Recon-only: its prior samples are worse than the ELBO VAE's", [g("recon-only", fs), g("elbo", fs)],
                lambda: g("recon-only", fs) > g("elbo", fs),
                f"FD {fmt(g('recon-only', fs))} vs {fmt(g('elbo', fs))} (elbo)")]
    mids = {v: g(v, fm) for v in ABLATION if g(v, fm) is not None}
    best = min(mids, key=mids.get) if mids else None
    out.append(line("ELBO: the best or near-best latent continuity (midpoint FD within 10% of the best of "
                    + ", ".join(mids) + ")", [g("elbo", fm), best if len(mids) > 1 else None],
                    lambda: g("elbo", fm) <= 1.1 * mids[best],
                    f"midpoint FD {fmt(g('elbo', fm))} (elbo), best {fmt(mids.get(best))} ({best})"))
    for v in ("vae-gan", "perceptual"):
        note = ""
        if v in results and "elbo" in results and results[v]["epochs"] != results["elbo"]["epochs"]:
            note = f"; at the same time budget it trained {results[v]['epochs']} epochs to elbo's {results['elbo']['epochs']}"
        if v == "vae-gan" and v in results and results[v]["steps"] < (results[v]["adversarial_start_step"] or 0):
            note += (f"; its discriminator starts at step {results[v]['adversarial_start_step']} and this run took "
                     f"{results[v]['steps']} steps: it never trained against it")
        out.append(line(f"{v}: sharper than elbo (sharpness of reconstructions and samples closer to 1, the real "
                        "images')", [g(x, key) for x in (v, "elbo") for key in (sr, ss)],
                        lambda v=v: abs(g(v, sr) - 1) < abs(g("elbo", sr) - 1) and abs(g(v, ss) - 1) < abs(g("elbo", ss) - 1),
                        f"{fmt(g(v, sr), 3)} / {fmt(g(v, ss), 3)} vs {fmt(g('elbo', sr), 3)} / {fmt(g('elbo', ss), 3)} "
                        f"(elbo; reconstructions / samples){note}"))
        out.append(line(f"{v}: closer to the real images than elbo (lower FD of samples and of reconstructions)",
                        [g(x, key) for x in (v, "elbo") for key in (fs, fr)],
                        lambda v=v: g(v, fs) < g("elbo", fs) and g(v, fr) < g("elbo", fr),
                        f"FD {fmt(g(v, fs))} / {fmt(g(v, fr))} vs {fmt(g('elbo', fs))} / {fmt(g('elbo', fr))} "
                        "(elbo; samples / reconstructions)"))
    return out


def table(results: dict[str, dict], variants: tuple[str, ...], columns: dict[str, tuple[str, int]],
          budget_s: float) -> list[str]:
    """Markdown rows: epochs and time spent (against the budget) for every variant, then `columns`
    ({header: (metric, digits)}); a metric the variant lacks (an autoencoder's NLL) reads "n/a"."""
    head = ["epochs", "train s (x budget)", "fit s", *columns]
    rows = [f"| variant | {' | '.join(head)} |", "|---" + "|---:" * len(head) + "|"]
    for v in [v for v in variants if v in results]:
        r, m = results[v], results[v]["metrics"]
        cells = [str(r["epochs"]), f"{r['train_s']:.1f} ({r['train_s'] / budget_s:.2f}x)", f"{r['fit_s']:.1f}",
                 *(fmt(m.get(key), digits) for key, digits in columns.values())]
        rows.append(f"| {v} | {' | '.join(cells)} |")
    return rows


def markdown(facts: dict[str, Any], results: dict[str, dict], pictures: list[str], k: int, chance: float) -> str:
    name, budget_s = facts["dataset"].split("@")[0], facts["minutes per variant"] * 60
    ablation = {"KL": ("kl", 2), "recon NLL": ("recon_nll", 2), f"test NLL (K={k})": (f"nll_k{k}", 2),
                "FD prior samples": ("frechet_samples", 2), "FD midpoints": ("fd_midpoints", 2),
                "k-NN acc": ("knn_accuracy", 3), "linear probe": ("linear_probe_accuracy", 3),
                "active units": ("active_units", 0)}
    sharp = {"FD samples": ("frechet_samples", 2), "FD reconstructions": ("frechet_reconstructions", 2),
             "sharpness recon.": ("sharpness_reconstructions", 3), "sharpness samples": ("sharpness_samples", 3),
             f"NLL (K={k})": (f"nll_k{k}", 2), "-ELBO": ("neg_elbo", 2)}
    lines = [f"# Objectives on {facts['dataset']}", "", *[f"- {key}: {val}" for key, val in facts.items()], "",
             "## Ablation and the autoencoder", "", *table(results, ABLATION, ablation, budget_s), "",
             "## Sharpness", "", *table(results, SHARP, sharp, budget_s), "",
             f"Budget: {budget_s:.0f} s of optimizer steps per variant, in whole epochs. Train s: the steps' time as "
             "the `train-vae` worker measured it (x budget: how far off); fit s: the whole fit (worker start, "
             "validation, previews, checkpoints) without Ray's start. FD: Fréchet distance to the real test images "
             "in the dataset's feature classifier. Sharpness: Laplacian variance over the real images' (1.0 = as "
             "sharp as real).", "", "## What the numbers show", "", *claims(results, chance), "", "## Pictures", "",
             *[f"![{p}](objectives-{name}/{p})" for p in pictures]]
    return "\n".join(lines) + "\n"


def to_json(facts: dict[str, Any], results: dict[str, dict]) -> dict[str, Any]:
    return {"facts": facts, "variants": {v: {k: x for k, x in r.items() if k not in ("pca_xy", "report")}
                                         for v, r in results.items()}}


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help="NAME[@VERSION] already ingested (default: MNIST, ingested now)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--iw-samples", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=2000, help="test images scored and measured")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--home", help="VAE_HOME to use (default: a new temporary folder)")
    ap.add_argument("--render", metavar="JSON", help="write the report again from a run's JSON and pictures "
                    "(no training): after a change to the report itself")
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def train_all(variants: list[str], dataset: str, preset: str, budget: dict[str, dict], minutes: float) -> dict:
    results: dict[str, dict] = {}
    for v in variants:
        t = time.perf_counter()
        r = results[v] = {**budget[v], **train(dataset, preset, v, budget[v]["epochs"])}
        say(f"trained {v:11s} {r['epochs']} epoch(s): steps {r['train_s']:.1f}s (budget {minutes * 60:.0f}s), "
            f"fit {r['fit_s']:.1f}s, call {time.perf_counter() - t:.1f}s -> {r['uri']}")
    return results


def measure_all(results: dict[str, dict], dataset: str, k: int, test_x: np.ndarray, test_y: np.ndarray,
                scorer: Any) -> None:
    for v, r in results.items():
        t = time.perf_counter()
        r.update(evaluate(r["uri"], dataset, k, len(test_x)))
        own = own_measurements(r["uri"], test_x, test_y, scorer)
        m = r["metrics"]
        m["fd_midpoints"] = own.pop("fd_midpoints")
        r.update(own)
        say(f"evaluated {v:11s} in {time.perf_counter() - t:.1f}s: NLL {fmt(m.get(f'nll_k{k}'))} KL {fmt(m.get('kl'))} "
            f"FD samples {fmt(m.get('frechet_samples'))} midpoints {fmt(m['fd_midpoints'])} "
            f"k-NN {fmt(m.get('knn_accuracy'), 3)} sharpness {fmt(m.get('sharpness_reconstructions'), 3)}/"
            f"{fmt(m.get('sharpness_samples'), 3)}")


def draw_all(results: dict[str, dict], labels: np.ndarray, folder: Path) -> list[str]:
    """Every picture of the report, by file name under `folder`, in the order the report shows them."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_report_pictures(results, folder)
    pictures = ["latent_pca.png"] if draw_pca(results, labels, folder / "latent_pca.png") else []
    pictures += ["sharpness.png"] if draw_sharpness(results, folder) else []
    return pictures + [f"{kind}-{v}.png" for v in results for kind in ("samples", "interpolations")
                       if (folder / f"{kind}-{v}.png").is_file()]


def render(path: Path) -> int:
    """The Markdown report again from `objectives-<dataset>.json` and the pictures beside it."""
    saved = json.loads(path.read_text())
    facts, results = saved["facts"], saved["variants"]
    folder = path.with_suffix("")
    pictures = [p for p in ("latent_pca.png", "sharpness.png") if (folder / p).is_file()]
    pictures += [f"{kind}-{v}.png" for v in results for kind in ("samples", "interpolations")
                 if (folder / f"{kind}-{v}.png").is_file()]
    classes = facts.get("label classes", 0)
    path.with_suffix(".md").write_text(markdown(facts, results, pictures, facts["K (IWAE)"],
                                                1 / classes if classes else float("nan")))
    say(f"wrote {path.with_suffix('.md')} from {path}")
    return 0


def main() -> int:
    args = parse_args()
    if args.render:
        return render(Path(args.render))
    home = setup_home(args.home, args.dataset)
    from flows.tracking import runs as tracking
    from vae_core.data.shards import read_split_u8
    from vae_core.model.feature_net import feature_net_url

    tracking.configure()
    info = open_or_ingest(args.dataset)
    dataset = f"{info.name}@{info.version}"
    say(f"dataset {dataset}: {info.counts}; home {home}")
    test_x, test_y, _ = read_split_u8(info, "test")
    test_x, test_y = test_x[: args.eval_limit], test_y[: args.eval_limit]
    scorer = real_scorer(info, test_x)  # trains and caches the classifier the perceptual loss also uses
    budget = plan(args.variants, args.preset, info, args.minutes, feature_net_url(info.name, info.version))
    results = train_all(args.variants, dataset, args.preset, budget, args.minutes)
    measure_all(results, dataset, args.iw_samples, test_x, test_y, scorer)
    out = Path(args.out)
    pictures = draw_all(results, test_y, out / f"objectives-{info.name}")
    classes = int(test_y.max()) + 1 if (test_y >= 0).any() else 0
    facts = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                        "device cpu", "dataset": dataset, "train rows": info.counts.get("train", 0),
             "test images": len(test_x), "label classes": classes, "minutes per variant": args.minutes,
             "K (IWAE)": args.iw_samples,
             "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    report = out / f"objectives-{info.name}.md"
    report.write_text(markdown(facts, results, pictures, args.iw_samples, 1 / classes if classes else float("nan")))
    report.with_suffix(".json").write_text(json.dumps(to_json(facts, results), indent=1, default=float))
    say(f"wrote {report}, {report.with_suffix('.json')} and {len(pictures)} pictures")
    print(report.read_text().split("## What the numbers show", 1)[1].split("## Pictures")[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
