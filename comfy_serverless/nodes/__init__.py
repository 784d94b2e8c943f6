"""Built-in node packs, written in ComfyUI's V1 node class protocol with ComfyUI's node names.

Each module is one pack (`NODE_CLASS_MAPPINGS`, `NODE_DISPLAY_NAME_MAPPINGS`). They import only the standard
library at module level: the server imports packs to build the catalogue and validate prompts before torch,
numpy or Pillow are loaded, so those are imported inside the functions that compute.
"""
