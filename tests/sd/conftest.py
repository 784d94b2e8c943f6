"""Tiny random-weight model files (made once per session) and helpers for the SD pipeline tests.

tests/sd is a package so this conftest does not shadow tests/conftest.py (imported as `conftest`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARCHES = ("sd15", "sd2", "sd2-v", "sdxl")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """arch -> tiny checkpoint, "<arch>-lora" -> its LoRA, "vae" -> a standalone VAE file."""
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_lora, make_test_vae

    folder = tmp_path_factory.mktemp("sd-models")
    files = {}
    for arch in ARCHES:
        files[arch] = folder / f"tiny-{arch}.safetensors"
        make_test_checkpoint(arch, "tiny", files[arch], seed=1)
        files[f"{arch}-lora"] = folder / f"tiny-{arch}-lora.safetensors"
        make_test_lora(arch, files[f"{arch}-lora"], seed=2)
    files["vae"] = folder / "tiny-vae.safetensors"
    make_test_vae(files["vae"], seed=3)
    return files


def install_models(base: Path, model_files: dict[str, Path]) -> Path:
    """Puts the test files into base/models/{checkpoints,loras,vae} (hard links where possible)."""
    for key, source in model_files.items():
        folder = "loras" if key.endswith("-lora") else "vae" if key == "vae" else "checkpoints"
        target = base / "models" / folder / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    return base


def txt2img(ckpt: str, seed: int = 8566257, steps: int = 2, size: int = 64, batch: int = 1, cfg: float = 8.0,
            sampler: str = "euler", scheduler: str = "normal", prefix: str = "ComfyUI") -> dict:
    """The default workflow of docs/comfy-api-contract.md §4.1, small and short."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "masterpiece best quality girl", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "bad hands", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }
