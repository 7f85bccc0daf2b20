"""The nightly's drift check: the dataset version it just ingested against the champion's training data, in the
champion's own terms (`vae_core.evaluation.drift`: outlier scores and latent means, both from embeddings the
champion wrote).

The reference is the champion's embeddings of the dataset version it was trained on, its held-out splits (val
and test: scored as unseen data is, so the training split's lower scores do not make new data look worse than
it is), or every split when it has none. The current side is the champion's embeddings of the new version,
every split. What it finds goes to `<reports_root>/<model>/<version>/drift/<dataset version>.{png,json,md}` and
to the champion's training run (artifacts `drift/<dataset version>/`), and the nightly's summary shows the table.
"""

from __future__ import annotations

import json

from flows.tracking.evaluation import png_bytes, publish
from flows.tracking.registry import PinnedModel
from vae_core.data import embeddings
from vae_core.evaluation.drift import Drift, compare
from vae_core.settings import embeddings_root

HELD_OUT = ["val", "test"]


def measure_drift(champion: PinnedModel, dataset: str, version: str, current: str) -> tuple[Drift | None, str]:
    """(the drift of `dataset@version`, whose champion embeddings are at `current`, or None, and a line saying
    what was compared or why nothing was)."""
    trained_on = champion.dataset_version
    if champion.dataset_name != dataset or trained_on is None:
        return None, f"no drift measured: v{champion.version} was not trained on a version of {dataset}"
    if trained_on == version:
        return None, f"no drift measured: the champion v{champion.version} was trained on {dataset}@{version}"
    reference = embeddings.default_dir(embeddings_root(), champion.name, champion.version, dataset, trained_on)
    try:
        ref = embeddings.read_embeddings(reference, HELD_OUT)
        if ref.num_rows == 0:
            ref = embeddings.read_embeddings(reference)
        drift = compare(ref, embeddings.read_embeddings(current))
    except ValueError as e:  # no embeddings of the training data, or none with scores
        return None, f"no drift measured against {dataset}@{trained_on}: {e}"
    verdict = "**drift**: " + "; ".join(drift.reasons) if drift.flagged else "no drift"
    return drift, f"against {dataset}@{trained_on} (the champion's training data), by v{champion.version}: {verdict}"


def write_drift(champion: PinnedModel, version: str, drift: Drift) -> dict[str, str]:
    """The picture, the numbers and the table under the champion's reports folder and in its training run's
    artifacts; returns {"png" | "json" | "md": URL}."""
    files = {f"{version}.png": png_bytes(drift.picture()), f"{version}.json": json.dumps(drift.summary(),
                                                                                         indent=2).encode(),
             f"{version}.md": drift.markdown().encode()}
    written = publish(champion, "drift", f"drift/{version}", files)
    return {name.rsplit(".", 1)[1]: url for name, url in written.items()}
