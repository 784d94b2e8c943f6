"""`comfy_api.v0_0_2`: in ComfyUI 0.3.64 the same API as `comfy_api.latest` under a pinned name."""

from comfy_api.latest import IO, UI, ComfyAPI_latest, ComfyAPISync, ComfyExtension, Input, InputImpl, Types, io, ui  # noqa: F401


class ComfyAPIAdapter_v0_0_2(ComfyAPI_latest):  # noqa: N801
    VERSION = "0.0.2"


ComfyAPI = ComfyAPIAdapter_v0_0_2

__all__ = ["ComfyAPI", "ComfyAPISync", "Input", "InputImpl", "Types", "ComfyExtension", "io", "IO", "ui", "UI"]
