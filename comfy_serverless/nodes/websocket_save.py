"""SaveImageWebsocket (api/image): each image of the batch goes to the prompt's client as a binary WebSocket
frame (PREVIEW_IMAGE, PNG, full size) instead of a file, as ComfyUI's websocket_image_save example node does.

The frames travel the ProgressBar preview path (progress.py -> engine -> hub) with no size limit; a client that
negotiated supports_preview_metadata gets them as event 4 with the node and prompt ids. Nothing is written to
disk and the node has no outputs in the history. Standard library only at module level.
"""

from __future__ import annotations

import time


class SaveImageWebsocket:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "api/image"

    def save_images(self, images):
        from ..progress import ProgressBar
        from .image_files import _to_pil

        if getattr(images, "ndim", None) != 4:
            raise ValueError(f"images must be an IMAGE batch [B,H,W,C], got {getattr(images, 'shape', type(images))}")
        count = images.shape[0]
        bar = ProgressBar(count)
        for index in range(count):
            # As in ComfyUI the step counts from 0: the frame for image i comes with progress i of B.
            bar.update_absolute(index, count, ("PNG", _to_pil(images[index]), None))
        return {}

    @classmethod
    def IS_CHANGED(cls, images):
        return time.time()  # frames are not kept anywhere: a cached result would send nothing


NODE_CLASS_MAPPINGS = {"SaveImageWebsocket": SaveImageWebsocket}
