"""Drift in a model's own terms: the outlier scores and latent means a model gives a new dataset version, against
those it gives the data it was trained on.

Both sides are embeddings tables written by the same model (`encode-dataset`: a `neg_elbo` per image, nats, and
the posterior `mean`, (L,)). A model scores data like its training data as it scores that data: about 1% of
new images then score above the reference's 99th percentile, and every latent dimension's mean stays where it
was. What moved, and by how much, is the drift:

    drift = compare(reference_table, current_table)
    drift.flagged, drift.reasons      # above SHARE_LIMIT or SHIFT_LIMIT, in words
    drift.markdown(); drift.picture() # a table, and the two score distributions with the per-dimension shift
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from vae_core.data.embeddings.format import matrix

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Share of the new images above the reference's 99th percentile that flags drift. Data like the reference puts
#: 1% there (sampling noise on a few thousand rows is a fraction of that); five times as many is a distribution
#: that moved, or a batch of images unlike any the model was trained on.
SHARE_LIMIT = 0.05
#: A latent dimension whose mean moved by more than this many of the reference's standard deviations (a
#: standardised mean difference of 0.5: "medium" in Cohen's terms) flags drift: the encoder places the new
#: data elsewhere in its code.
SHIFT_LIMIT = 0.5


@dataclass(frozen=True)
class Drift:
    """A current dataset version against a reference, as one model scores and encodes them."""

    reference_rows: int
    current_rows: int
    quantiles: dict[str, tuple[float, float]]  # "q50" -> (reference, current) neg_elbo, nats per image
    share_above_p99: float  # of the current rows, above the reference's 99th percentile
    shift: list[float]  # per latent dimension: (current mean - reference mean) / reference std
    reasons: list[str]  # why it is flagged; empty when it is not
    reference_scores: np.ndarray  # neg_elbo (N_ref,), for the picture
    current_scores: np.ndarray  # neg_elbo (N_cur,)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> dict[str, float | bool]:
        """The numbers, flat (for MLflow metrics and a JSON artifact)."""
        out: dict[str, float | bool] = {f"neg_elbo_{q}/{side}": v[i] for q, v in self.quantiles.items()
                                        for i, side in enumerate(("reference", "current"))}
        out.update(share_above_p99=self.share_above_p99, max_abs_shift=max(map(abs, self.shift), default=0.0),
                   reference_rows=self.reference_rows, current_rows=self.current_rows, flagged=self.flagged)
        return out

    def markdown(self) -> str:
        """A table of the score quantiles, the share above p99 and the largest latent shift, and the verdict."""
        rows = [f"| neg_elbo {q} (nats) | {ref:.2f} | {cur:.2f} |" for q, (ref, cur) in self.quantiles.items()]
        worst = int(np.argmax(np.abs(self.shift))) if self.shift else 0
        verdict = ("**drift**: " + "; ".join(self.reasons)) if self.flagged else \
            f"no drift (limits: {SHARE_LIMIT:.0%} above p99, a shift of {SHIFT_LIMIT} std)"
        return "\n".join([
            "| | reference | current |", "|---|---|---|",
            f"| rows | {self.reference_rows:,} | {self.current_rows:,} |", *rows,
            f"| above the reference's p99 | 1% | {self.share_above_p99:.1%} |",
            f"| largest latent mean shift (dim {worst}) | 0 | {self.shift[worst] if self.shift else 0:+.2f} std |",
            "", verdict, ""])

    def picture(self) -> Image.Image:
        """The two neg_elbo histograms (the reference's p99 marked) beside the per-dimension latent shift."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.6), dpi=100)
        scores, shifts = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        both = np.concatenate([self.reference_scores, self.current_scores])
        bins = np.histogram_bin_edges(both, bins=50)
        scores.hist(self.reference_scores, bins=bins, density=True, alpha=0.55, label="reference (training data)")
        scores.hist(self.current_scores, bins=bins, density=True, alpha=0.55, label="current")
        scores.axvline(self.quantiles["q99"][0], color="k", linestyle="--", linewidth=1, label="reference p99")
        scores.set(xlabel="neg_elbo, nats per image (higher: less like the training data)", ylabel="density",
                   title=f"outlier score: {self.share_above_p99:.1%} above the reference's p99")
        scores.legend(fontsize=8)
        dims = np.arange(len(self.shift))
        colors = ["tab:red" if abs(s) > SHIFT_LIMIT else "tab:gray" for s in self.shift]
        shifts.bar(dims, self.shift, color=colors)
        for limit in (SHIFT_LIMIT, -SHIFT_LIMIT):
            shifts.axhline(limit, color="tab:red", linestyle=":", linewidth=1)
        shifts.set(xlabel="latent dimension", ylabel="mean shift (reference std)", title="latent means")
        fig.tight_layout()
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _scores(table: pa.Table, side: str) -> np.ndarray:
    """The table's neg_elbo as float64 (N,), nulls (an autoencoder's rows) left out; ValueError when none is left."""
    if "neg_elbo" not in table.column_names:
        raise ValueError(f"the {side} embeddings have no neg_elbo column: encode them again with this version")
    scores = table.column("neg_elbo").drop_null().to_numpy().astype(np.float64)
    if scores.size == 0:
        raise ValueError(f"the {side} embeddings have no outlier scores (an autoencoder's have none)")
    return scores


def compare(reference: pa.Table, current: pa.Table) -> Drift:
    """`current`'s scores and latent means against `reference`'s (embeddings tables by one model).

    Raises:
        ValueError: a side without scores, or latents of different sizes.
    """
    ref, cur = _scores(reference, "reference"), _scores(current, "current")
    ref_mean, cur_mean = matrix(reference, "mean").astype(np.float64), matrix(current, "mean").astype(np.float64)
    if ref_mean.shape[1] != cur_mean.shape[1]:
        raise ValueError(f"latents of {ref_mean.shape[1]} and {cur_mean.shape[1]} dimensions: not one model's")
    q_ref, q_cur = np.quantile(ref, QUANTILES), np.quantile(cur, QUANTILES)
    quantiles = {f"q{round(q * 100):02d}": (float(a), float(b)) for q, a, b in zip(QUANTILES, q_ref, q_cur)}
    share = float(np.mean(cur > quantiles["q99"][0]))
    # A dimension the encoder does not use has no spread: its shift is measured against a floor, not 0.
    spread = np.maximum(ref_mean.std(axis=0), 1e-6)
    shift = ((cur_mean.mean(axis=0) - ref_mean.mean(axis=0)) / spread).tolist()
    reasons = []
    if share > SHARE_LIMIT:
        reasons.append(f"{share:.1%} of the images score above the training data's 99th percentile "
                       f"({quantiles['q99'][0]:.1f} nats; 1% expected, {SHARE_LIMIT:.0%} flags)")
    if moved := [(d, s) for d, s in enumerate(shift) if abs(s) > SHIFT_LIMIT]:
        shown = ", ".join(f"{d} ({s:+.2f})" for d, s in sorted(moved, key=lambda m: -abs(m[1]))[:5])
        reasons.append(f"{len(moved)} latent dimension(s) moved by more than {SHIFT_LIMIT} std: {shown}")
    return Drift(reference_rows=len(ref), current_rows=len(cur), quantiles=quantiles, share_above_p99=share,
                 shift=shift, reasons=reasons, reference_scores=ref, current_scores=cur)
