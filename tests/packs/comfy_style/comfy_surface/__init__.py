"""A node pack written the way ComfyUI packs are: a package whose nodes module imports ComfyUI's modules by their
top-level names at import time (tests/test_comfy_modules.py runs it through a real server)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
