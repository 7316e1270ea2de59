"""Image encoding with Pillow, with the generation record embedded as standard metadata.

PNG keeps the record in an iTXt/tEXt chunk named `kolors-farm`; JPEG and WebP in
the EXIF ImageDescription tag (JSON with non-ASCII escaped, as the tag is ASCII).
Either way it is the same JSON that the result route returns, so any image can
be reproduced from its own file.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from shared.jobs.params import CONTENT_TYPES

METADATA_KEY = "kolors-farm"
_EXIF_IMAGE_DESCRIPTION = 0x010E


def encode_image(
    image: Image.Image,
    output_format: str,
    quality: int,
    record: dict[str, Any] | None = None,
) -> tuple[bytes, str]:
    """Encode an RGB image as webp, jpeg or png with `record` embedded; bytes and content type."""
    buffer = io.BytesIO()
    text = json.dumps(record, ensure_ascii=True, sort_keys=True) if record is not None else None
    exif = Image.Exif()
    if text is not None:
        exif[_EXIF_IMAGE_DESCRIPTION] = text
    if output_format == "png":
        info = PngInfo()
        if text is not None:
            info.add_text(METADATA_KEY, text)
        # PNG is lossless; quality maps to nothing, so a middle compression level is used.
        image.save(buffer, format="PNG", compress_level=6, pnginfo=info)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, exif=exif)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, exif=exif)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue(), CONTENT_TYPES[output_format]


def read_generation_record(data: bytes) -> dict[str, Any] | None:
    """The generation record embedded in an encoded image, if any."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(METADATA_KEY) if image.format == "PNG" else None
        if text is None:
            text = image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
    if not text:
        return None
    record: dict[str, Any] = json.loads(text)
    return record
