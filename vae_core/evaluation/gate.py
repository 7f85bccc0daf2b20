"""The champion gate: does a challenger's score beat the champion's by enough to take its place?

Pure decision logic; where the numbers come from (`vae_core.evaluation.evaluate`) and how the alias moves
(`flows.tracking.registry`) live elsewhere. A decision carries both numbers and its reason, and turns into the
model-version tags that record it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

GateMetric = Literal["nll", "bits_per_dim", "neg_elbo", "frechet_samples", "frechet_reconstructions", "mse",
                     "psnr", "ssim", "knn_accuracy", "linear_probe_accuracy"]
HIGHER_IS_BETTER = frozenset({"psnr", "ssim", "knn_accuracy", "linear_probe_accuracy"})
FRECHET_METRICS = frozenset({"frechet_samples", "frechet_reconstructions"})


def refusal(metric: str, unreliable_features: str | None) -> str | None:
    """Why the gate cannot compare on `metric` (one line), or None: a Fréchet distance in features that
    `feature_net.unreliable_features` found unreliable would promote on noise."""
    if metric not in FRECHET_METRICS or unreliable_features is None:
        return None
    return (f"the champion gate refuses --metric {metric}: {unreliable_features}; choose another --metric "
            "(nll, ssim, knn_accuracy, ...) or --no-promote")


def metric_key(metric: GateMetric, k: int) -> str:
    """The metric's key in an evaluation's numbers: the IWAE ones carry K ("nll" -> "nll_k100")."""
    return f"{metric}_k{k}" if metric in ("nll", "bits_per_dim") else metric


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one challenger; values are in the metric's own units."""

    promote: bool
    reason: str
    metric: str  # the full key, e.g. "test/nll_k100"
    challenger: float
    challenger_version: int
    champion: float | None
    champion_version: int | None
    margin: float

    def with_warnings(self, warnings: Iterable[str]) -> Decision:
        """This decision with each warning (one sentence) appended to its reason: "...; warning: <text>"."""
        return dataclasses.replace(self, reason=self.reason + "".join(f"; warning: {w}" for w in warnings))

    def tags(self) -> dict[str, str]:
        """Model-version tags that record the decision (`gate.*`)."""
        return {
            "gate.decision": "promoted" if self.promote else "kept",
            "gate.reason": self.reason,
            "gate.metric": self.metric,
            "gate.margin": repr(self.margin),
            "gate.challenger": repr(self.challenger),
            "gate.champion": "none" if self.champion is None else repr(self.champion),
            "gate.champion_version": "none" if self.champion_version is None else str(self.champion_version),
        }


def decide(metric: str, challenger: float, challenger_version: int, champion: float | None,
           champion_version: int | None, margin: float = 0.0, higher_is_better: bool = False) -> Decision:
    """Promote when there is no champion, or when the challenger improves on it by at least `margin`
    (and by more than nothing: a tie keeps the champion). A non-finite challenger is never promoted."""
    if margin < 0:
        raise ValueError(f"margin must be at least 0, got {margin}")

    def verdict(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, challenger, challenger_version, champion, champion_version, margin)

    if not math.isfinite(challenger):
        return verdict(False, f"the challenger's {metric} is {challenger}, not a number to promote on")
    if champion_version == challenger_version:
        return verdict(False, f"version {challenger_version} is already the champion")
    if champion_version is None or champion is None:
        return verdict(True, "there is no champion yet")
    if not math.isfinite(champion):
        return verdict(True, f"the champion's (version {champion_version}) {metric} is {champion}, not a number")
    gain = (challenger - champion) if higher_is_better else (champion - challenger)
    direction = "higher" if higher_is_better else "lower"
    if gain > 0 and gain >= margin:
        return verdict(True, f"{metric} {challenger:.4f} is {gain:.4f} {direction} (better) than the champion's "
                             f"{champion:.4f} (version {champion_version}); margin {margin:g}")
    return verdict(False, f"{metric} {challenger:.4f} vs the champion's {champion:.4f} (version {champion_version}): "
                          f"a gain of {gain:.4f}, the gate needs more than 0 and at least {margin:g} ({direction} "
                          "is better)")
