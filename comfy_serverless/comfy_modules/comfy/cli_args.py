"""ComfyUI's `comfy.cli_args` for custom node packs: `args` reads the current server's settings.

This server accepts ComfyUI's launch flags under the same names (comfy_serverless/settings.py), so `args.<dest>`
is the running server's value of that flag (`args.preview_method` as a LatentPreviewMethod; `args.cpu` is always
True on this CPU-only server). A pack that assigns `args.<name>` changes what it reads back for that server only.
"""

from __future__ import annotations

import enum

from comfy_serverless import context
from comfy_serverless import settings as _settings
from comfy_serverless.catalog.comfy_modules import missing_attribute


class LatentPreviewMethod(str, enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


_FIELDS = _settings.field_names()
_ALWAYS = {"cpu": True}  # this server never computes anywhere else


class _Args:
    """ComfyUI's parsed-arguments namespace, over the current server's settings."""

    @staticmethod
    def _overrides() -> dict:
        return context.current().slot("comfy_cli_args", dict)

    def __getattr__(self, name: str):
        overrides = self._overrides()
        if name in overrides:
            return overrides[name]
        if name in _ALWAYS:
            return _ALWAYS[name]
        if name.startswith("_") or name not in _FIELDS:
            raise AttributeError(f"no flag {name!r} (comfy.cli_args.args reads this server's settings)")
        value = getattr(_settings.current(), name)
        if name == "preview_method":
            return LatentPreviewMethod(value)
        return value

    def __setattr__(self, name: str, value) -> None:
        self._overrides()[name] = value

    def __dir__(self):
        return sorted(_FIELDS | set(self._overrides()))

    def __repr__(self) -> str:
        return "comfy.cli_args.args (the current server's settings)"


args = _Args()


def __getattr__(name: str):
    return missing_attribute(__name__, name)
