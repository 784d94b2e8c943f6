"""ControlNet and T2I-Adapter loaders and the nodes that apply them to conditioning.

Standard library only at module level (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
