"""Nodes that patch how a MODEL samples: model sampling, guidance rescaling, FreeU, attention guidance, tiling.

Standard library only at module level (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
