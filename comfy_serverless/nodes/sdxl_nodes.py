"""SDXL text encoding nodes: CLIPTextEncodeSDXL and CLIPTextEncodeSDXLRefiner.

Standard library only at module level (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
