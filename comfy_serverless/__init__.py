"""comfy-serverless: an API-only, ComfyUI-compatible workflow server built for serverless cold starts."""

__version__ = "0.1.0"
