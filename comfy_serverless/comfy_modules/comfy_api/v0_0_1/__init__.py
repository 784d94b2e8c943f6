"""`comfy_api.v0_0_1`: the first pinned API name; the same objects as `comfy_api.latest` here."""

from comfy_api.latest import IO, UI, ComfyAPI_latest, ComfyAPISync, ComfyExtension, Input, InputImpl, Types, io, ui  # noqa: F401


class ComfyAPIAdapter_v0_0_1(ComfyAPI_latest):  # noqa: N801
    VERSION = "0.0.1"


ComfyAPI = ComfyAPIAdapter_v0_0_1

__all__ = ["ComfyAPI", "ComfyAPISync", "Input", "InputImpl", "Types", "ComfyExtension", "io", "IO", "ui", "UI"]
