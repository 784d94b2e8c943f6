"""Mask nodes beyond the basics (grow, feather, threshold, composite, crop, colour to mask) and alpha compositing.

Standard library only at module level (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
