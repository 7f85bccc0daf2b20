"""Pictures of what a VAE learned: interpolations, latent traversals and 2-D maps of the latent space.

Grids are tiled by `vae_core.model.pictures.grid` (torchvision's make_grid, 2-pixel padding); scatter plots are
drawn on a matplotlib `Figure` with the Agg canvas, so no global pyplot state changes. Every function
returns PIL images. Models are used as they are: call `model.eval()` first where batch norm or dropout
would otherwise make a picture depend on the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vae_core.model.pictures import grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vae_core.model.vae import ConvVAE

UNLABELLED = -1
_FIGSIZE_IN, _DPI = 6.0, 100  # 600 x 600 pixels
_UNLABELLED_GREY = "0.7"


def interpolation_grid(model: ConvVAE, pairs_u8: torch.Tensor, steps: int = 10) -> Image.Image:
    """One row per pair: the decoded straight line between the two posterior means.

    Args:
        pairs_u8: uint8 (P, 2, C, H, W), P >= 1 pairs of images.
        steps: images per row, >= 2; the first and last are the decoded endpoints.

    Returns:
        a grid of P rows x `steps` columns.
    """
    if pairs_u8.dim() != 5 or pairs_u8.shape[1] != 2 or pairs_u8.shape[0] < 1:
        raise ValueError(f"pairs must have shape (P, 2, C, H, W) with P >= 1, got {tuple(pairs_u8.shape)}")
    rows = [model.interpolate(pair[0], pair[1], steps).cpu() for pair in pairs_u8]
    return grid(torch.cat(rows), nrow=steps)


def _traversal_latents(z: torch.Tensor, dims: list[int], span: float, steps: int) -> torch.Tensor:
    """z (L,) -> (len(dims) * steps, L): row block i sweeps z[dims[i]] over linspace(-span, span, steps)
    while every other coordinate keeps its value in z."""
    values = torch.linspace(-span, span, steps, device=z.device, dtype=z.dtype)
    batch = z.repeat(len(dims) * steps, 1)
    for i, d in enumerate(dims):
        batch[i * steps : (i + 1) * steps, d] = values
    return batch


@torch.no_grad()
def traversal_grid(model: ConvVAE, base_u8: torch.Tensor, dims: list[int], span: float = 3.0,
                   steps: int = 9) -> Image.Image:
    """What each latent dimension does to one image.

    The image's posterior mean z is decoded with one coordinate swept over linspace(-span, span, steps);
    the values are absolute, on the prior's N(0, 1) scale, so rows of different dimensions compare.

    Args:
        base_u8: uint8 (C, H, W), one image.
        dims: latent dimensions to sweep, one row each, every one in [0, latent_dim).
        span: the sweep runs from -span to +span.
        steps: images per row, >= 2.

    Returns:
        a grid of len(dims) rows x `steps` columns.
    """
    if not dims:
        raise ValueError("dims must name at least one latent dimension, got []")
    bad = [d for d in dims if not 0 <= d < model.latent_dim]
    if bad:
        raise ValueError(f"latent dimensions {bad} are outside [0, {model.latent_dim})")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if base_u8.dim() != 3:
        raise ValueError(f"base image must have shape (C, H, W), got {tuple(base_u8.shape)}")
    device = next(model.parameters()).device
    z = model.encode(model.prepare_eval(base_u8.unsqueeze(0).to(device))).mode()[0]
    images = model.likelihood.mean(model.decode(_traversal_latents(z, list(dims), span, steps)))
    return grid(images.cpu(), nrow=steps)


def _classes(labels: np.ndarray | None) -> list[int]:
    """Each class index in `labels` once, sorted; -1 (unlabelled) and None have none."""
    if labels is None:
        return []
    return sorted(int(c) for c in np.unique(labels) if c != UNLABELLED)


def _class_name(c: int, names: list[str] | None) -> str:
    """Class c's name from the dataset's label names, or its index where it has none."""
    return names[c] if names is not None and 0 <= c < len(names) else str(c)


def _legend_labels(labels: np.ndarray | None, names: list[str] | None = None) -> list[str]:
    """Legend entries of a scatter plot: each class once, in index order, by its name in `names` (the
    dataset's label names) or by its index, then "unlabelled" if any label is -1 (or labels is None)."""
    unlabelled = labels is None or bool(np.any(np.asarray(labels) == UNLABELLED))
    return [_class_name(c, names) for c in _classes(labels)] + (["unlabelled"] if unlabelled else [])


def _class_colours(n: int) -> list[tuple[float, float, float, float]]:
    """n distinct colours: the tab10/tab20 palettes where they suffice, else evenly spaced hues.

    The palettes' greys become black and dark red, so no class looks like the grey unlabelled points.
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    if n <= 10:
        palette = [colormaps["tab10"](i) for i in range(10)]
        palette[7] = to_rgba("black")
    elif n <= 20:
        palette = [colormaps["tab20"](i) for i in range(20)]
        palette[14], palette[15] = to_rgba("black"), to_rgba("darkred")
    else:
        palette = [colormaps["hsv"](i / n) for i in range(n)]
    return palette[:n]


def _scatter_figure(points: np.ndarray, labels: np.ndarray | None, title: str,
                    names: list[str] | None = None) -> Figure:
    """A 6x6 inch figure of points (N, 2) coloured by label, with a legend of `_legend_labels(labels, names)`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_FIGSIZE_IN, _FIGSIZE_IN), dpi=_DPI)
    ax = fig.add_subplot()
    # Smaller markers as N grows keep dense clusters readable.
    size = float(np.clip(4000.0 / max(len(points), 1), 2.0, 30.0))
    labels_arr = np.full(len(points), UNLABELLED) if labels is None else np.asarray(labels)
    entries = _legend_labels(labels, names)
    classes = _classes(labels)
    unlabelled = len(entries) > len(classes)  # the one entry after the classes
    if unlabelled:
        # Drawn first so labelled points stay on top.
        mask = labels_arr == UNLABELLED
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=_UNLABELLED_GREY, alpha=0.6,
                   label="unlabelled", linewidths=0)
    for c, colour in zip(classes, _class_colours(len(classes))):
        mask = labels_arr == c
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colour, alpha=0.8, label=str(c), linewidths=0)
    # The legend in `entries` order, classes then "unlabelled", whichever order the scatters were drawn in.
    handles, keys = ax.get_legend_handles_labels()
    by_key = dict(zip(keys, handles))
    order = [str(c) for c in classes] + (["unlabelled"] if unlabelled else [])
    legend = ax.legend([by_key[k] for k in order], entries, fontsize="small", loc="best",
                       ncol=1 if len(entries) <= 12 else 2, title="label" if labels is not None else None)
    for handle in legend.legend_handles:
        handle.set_sizes([30.0])  # legible legend markers however small the plotted ones are
        handle.set_alpha(1.0)
    ax.set_title(title)
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    fig.tight_layout()
    return fig


def _to_image(fig: Figure) -> Image.Image:
    """Render a figure with the Agg canvas -> RGB PIL image of its exact pixel size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def scatter_2d(points: np.ndarray, labels: np.ndarray | None, title: str,
               label_names: list[str] | None = None) -> Image.Image:
    """Points (N, 2) coloured by int label (N,) with a legend naming each class by `label_names` (the dataset's,
    index c -> label_names[c]) or, without names, by its index; -1 or None is grey "unlabelled".

    Returns:
        a 600 x 600 RGB image.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {points.shape}")
    if labels is not None and np.shape(labels) != (len(points),):
        raise ValueError(f"labels must have shape ({len(points)},), got {np.shape(labels)}")
    return _to_image(_scatter_figure(points, labels, title, label_names))


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: all n rows, or max_points of them drawn without replacement."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def latent_maps(means: np.ndarray, labels: np.ndarray | None, max_points: int = 2000,
                seed: int = 0, label_names: list[str] | None = None) -> dict[str, Image.Image]:
    """2-D maps of latent means (N, L): {"latent_pca": PCA scatter, "latent_tsne": t-SNE scatter}.

    Both use the same rows: all N, or `max_points` drawn by `seed` (t-SNE's cost grows with N).
    Labels (N,) colour the points; -1 or None is unlabelled. The legends name classes by `label_names`
    (the dataset manifest's), or by index where the dataset has none.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 3 or means.shape[1] < 2:
        raise ValueError(f"latent maps need means of shape (N >= 3, L >= 2), got {means.shape}")
    if labels is not None and np.shape(labels) != (len(means),):
        raise ValueError(f"labels must have shape ({len(means)},), got {np.shape(labels)}")
    if max_points < 3:
        raise ValueError(f"max_points must be at least 3, got {max_points}")
    keep = _subsample(len(means), max_points, seed)
    z = means[keep]
    y = None if labels is None else np.asarray(labels)[keep]
    n = len(z)

    pca = PCA(n_components=2, random_state=seed)
    pca_xy = pca.fit_transform(z)
    r1, r2 = pca.explained_variance_ratio_
    pca_title = f"PCA of {n} latent means (explained variance {r1:.1%} + {r2:.1%})"

    # t-SNE needs perplexity < n; a third of the neighbours keeps small sets well conditioned.
    perplexity = min(30.0, (n - 1) / 3)
    tsne_xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
    tsne_title = f"t-SNE of {n} latent means (perplexity {perplexity:.3g})"
    return {"latent_pca": scatter_2d(pca_xy, y, pca_title, label_names),
            "latent_tsne": scatter_2d(tsne_xy, y, tsne_title, label_names)}
