"""What `nightly-retrain` decides, and how it says so: whether to train a model for the dataset version (or
evaluate one an earlier run trained), whether the champion's embeddings of it need an encode job, and the
one-line notes of the run's summary. The rules themselves are stated in `flows.nightly`'s docstring.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass

from flows.tracking import registry
from flows.tracking.registry import CHAMPION, PinnedModel
from vae_core.data import embeddings
from vae_core.errors import ModelNotFoundError
from vae_core.evaluation.gate import Decision
from vae_core.requests import EncodeRequest, NightlyRequest
from vae_core.settings import data_root, embeddings_root
from vae_core.storage import resolve


def champion_of(model_name: str) -> PinnedModel | None:
    """The version `@champion` names now, pinned; None when the model or the alias does not exist."""
    try:
        return registry.pin_model(registry.model_uri(model_name, CHAMPION))
    except ModelNotFoundError:
        return None


@dataclass(frozen=True)
class TrainPlan:
    """What to do about a model for the dataset version: train one, evaluate one already trained, or
    nothing; and why."""

    train: bool
    evaluate: int | None  # an already registered version the gate has not seen
    reason: str


def plan_training(request: NightlyRequest, model_name: str, champion: PinnedModel | None, dataset: str,
                  version: str, on_version: list[tuple[int, dict[str, str]]]) -> TrainPlan:
    """The train rule (`flows.nightly`'s docstring). `on_version`: (version, tags) of the model versions
    trained on this dataset version, newest first."""
    ref = f"{dataset}@{version}"
    if request.retrain == "always":
        return TrainPlan(True, None, "retrain='always'")
    if champion is not None and champion.dataset_version == version:
        return TrainPlan(False, None, f"champion v{champion.version} trained on this version ({ref}): no retraining")
    if on_version:
        newest, tags = on_version[0]
        if "gate.decision" not in tags:
            return TrainPlan(False, newest, f"v{newest} was trained on {ref} but not evaluated yet (an earlier run "
                                            "stopped): evaluating it instead of training another")
        verdict = "promoted it" if tags["gate.decision"] == "promoted" else "kept it out"
        return TrainPlan(False, None, f"v{newest} was already trained on {ref} and the gate {verdict} "
                                      f"({tags.get('gate.reason', 'no reason recorded')}): no retraining "
                                      "(retrain='always' trains another)")
    if champion is None:
        return TrainPlan(True, None, f"no champion of {model_name} yet")
    was = champion.dataset_version or "an unrecorded version"
    return TrainPlan(True, None, f"champion v{champion.version} was trained on {dataset}@{was}, not {ref}")


def embeddings_gap(champion: PinnedModel, dataset: str, version: str, counts: dict[str, int],
                   req: EncodeRequest) -> tuple[str, str | None]:
    """(output folder URL, what is missing there or None when the champion's embeddings of the dataset
    version are complete: a manifest of this model and dataset version, every requested split's rows, and
    every file it lists)."""
    out = req.out or embeddings.default_dir(embeddings_root(), champion.name, champion.version, dataset, version)
    what = f"embeddings of {dataset}@{version} by v{champion.version}"
    try:
        manifest = embeddings.read_manifest(out)
    except ValueError:
        return out, f"no {what} yet"
    if (manifest.model_name, manifest.model_version, manifest.dataset_version) != (champion.name, champion.version,
                                                                                   version):
        return out, f"{out} holds embeddings of {manifest.model_name} v{manifest.model_version} on " \
                    f"{manifest.dataset}@{manifest.dataset_version}, not the {what}"
    # Name and version alone can alias two models (a re-created registry numbers from 1 again): the
    # embeddings count only when they were written by these very weights.
    if manifest.identity != (identity := _identity(champion)):
        return out, f"{out} holds embeddings of {manifest.identity or 'a model whose weights were not recorded'}, " \
                    f"not of {identity}"
    if manifest.format != embeddings.FORMAT:  # written before the per-image scores: the drift check needs them
        return out, f"{what} are of format {manifest.format}, without the scores of format {embeddings.FORMAT}"
    short = [f"{s} {manifest.counts.get(s, 0):,} of {counts.get(s, 0):,} rows" for s in req.splits
             if manifest.counts.get(s, 0) != counts.get(s, 0)]
    if short:
        return out, f"{what} incomplete: {', '.join(short)}"
    fs, base = resolve(out)
    missing = [f.path for s in req.splits for f in manifest.splits.get(s, [])
               if not fs.exists(posixpath.join(base, f.path))]
    if missing:
        return out, f"{what} incomplete: {len(missing)} file(s) listed in the manifest are missing, first {missing[0]}"
    return out, None


def _identity(champion: PinnedModel) -> embeddings.ModelIdentity:
    """The champion exactly (name, version, weights digest), as encode-dataset keys its files."""
    from vae_core.model.weights import model_to_bytes

    return embeddings.ModelIdentity.of(champion.name, champion.version, model_to_bytes(registry.load_pinned(champion)))


def decision_note(version: int, decision: Decision | None) -> str:
    """'challenger v4 promoted: test/nll_k100 95.1 < 97.3 of champion v3', or the gate's reason where there is
    no pair of numbers to show (no champion yet, a non-finite score)."""
    if decision is None:
        return f"evaluated v{version}: no gate decision"
    verdict = "promoted" if decision.promote else "kept out"
    a, b = decision.challenger, decision.champion
    if b is None or decision.champion_version is None or not math.isfinite(a) or not math.isfinite(b):
        return f"challenger v{version} {verdict}: {decision.reason}"
    sign = "<" if a < b else ">" if a > b else "="
    margin = f" (margin {decision.margin:g})" if decision.margin else ""
    return f"challenger v{version} {verdict}: {decision.metric} {a:.4g} {sign} {b:.4g} of champion " \
           f"v{decision.champion_version}{margin}"


def encode_reasons(before: int | None, now: int, data_changed: bool, gap: str | None) -> list[str]:
    """Why the champion's embeddings of the dataset version need an encode job; empty: they do not."""
    reasons = []
    if before != now:
        reasons.append(f"champion changed ({f'v{before}' if before else 'none'} -> v{now})")
    if data_changed:
        reasons.append("dataset changed")
    if gap:
        reasons.append(gap)
    return reasons


def check_data_root(request: NightlyRequest) -> None:
    """Ingest writes where the other stages read (they read `data_root()`), or the run fails here."""
    given, used = request.ingest.root().rstrip("/"), data_root().rstrip("/")
    if "://" not in given + used:
        given, used = os.path.abspath(given), os.path.abspath(used)
    if given != used:
        raise ValueError(f"ingest.data_root {request.ingest.data_root!r} is not the data root the train, evaluate "
                         f"and encode stages read ({data_root()!r}, from VAE_DATA_ROOT or VAE_HOME): leave it unset "
                         "or set VAE_DATA_ROOT to it")
