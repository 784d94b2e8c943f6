"""Model files: reading single-file checkpoints, VAE and LoRA files, and writing random test checkpoints.

A pack (imports torch); the front never imports it.
"""
