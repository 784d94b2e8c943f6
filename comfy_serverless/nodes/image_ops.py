"""Image batch, transform, post-processing, upscaling-by-size and preprocessor nodes (ComfyUI's comfy_extras image nodes).

Standard library only at module level (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
