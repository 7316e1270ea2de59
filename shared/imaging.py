"""Image encoding with Pillow."""

from __future__ import annotations

import io

from PIL import Image

from shared.params import CONTENT_TYPES


def encode_image(image: Image.Image, output_format: str, quality: int) -> tuple[bytes, str]:
    """Encode an RGB image as webp, jpeg or png; return the bytes and their content type."""
    buffer = io.BytesIO()
    if output_format == "png":
        # PNG is lossless; quality maps to nothing, so the fastest sane compression is used.
        image.save(buffer, format="PNG", compress_level=6)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue(), CONTENT_TYPES[output_format]
