"""One self-contained HTML page reporting an evaluation: facts, metrics, notes and pictures.

The page needs nothing but itself: styles are inline and pictures are PNGs embedded as data URIs, so it
can be attached to a run, mailed or opened offline. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math

from PIL import Image

#: pictures narrower than this are scaled up by a whole factor, pixel edges kept sharp
MIN_DISPLAY_WIDTH = 256
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
tr.group th { background: #eee; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }
figcaption { font-family: monospace; margin-top: 0.25em; }
img { max-width: 100%; height: auto; }
img.pixelated { image-rendering: pixelated; }
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
    parts = ["<thead><tr><th>metric</th><th>value</th></tr></thead><tbody>"]
    for group, names in groups.items():
        if group:
            parts.append(f'<tr class="group"><th colspan="2">{_esc(group)}</th></tr>')
        parts += [f'<tr><td>{_esc(n)}</td><td class="value">{_esc(format_value(metrics[n]))}</td></tr>'
                  for n in names]
    parts.append("</tbody>")
    return f'<table class="metrics">{"".join(parts)}</table>'


def png_data_uri(image: Image.Image) -> str:
    """A PIL image as "data:image/png;base64,..." (modes PNG cannot hold are converted to RGB)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(name: str, image: Image.Image) -> str:
    """One captioned <figure>; a small picture is shown at a whole multiple of its size, at least
    MIN_DISPLAY_WIDTH wide, so that 8x8 digits are visible and every source pixel stays square."""
    width, height = image.size
    attrs = f'width="{width}" height="{height}"'
    if width < MIN_DISPLAY_WIDTH:
        scale = math.ceil(MIN_DISPLAY_WIDTH / max(width, 1))
        attrs = (f'class="pixelated" width="{width * scale}" height="{height * scale}" '
                 f'style="width: {width * scale}px; image-rendering: pixelated"')
    return (f'<figure><img src="{png_data_uri(image)}" alt="{_esc(name)}" {attrs}>'
            f"<figcaption>{_esc(name)}</figcaption></figure>")


def render_html(title: str, facts: dict[str, str], metrics: dict[str, float],
                pictures: dict[str, Image.Image], notes: list[str] | None = None) -> str:
    """The report page as one HTML string.

    Args:
        title: page title and heading.
        facts: what was evaluated (model, version, dataset, split, K, seed, ...), shown as given.
        metrics: name -> value; names "group/metric" are grouped under "group".
        pictures: name -> PIL image, each embedded as a PNG and captioned with its name.
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
