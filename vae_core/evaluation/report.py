"""One self-contained HTML page reporting an evaluation: facts, metrics, notes and pictures.

The page needs nothing but itself: styles are inline and pictures are PNGs embedded as data URIs, so it
can be attached to a run, mailed or opened offline. Every text is HTML-escaped. Each metric is shown with
its unit and which way is better (`METRICS`); each picture the evaluation draws with a caption saying
what it shows (`CAPTIONS`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re

from PIL import Image

from vae_core.evaluation.gate import HIGHER_IS_BETTER
from vae_core.model.pictures import ROW_NAMES, upscale

LOWER, HIGHER = "lower is better", "higher is better"


def _gate(metric: str) -> str:
    """Which way is better for a metric the champion gate can use: the gate's own rule, not a copy of it."""
    return HIGHER if metric in HIGHER_IS_BETTER else LOWER


#: metric name (without the "<split>/" group, the "_k<K>" of the IWAE ones or a "kl_dim_<i>" index) ->
#: (unit, which way is better); every number an evaluation reports has a row
METRICS: dict[str, tuple[str, str]] = {
    "neg_elbo": ("nats/image", _gate("neg_elbo")),
    "recon_nll": ("nats/image", LOWER),
    "kl": ("nats/image", "neither: the information the latent carries"),
    "elbo_bits_per_dim": ("bits/dim", LOWER),
    "nll": ("nats/image", _gate("nll")),
    "bits_per_dim": ("bits/dim", _gate("bits_per_dim")),
    "mse": ("per pixel, [0, 1] scale", _gate("mse")),
    "psnr": ("dB", _gate("psnr")),
    "ssim": ("index, 1 = identical", _gate("ssim")),
    "kl_dim": ("nats/image", "neither: near 0 means the dimension is unused"),
    "active_units": ("dimensions", HIGHER),
    "knn_accuracy": ("accuracy, 0-1", _gate("knn_accuracy")),
    "linear_probe_accuracy": ("accuracy, 0-1", _gate("linear_probe_accuracy")),
    "frechet_samples": ("squared feature distance", _gate("frechet_samples")),
    "frechet_reconstructions": ("squared feature distance", _gate("frechet_reconstructions")),
    "sharpness_reconstructions": ("ratio to the split's images", "closer to 1 is better"),
    "sharpness_samples": ("ratio to the split's images", "closer to 1 is better"),
    "classifier_accuracy": ("accuracy, 0-1", "higher: the Fréchet distances' features are more trustworthy"),
    "chance_accuracy": ("accuracy, 0-1", "neither: 1/classes, what the classifier's accuracy is read against"),
}

#: picture name -> what it shows, under the picture
CAPTIONS = {
    "reconstructions": f"rows alternate: each row of originals (\"{ROW_NAMES[0]}\") has its reconstructions "
                       f"(\"{ROW_NAMES[1]}\") in the row below it",
    "samples": "images decoded from latents drawn from the prior N(0, I)",
    "interpolations": "one row per pair of images: the decoded straight line between their latent means, "
                      "the pair at its ends",
    "traversals": "one row per latent dimension (the most active first): one image's latent mean with that "
                  "coordinate swept across the prior's range, the others kept",
    "latent_pca": "latent means projected on their first two principal components, coloured by class where "
                  "the dataset has labels",
    "latent_tsne": "a t-SNE embedding of the latent means, coloured by class where the dataset has labels",
}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
tr.group th { background: #eee; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }
figcaption { font-family: monospace; margin-top: 0.25em; }
figcaption span { font-family: system-ui, sans-serif; display: block; max-width: 40em; }
img { max-width: 100%; height: auto; image-rendering: pixelated; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_value(value: float) -> str:
    """A metric value with 4 significant digits ("0.9512", "1234", "1.235e+05", "nan")."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _group(name: str) -> str:
    """The part of a metric name before the first "/", or "" when it has none."""
    return name.split("/", 1)[0] if "/" in name else ""


def metric_unit(name: str) -> tuple[str, str]:
    """(unit, which way is better) of a metric name such as "test/nll_k100" or "kl_dim_03"; ("", "") for a
    name `METRICS` does not know."""
    base = re.sub(r"_k\d+$", "", name.rsplit("/", 1)[-1])
    base = re.sub(r"^kl_dim_\d+$", "kl_dim", base)
    return METRICS.get(base, ("", ""))


def _facts_table(facts: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts.items())
    return f'<table class="facts">{rows}</table>'


def _metrics_table(metrics: dict[str, float]) -> str:
    """Metrics grouped by name prefix, groups in order of first appearance, rows in given order.

    Names without a prefix come first, above every group heading, so none reads as part of a group.
    """
    groups: dict[str, list[str]] = {"": []}
    for name in metrics:
        groups.setdefault(_group(name), []).append(name)
    parts = ["<thead><tr><th>metric</th><th>value</th><th>unit</th><th>better</th></tr></thead><tbody>"]
    for group, names in groups.items():
        if group:
            parts.append(f'<tr class="group"><th colspan="4">{_esc(group)}</th></tr>')
        parts += [_metric_row(n, metrics[n]) for n in names]
    parts.append("</tbody>")
    return f'<table class="metrics">{"".join(parts)}</table>'


def _metric_row(name: str, value: float) -> str:
    unit, better = metric_unit(name)
    return (f'<tr><td>{_esc(name)}</td><td class="value">{_esc(format_value(value))}</td>'
            f"<td>{_esc(unit)}</td><td>{_esc(better)}</td></tr>")


def png_data_uri(image: Image.Image) -> str:
    """A PIL image as "data:image/png;base64,..." (modes PNG cannot hold are converted to RGB)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(name: str, image: Image.Image) -> str:
    """One <figure> captioned with its name and, for the pictures in `CAPTIONS`, what it shows; a small
    picture is embedded scaled up by `upscale`, as its saved PNG is."""
    image = upscale(image)
    caption = _esc(name) + (f"<span>{_esc(CAPTIONS[name])}</span>" if name in CAPTIONS else "")
    return (f'<figure><img src="{png_data_uri(image)}" alt="{_esc(name)}" width="{image.width}" '
            f'height="{image.height}"><figcaption>{caption}</figcaption></figure>')


def render_html(title: str, facts: dict[str, str], metrics: dict[str, float],
                pictures: dict[str, Image.Image], notes: list[str] | None = None) -> str:
    """The report page as one HTML string.

    Args:
        title: page title and heading.
        facts: what was evaluated (model, version, dataset, split, K, seed, ...), shown as given.
        metrics: name -> value; names "group/metric" are grouped under "group", each shown with its unit.
        pictures: name -> PIL image, each embedded as a PNG and captioned with its name (and `CAPTIONS`).
        notes: remarks shown as a list (skipped metrics, rows left out, ...).
    """
    body = [f"<h1>{_esc(title)}</h1>"]
    if facts:
        body.append(_facts_table(facts))
    body += ["<h2>Metrics</h2>", _metrics_table(metrics) if metrics else "<p>No metrics.</p>"]
    if notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in notes)
        body += ["<h2>Notes</h2>", f"<ul>{items}</ul>"]
    if pictures:
        body += ["<h2>Pictures</h2>", "".join(_figure(name, img) for name, img in pictures.items())]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
