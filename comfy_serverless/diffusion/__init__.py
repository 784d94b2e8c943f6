"""Diffusion models and sampling in lean PyTorch: model building blocks, schedules, samplers, KSampler glue."""
