"""Inpainting (9-channel) and instruct-pix2pix (8-channel) checkpoints over HTTP: they load, sample, and the extra
channels (mask, masked image / source image) reach the UNet."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from comfy_serverless.models.random_checkpoints import make_test_checkpoint
from conftest import Server

INPAINT, IP2P = "tiny-sd15-inpainting.safetensors", "tiny-sdxl-ip2p.safetensors"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("inpaint-server")
    folder = base / "models" / "checkpoints"
    folder.mkdir(parents=True)
    make_test_checkpoint("sd15", "tiny", folder / INPAINT, seed=7, in_channels=9)
    make_test_checkpoint("sdxl", "tiny", folder / IP2P, seed=8, in_channels=8)
    server = Server(base, packs=())
    yield server
    server.stop()


def workflow(ckpt: str, conditioning: dict) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x3366CC}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red door", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": conditioning,
        "6": {"class_type": "KSampler", "inputs": {
            "seed": 11, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "concat", "images": ["7", 0]}},
    }


def inpaint_workflow(mask_value: float) -> dict:
    prompt = workflow(INPAINT, {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["2", 0], "mask": ["9", 0],
        "noise_mask": False}})
    prompt["9"] = {"class_type": "SolidMask", "inputs": {"value": mask_value, "width": 32, "height": 32}}
    return prompt


def ip2p_workflow(color: int) -> dict:
    prompt = workflow(IP2P, {"class_type": "InstructPixToPixConditioning", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["2", 0]}})
    prompt["2"]["inputs"]["color"] = color
    return prompt


def render(srv: Server, prompt: dict) -> np.ndarray:
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["8"]["images"]
    return np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))).astype(np.int16)


def test_inpainting_checkpoint_samples_and_sees_the_mask(srv):
    whole = render(srv, inpaint_workflow(1.0))
    assert whole.shape == (32, 32, 3) and whole.std() > 0
    assert np.array_equal(whole, render(srv, inpaint_workflow(1.0)))
    # Same latent and prompts; only c_concat differs (the mask, and so the masked image): the result must change.
    assert np.abs(render(srv, inpaint_workflow(0.0)) - whole).max() > 0
    assert "SD1.x inpainting" in srv.log()


def test_ip2p_checkpoint_samples_and_sees_the_source_image(srv):
    blue = render(srv, ip2p_workflow(0x3366CC))
    assert blue.std() > 0
    # The latent to sample is zeros either way: only the concatenated source image differs.
    assert np.abs(render(srv, ip2p_workflow(0xCC3322)) - blue).max() > 0
    assert "SDXL instruct-pix2pix" in srv.log()
