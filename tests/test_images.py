import io

import numpy as np
import pytest
from PIL import Image

from comfy_courier.executor.images import (
    encode,
    png_text_chunks,
    sanitize_file,
    strip_png_text,
    to_uint8_batch,
)


def batch(n=2, h=12, w=10):
    return np.random.default_rng(0).random((n, h, w, 3), dtype=np.float32)


@pytest.mark.parametrize("fmt, content_type", [("png", "image/png"), ("webp", "image/webp"),
                                               ("jpeg", "image/jpeg")])
def test_encode_each_format(fmt, content_type):
    [frame, _] = to_uint8_batch(batch())
    image = encode(frame, fmt, 90)
    assert image.content_type == content_type and (image.width, image.height) == (10, 12)
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == (10, 12)


def test_png_has_no_text_unless_asked():
    [frame, _] = to_uint8_batch(batch())
    assert png_text_chunks(encode(frame, "png", 90).data) == {}
    assert png_text_chunks(encode(frame, "png", 90, {"prompt": "{}"}).data) == {"prompt": "{}"}


def test_strip_png_text_keeps_pixels():
    [frame, _] = to_uint8_batch(batch())
    tagged = encode(frame, "png", 90, {"prompt": "secret lora", "workflow": "{}"}).data
    clean = strip_png_text(tagged)
    assert png_text_chunks(clean) == {}
    assert b"secret lora" not in clean
    with Image.open(io.BytesIO(clean)) as a, Image.open(io.BytesIO(tagged)) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sanitize_file_jpeg_drops_exif():
    img = Image.new("RGB", (8, 8), "red")
    exif = Image.Exif()
    exif[0x010E] = "secret prompt"  # ImageDescription
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=exif)
    clean = sanitize_file(buffer.getvalue(), keep_metadata=False)
    assert clean.content_type == "image/jpeg" and b"secret prompt" not in clean.data


def test_to_uint8_batch_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        to_uint8_batch(np.zeros((2, 2)))
