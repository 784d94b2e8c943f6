"""SD_4XUpscale_Conditioning: its outputs directly, and ComfyUI's x4 upscale workflow (checkpoint -> prompts ->
SD_4XUpscale_Conditioning -> KSampler -> VAEDecode) through the real server on a tiny random x4 upscaler file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from comfy_serverless.nodes.upscale_diffusion import NODE_CLASS_MAPPINGS, SD_4XUpscale_Conditioning


def _conditioning(tag: float) -> list:
    return [[torch.full((1, 3, 8), tag), {"pooled_output": None, "strength": 1.0}]]


def test_outputs_carry_the_low_res_image_at_latent_size():
    assert NODE_CLASS_MAPPINGS == {"SD_4XUpscale_Conditioning": SD_4XUpscale_Conditioning}
    images = torch.rand(2, 10, 12, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = _conditioning(1.0), _conditioning(2.0)
    out_positive, out_negative, latent = SD_4XUpscale_Conditioning().encode(images, positive, negative, 2.0, 0.25)
    # 12x10 at 2x is 24x20 pixels: 6x5 latent cells of the upscaler's 4x VAE.
    assert latent["samples"].shape == (2, 4, 5, 6) and not latent["samples"].any()
    for out, given in ((out_positive, positive), (out_negative, negative)):
        [[context, options]] = out
        assert context is given[0][0]  # the text is passed on untouched
        assert options["noise_augmentation"] == 0.25 and options["strength"] == 1.0
        assert "concat_image" not in given[0][1]  # the inputs' options are not changed
        pixels = options["concat_image"]
        assert pixels.shape == (2, 3, 5, 6)
        want = torch.nn.functional.interpolate(images.movedim(-1, 1) * 2 - 1, size=(5, 6), mode="bilinear",
                                               align_corners=False)
        torch.testing.assert_close(pixels, want)
    # At scale 4 a 12x8 image gives a latent of the image's own size (the x4 model then decodes 4x).
    _, _, latent = SD_4XUpscale_Conditioning().encode(torch.rand(1, 8, 12, 3), positive, negative, 4.0, 0.0)
    assert latent["samples"].shape == (1, 4, 8, 12)


def test_a_scale_too_small_for_one_latent_cell_is_refused():
    with pytest.raises(ValueError, match="smaller than one 4x4 latent cell"):
        SD_4XUpscale_Conditioning().encode(torch.rand(1, 8, 8, 3), _conditioning(1), _conditioning(2), 0.0, 0.0)
    with pytest.raises(ValueError, match=r"IMAGE batch \[B, H, W, 3\]"):
        SD_4XUpscale_Conditioning().encode(torch.rand(8, 8), _conditioning(1), _conditioning(2), 4.0, 0.0)


# -- through the server ------------------------------------------------------------------------------------

def _prompt(noise_augmentation: float, prefix: str, ckpt: str = "tiny-x4.safetensors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a sharp photo", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "SD_4XUpscale_Conditioning", "inputs": {
            "images": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "scale_ratio": 4.0,
            "noise_augmentation": noise_augmentation}},
        "6": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["7", 0]}},
    }


def _pixels(srv, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["8"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_x4_upscale_workflow_through_the_server(start_server, tmp_path):
    base = tmp_path / "x4-server"
    (base / "models" / "checkpoints").mkdir(parents=True)
    make_test_checkpoint("sd_x4_upscaler", "tiny", base / "models" / "checkpoints" / "tiny-x4.safetensors", seed=4)
    make_test_checkpoint("sd15", "tiny", base / "models" / "checkpoints" / "tiny-sd15.safetensors", seed=1)
    (base / "input").mkdir()
    small = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(small).save(base / "input" / "small.png")
    srv = start_server("--force-fp32", packs=(), base=base)

    info = srv.get("/object_info/SD_4XUpscale_Conditioning").json()["SD_4XUpscale_Conditioning"]
    assert info["output_name"] == ["positive", "negative", "latent"]
    assert info["category"] == "conditioning/upscale_diffusion"
    plain = _pixels(srv, srv.run(_prompt(0.0, "x4a")))
    assert plain.shape == (48, 64, 3) and plain.std() > 0  # 4x the 16x12 input
    augmented = _pixels(srv, srv.run(_prompt(0.6, "x4b")))
    again = _pixels(srv, srv.run(_prompt(0.6, "x4c")))
    assert not np.array_equal(plain, augmented)  # the noise level and the noised image reach the UNet
    assert np.array_equal(augmented, again)  # seeded augmentation: same prompt, same image

    # A model without the upscaler's image channels ignores concat_image, as in ComfyUI: an SD1.5 model just
    # samples the latent (16x12 cells of the tiny test VAE, which works in 2x2 pixel cells).
    assert _pixels(srv, srv.run(_prompt(0.0, "x4d", ckpt="tiny-sd15.safetensors"))).shape == (24, 32, 3)
