"""ComfyUI's `comfyui_version`: the ComfyUI release whose API this server follows."""

from comfy_serverless.server.system import COMFYUI_VERSION as __version__  # noqa: F401
