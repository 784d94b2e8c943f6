"""`comfy_api.latest`: `io` (node schema types), `ui` (result helpers), `ComfyExtension` (what a pack's
`comfy_entrypoint()` returns) and `ComfyAPI` / `ComfyAPISync` (progress reporting from inside a node).
"""

from __future__ import annotations

import abc

from comfy_serverless.catalog.comfy_modules import missing_attribute

from . import _io as io
from . import _ui as ui
from ._io import ComfyNode  # noqa: F401

IO = io
UI = ui


class ComfyExtension(abc.ABC):
    """What a pack's `comfy_entrypoint()` returns: `get_node_list()` names its V3 node classes."""

    async def on_load(self) -> None:
        """Called once after the extension is created, before its node list is read."""

    @abc.abstractmethod
    async def get_node_list(self) -> list:
        """The pack's V3 node classes."""


def _set_progress(value: float, max_value: float, node_id: str | None = None, preview_image=None,
                  ignore_size_limit: bool = False) -> None:
    """Reports progress of the running node (the same messages as comfy.utils.ProgressBar)."""
    from comfy_serverless import progress, settings

    preview = None
    if preview_image is not None:
        image = preview_image
        if hasattr(image, "shape"):  # an IMAGE tensor: the first image of the batch
            from comfy_serverless.nodes.image_files import _to_pil

            image = _to_pil(image[0] if len(image.shape) == 4 else image)
        size = None if ignore_size_limit else settings.current().preview_size
        preview = (getattr(image, "format", None) or "JPEG", image, size)
    bar = progress.ProgressBar(max_value, node_id)
    bar.update_absolute(value, max_value, preview)


class ComfyAPI_latest:  # noqa: N801  (ComfyUI's name)
    VERSION = "latest"
    STABLE = False

    class Execution:
        async def set_progress(self, value: float, max_value: float, node_id: str | None = None,
                               preview_image=None, ignore_size_limit: bool = False) -> None:
            _set_progress(value, max_value, node_id, preview_image, ignore_size_limit)

    def __init__(self):
        self.execution = self.Execution()


class ComfyAPISync:
    """The same API without `await`."""

    VERSION = "latest"
    STABLE = False

    class Execution:
        def set_progress(self, value: float, max_value: float, node_id: str | None = None, preview_image=None,
                         ignore_size_limit: bool = False) -> None:
            _set_progress(value, max_value, node_id, preview_image, ignore_size_limit)

    def __init__(self):
        self.execution = self.Execution()


ComfyAPI = ComfyAPI_latest


class Input:
    """Type names for node inputs (annotations only here)."""

    Image = object
    Audio = dict
    Mask = object
    Latent = dict
    Video = object


class InputImpl:
    pass


class Types:
    pass


def __getattr__(name: str):
    """A name from a later ComfyUI API: a placeholder, so the pack still loads and only what uses it fails
    (catalog/comfy_modules.py); probes such as hasattr see an AttributeError."""
    return missing_attribute(__name__, name)


__all__ = ["ComfyAPI", "ComfyAPISync", "Input", "InputImpl", "Types", "ComfyExtension", "io", "IO", "ui", "UI"]
