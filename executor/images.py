"""Image encoding for the node and metadata stripping for delivered SaveImage files.

Workflows carry client prompts and LoRA names; ComfyUI writes them into PNG text chunks.
Anything delivered to a public URL goes through here so it carries none of that unless
the operator asked for it (COURIER_KEEP_METADATA=1).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# name -> (Pillow format, content type, file extension)
FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("PNG", "image/png", "png"),
    "webp": ("WEBP", "image/webp", "webp"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
}
PNG_COMPRESS_LEVEL = 4  # SaveImage's own level: encoding costs what SaveImage costs
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt", b"eXIf"}


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def to_uint8_batch(images: Any) -> list[np.ndarray]:
    """ComfyUI IMAGE (a [B,H,W,C] float tensor in 0..1) to one uint8 array per image."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[None, ...]
    if array.ndim != 4:
        raise ValueError(f"expected an IMAGE batch [B,H,W,C], got shape {array.shape}")
    return [np.clip(255.0 * frame, 0, 255).astype(np.uint8) for frame in array]


def encode(
    pixels: np.ndarray, fmt: str, quality: int, text: dict[str, str] | None = None
) -> EncodedImage:
    """Encode one uint8 image; `text` (PNG only) is written only when asked for."""
    pil_format, content_type, extension = FORMATS[fmt]
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        info = None
        if text:
            info = PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
        image.save(buffer, pil_format, pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buffer, pil_format, quality=quality, optimize=False)
    else:
        image.save(buffer, pil_format, quality=quality, method=4)
    return EncodedImage(buffer.getvalue(), content_type, extension, image.width, image.height)


def strip_png_text(data: bytes) -> bytes:
    """Drop text/EXIF chunks from a PNG without re-encoding its pixels."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG")
        if kind not in _PNG_TEXT_CHUNKS:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out)


def sanitize_file(data: bytes, keep_metadata: bool) -> EncodedImage:
    """Prepare a file another node saved (SaveImage) for delivery."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        pil_format = (image.format or "PNG").upper()
        if keep_metadata:
            cleaned = data
        elif pil_format == "PNG":
            cleaned = strip_png_text(data)
        else:
            # Other formats carry metadata in many places; re-encoding drops them all.
            buffer = io.BytesIO()
            image.convert("RGB" if pil_format == "JPEG" else image.mode).save(
                buffer, pil_format, quality=95
            )
            cleaned = buffer.getvalue()
    for _, content_type, extension in FORMATS.values():
        if extension == pil_format.lower().replace("jpeg", "jpg"):
            return EncodedImage(cleaned, content_type, extension, width, height)
    return EncodedImage(
        cleaned,
        Image.MIME.get(pil_format, "application/octet-stream"),
        pil_format.lower(),
        width,
        height,
    )


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (for tests and audits)."""
    with Image.open(io.BytesIO(data)) as image:
        return dict(getattr(image, "text", {}) or {})
