"""Decoding image files to uint8 pixels and conforming pixels to one shape.

Shape policy (`ShapeSpec`):

- channels: 1 converts with ITU-R 601-2 luma (PIL's "L": L = R*299/1000 + G*587/1000 + B*114/1000);
  3 converts greyscale to RGB by repeating it. Alpha is dropped; palette images are expanded (a
  palette of greys counts as 1 channel); 16-bit greyscale is scaled to 8 bits (v/257, rounded).
- size (H, W): "crop" scales the image to cover H x W and cuts the centre out (nothing is padded,
  the edges of the longer side are lost); "pad" scales it to fit inside H x W and centres it on black
  (nothing is lost, bars are added). Both keep the aspect ratio and resample with Lanczos.
- None for either keeps the source's value; ingestion then requires it to be uniform.

Limits (`ShapeSpec.limits`): a file longer than max_file_bytes is not read past that; an image whose
header declares more than max_image_pixels is not decoded. Either is a DecodeError naming the limit.

Everything here runs in worker processes, so it imports only NumPy and PIL.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from vae_core.data.sources.base import LocalFile
from vae_core.data.sources.limits import SourceLimits

# Formats a folder or Parquet source may hold. PPM's plugin also reads PGM/PBM.
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "GIF", "WEBP")
_RESAMPLE = Image.Resampling.LANCZOS
# PIL's luma weights in 16-bit fixed point, so array sources convert exactly as PIL does.
_LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)


class ShapeSpec(NamedTuple):
    """Target shape; None keeps the source's."""

    size: tuple[int, int] | None = None  # (H, W)
    channels: Literal[1, 3] | None = None
    fit: Literal["crop", "pad"] = "crop"
    limits: SourceLimits = SourceLimits()


class DecodeError(ValueError):
    """One item cannot become an image; the message is the quarantine reason."""


def decode_image(data: bytes | LocalFile | None, spec: ShapeSpec) -> np.ndarray:
    """Encoded file bytes (or a local file) -> uint8 (H, W, C), C in {1, 3}, conformed to `spec`.

    Raises DecodeError, whose message is the quarantine reason.
    """
    if isinstance(data, LocalFile):
        data = _read_local(data, spec.limits)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if problem := spec.limits.file_problem(len(data)):
        raise DecodeError(problem)
    try:
        with _open_image(data) as im:
            if problem := spec.limits.pixels_problem(*im.size):  # from the header, before any pixel is decoded
                raise DecodeError(problem)
            if spec.size is not None and im.format == "JPEG":
                _jpeg_draft(im, spec)
            im.load()  # decode now: truncation and corruption surface here, not later
            im = _to_channels(im, spec.channels)
            if spec.size is not None and (im.height, im.width) != spec.size:
                im = _resize(im, spec.size, spec.fit)
            arr = np.asarray(im, dtype=np.uint8)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own cap, at twice Image.MAX_IMAGE_PIXELS
        raise DecodeError(f"image too large for PIL's decompression-bomb check: {e}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError(f"not an image (none of {', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        # PIL reports truncated/corrupt data with these; the text says what broke.
        raise DecodeError(f"corrupt image: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DecodeError(f"image has zero size {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _open_image(data: bytes) -> Image.Image:
    """PIL's lazy open (the header only). Its decompression-bomb warning is silenced: the pixel limit is
    checked right after, and PIL's own error (at twice its limit) still stands."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=FORMATS)


def _read_local(file: LocalFile, limits: SourceLimits) -> bytes:
    """A local file's bytes; one longer than the limit is never read whole (it may be a 2 GB sparse file)."""
    try:
        with open(file.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if problem := limits.file_problem(size):
                raise DecodeError(problem)
            # Its size and one byte more (a file that grew since is still caught by the limit check): asking
            # for the limit itself would allocate a buffer of that size for every file.
            data = fh.read(size + 1)
            return data + fh.read(limits.max_file_bytes + 1 - len(data)) if len(data) > size else data
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror or e}") from None


def decode_many(items: list[bytes | LocalFile | None], spec: ShapeSpec) -> list[np.ndarray | str]:
    """Decode a chunk (runs in a worker process): each item -> pixels, or the reason it failed."""
    out: list[np.ndarray | str] = []
    for data in items:
        try:
            out.append(decode_image(data, spec))
        except DecodeError as e:
            out.append(str(e))
    return out


def _jpeg_draft(im: Image.Image, spec: ShapeSpec) -> None:
    # JPEG can decode at 1/2, 1/4, 1/8 scale for almost nothing; ask for the smallest scale that still
    # covers (crop) or fills (pad) the target, so big photos never decode at full size.
    h, w = spec.size  # type: ignore[misc]
    scale = max(h / im.height, w / im.width) if spec.fit == "crop" else min(h / im.height, w / im.width)
    need = (max(1, int(np.ceil(im.width * scale))), max(1, int(np.ceil(im.height * scale))))
    im.draft("L" if spec.channels == 1 else im.mode, need)


def _to_channels(im: Image.Image, channels: int | None) -> Image.Image:
    """Any PIL mode -> "L" or "RGB"; `channels` None keeps the image's own channel count."""
    native = _native_mode(im)
    if native == "L16":
        im = Image.fromarray(_scale16(np.asarray(im)))
        native = "L"
    elif im.mode != native:
        im = im.convert(native)
    want = native if channels is None else ("L" if channels == 1 else "RGB")
    return im if im.mode == want else im.convert(want)


def _native_mode(im: Image.Image) -> str:
    mode = im.mode
    if mode in ("1", "L", "LA", "La"):
        return "L"
    if mode.startswith("I"):  # 16/32-bit integer greyscale (16-bit PNG, PGM, TIFF)
        return "L16"
    if mode == "F":
        raise DecodeError("floating-point pixels (mode F) have no defined 8-bit scale")
    if mode in ("P", "PA"):
        pal = np.asarray(im.convert("RGB"))
        return "L" if (pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all() else "RGB"
    return "RGB"  # RGB, RGBA, CMYK, YCbCr, LAB, HSV ...


def _scale16(a: np.ndarray) -> np.ndarray:
    """16-bit (or wider) greyscale -> uint8, v/257 rounded, so 65535 -> 255 and 257 -> 1."""
    a = a.astype(np.int64)
    if a.min(initial=0) < 0 or a.max(initial=0) > 65535:
        raise DecodeError(f"greyscale values outside 0..65535 (min {a.min()}, max {a.max()})")
    return ((a * 2 + 257) // 514).astype(np.uint8)


def _resize(im: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    h, w = size
    if fit == "crop":
        return ImageOps.fit(im, (w, h), method=_RESAMPLE, centering=(0.5, 0.5))
    return ImageOps.pad(im, (w, h), method=_RESAMPLE, color=0, centering=(0.5, 0.5))


def conform_pixels(images: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """uint8 (N, h, w, c) with c in {1, 3} -> uint8 (N, H, W, C) by `spec`, the same way files are.

    Channel conversion is vectorised; resizing (only when the size differs) goes image by image
    through PIL so array sources and files resize identically.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected uint8 (N,H,W,1|3), got {images.dtype} {images.shape}")
    if spec.channels is not None and images.shape[3] != spec.channels:
        images = to_grey(images) if spec.channels == 1 else np.repeat(images, 3, axis=3)
    if spec.size is not None and images.shape[1:3] != tuple(spec.size):
        out = np.empty((len(images), *spec.size, images.shape[3]), dtype=np.uint8)
        for i, img in enumerate(images):
            im = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
            out[i] = np.asarray(_resize(im, spec.size, spec.fit)).reshape(out.shape[1:])
        images = out
    return images


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> uint8 (..., 1) with PIL's exact fixed-point luma."""
    acc = rgb.astype(np.uint32) @ _LUMA
    return ((acc + 0x8000) >> 16).astype(np.uint8)[..., None]
