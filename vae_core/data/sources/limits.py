"""How much a source may make ingestion read or allocate, so that a hostile or broken input costs a bounded
amount of memory: bytes per file, pixels per image, bytes per decompressed archive.

A file or image over its limit is quarantined with a reason that names the limit; an archive (an .npz,
a gzipped IDX file, a Parquet row group) over its limit fails the source before it is inflated, and the
error names the limit and the option that raises it. Sizes are taken from what the input declares (a
listing's size, an image header, an .npy header) before anything is read or decoded.
"""

from __future__ import annotations

from typing import NamedTuple

MiB = 2**20
DEFAULT_MAX_FILE_MB = 256.0  # a larger image file is a scan or a mistake, not a training image
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # 64 megapixels: 192 MiB as RGB while it is decoded
DEFAULT_MAX_ARCHIVE_MB = 1024.0  # an .npz or IDX file is inflated whole into memory (MNIST: 55 MB)


class SourceLimits(NamedTuple):
    """The three caps, in bytes and pixels; the request's options are in MiB (`from_options`)."""

    max_file_bytes: int = int(DEFAULT_MAX_FILE_MB * MiB)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_archive_bytes: int = int(DEFAULT_MAX_ARCHIVE_MB * MiB)

    @classmethod
    def from_options(cls, max_file_mb: float, max_image_pixels: int, max_archive_mb: float) -> "SourceLimits":
        return cls(int(max_file_mb * MiB), max_image_pixels, int(max_archive_mb * MiB))

    def file_problem(self, size: int) -> str | None:
        """The quarantine reason for a file (or image bytes) of `size` bytes, or None when it is allowed."""
        if size <= self.max_file_bytes:
            return None
        return (f"file of {size:,} bytes is above max_file_mb={_mb(self.max_file_bytes)} "
                "(raise --max-file-mb to ingest it)")

    def pixels_problem(self, width: int, height: int) -> str | None:
        """The quarantine reason for an image whose header declares width x height, or None."""
        if width * height <= self.max_image_pixels:
            return None
        return (f"image of {width}x{height} = {width * height:,} pixels is above max_image_pixels="
                f"{self.max_image_pixels} (raise --max-image-pixels to ingest it)")

    def archive_problem(self, size: int, what: str) -> str | None:
        """The error for `what` (an array, a file, a row group) that inflates to `size` bytes (or more, when
        `size` is the limit plus one: inflating stopped there), or None."""
        if size <= self.max_archive_bytes:
            return None
        amount = "more than the limit" if size == self.max_archive_bytes + 1 else f"{size / MiB:.1f} MiB"
        return (f"{what} inflates to {amount}, above max_archive_mb={_mb(self.max_archive_bytes)}; "
                "raise --max-archive-mb (or the request's max_archive_mb) if the machine has the memory")


def _mb(size: int) -> str:
    return f"{size / MiB:g}"
