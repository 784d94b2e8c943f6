"""Latent preview images, scaled and encoded for binary WebSocket frames (runs on the worker thread)."""

from __future__ import annotations

import logging
import traceback

log = logging.getLogger(__name__)


def encode_preview(preview, max_size: int):
    """(format, PIL image, max size) -> (mime type, bytes), scaled to fit; None when it cannot be encoded.

    A max size of None keeps the image's own size (ComfyUI's SaveImageWebsocket and ignore_size_limit)."""
    try:
        fmt, image, size = preview
        import io

        from PIL import Image

        limit = None if size is None else min(size or max_size, max_size)
        if limit is not None and max(image.size) > limit:
            image = image.copy()
            image.thumbnail((limit, limit), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if str(fmt).upper() == "PNG":
            image.save(buffer, format="PNG")
            return "image/png", buffer.getvalue()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return "image/jpeg", buffer.getvalue()
    except Exception:
        log.warning("could not encode a preview:\n%s", traceback.format_exc())
        return None
