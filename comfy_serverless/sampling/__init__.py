"""Sampling: noise schedules, the samplers, guidance over ComfyUI conditioning, and the KSampler glue."""
