"""CLIPTextEncodeSDXL / CLIPTextEncodeSDXLRefiner, the refiner's y, and ComfyUI's base + refiner template over HTTP
with tiny random-weight checkpoints."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models.extra_inputs import extra_unet_inputs
from comfy_serverless.models.loading import load_checkpoint
from comfy_serverless.models.random_checkpoints import TINY_REFINER_TEXT_DIM, make_test_checkpoint
from comfy_serverless.networks.attention import timestep_embedding
from comfy_serverless.nodes.sdxl_nodes import CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner
from conftest import Server

BASE, REFINER, SD15 = "tiny-sdxl.safetensors", "tiny-sdxl-refiner.safetensors", "tiny-sd15.safetensors"
LONG_PROMPT = ", ".join(["a very detailed red house"] * 20)  # more than one 77-token window


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-models") / "models" / "checkpoints"
    folder.mkdir(parents=True)
    for name, arch, seed in ((BASE, "sdxl", 1), (REFINER, "sdxl_refiner", 2), (SD15, "sd15", 3)):
        make_test_checkpoint(arch, "tiny", folder / name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: load_checkpoint(str(checkpoints / name)) for name in (BASE, REFINER, SD15)}


def encode_sdxl(clip, text_g="a house", text_l="a house", **sizes):
    values = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024) | sizes
    return CLIPTextEncodeSDXL().encode(clip, text_g=text_g, text_l=text_l, **values)[0]


def test_sdxl_encode_sends_each_text_to_its_encoder_and_adds_the_sizes(models):
    clip = models[BASE][1]
    [[cond, options]] = encode_sdxl(clip, "a red house", "a blue car", width=832, crop_w=16, target_height=640)
    assert {key: options[key] for key in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} \
        == {"width": 832, "height": 1024, "crop_w": 16, "crop_h": 0, "target_width": 1024, "target_height": 640}
    # The same token windows, encoded directly: text_l to CLIP-L, text_g to bigG.
    tokens = {"l": clip.tokenize("a blue car")["l"], "g": clip.tokenize("a red house")["g"]}
    want_cond, want_pooled = clip.encode_tokens(tokens)
    torch.testing.assert_close(cond, want_cond)
    torch.testing.assert_close(options["pooled_output"], want_pooled)
    swapped, _ = clip.encode_tokens({"l": tokens["g"], "g": tokens["l"]})
    assert not torch.allclose(cond, swapped)


def test_sdxl_encode_pads_the_shorter_prompt_with_empty_windows(models):
    clip = models[BASE][1]
    [[cond, _]] = encode_sdxl(clip, text_g=LONG_PROMPT, text_l="short")
    assert cond.shape[1] == 2 * 77
    empty = clip.tokenize("")
    tokens = {"g": clip.tokenize(LONG_PROMPT)["g"], "l": clip.tokenize("short")["l"] + empty["l"]}
    torch.testing.assert_close(cond, clip.encode_tokens(tokens)[0])


def test_sdxl_encode_refuses_a_clip_without_both_encoders(models):
    with pytest.raises(ValueError, match="needs an SDXL base CLIP"):
        encode_sdxl(models[SD15][1])
    with pytest.raises(ValueError, match="needs an SDXL base CLIP"):
        encode_sdxl(models[REFINER][1])
    with pytest.raises(RuntimeError, match="clip input is invalid"):
        encode_sdxl(None)


def test_refiner_encode_uses_bigg_alone_and_adds_score_and_size(models):
    clip = models[REFINER][1]
    [[cond, options]] = CLIPTextEncodeSDXLRefiner().encode(2.5, 768, 512, "a photo", clip)[0]
    assert cond.shape == (1, 77, TINY_REFINER_TEXT_DIM)  # the tiny refiner's bigG width
    assert (options["aesthetic_score"], options["width"], options["height"]) == (2.5, 768, 512)
    assert options["pooled_output"].shape == (1, TINY_REFINER_TEXT_DIM)
    torch.testing.assert_close(cond, clip.encode("a photo")[0])


def test_refiner_y_is_pooled_text_and_embedded_size_crop_and_score(models):
    model = models[REFINER][0]
    pooled = torch.randn(1, TINY_REFINER_TEXT_DIM)
    size_width = (model.adm_channels - TINY_REFINER_TEXT_DIM) // 5

    def expected(*numbers):
        embedded = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), size_width).reshape(1, -1)
        return torch.cat([pooled, embedded], dim=1)

    options = {"pooled_output": pooled, "width": 768, "height": 512, "crop_w": 8, "crop_h": 4, "aesthetic_score": 5}
    y = extra_unet_inputs(model, options, torch.Size([1, 4, 16, 16]))["y"]
    torch.testing.assert_close(y, expected(512.0, 768.0, 4.0, 8.0, 5.0))
    # Without the options: the latent's size in pixels, crop 0, and ComfyUI's score by prompt side.
    latent = torch.Size([2, 4, 12, 10])
    positive = extra_unet_inputs(model, {"pooled_output": pooled}, latent)["y"]
    negative = extra_unet_inputs(model, {"pooled_output": pooled, "prompt_type": "negative"}, latent)["y"]
    torch.testing.assert_close(positive, expected(96.0, 80.0, 0.0, 0.0, 6.0))
    torch.testing.assert_close(negative, expected(96.0, 80.0, 0.0, 0.0, 2.5))
    with pytest.raises(ValueError, match="does not fit this model's conditioning vector"):
        extra_unet_inputs(model, {"pooled_output": torch.zeros(1, 100)}, latent)


# ---- ComfyUI's SDXL refiner template over HTTP ---------------------------------------------------------


def refiner_workflow(seed=5, steps=4, switch_at=3, ascore=6.0, target_width=64):
    sizes = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=target_width, target_height=64)
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": REFINER}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["4", 1], "text_g": "a lighthouse at dusk", "text_l": "a lighthouse", **sizes}},
        "7": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["4", 1], "text_g": "blurry", "text_l": "blurry", **sizes}},
        "15": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": ascore, "width": 64, "height": 64, "text": "a lighthouse at dusk", "clip": ["12", 1]}},
        "16": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": 2.5, "width": 64, "height": 64, "text": "blurry", "clip": ["12", 1]}},
        "10": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": switch_at,
            "return_with_leftover_noise": "enable"}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["12", 0], "add_noise": "disable", "noise_seed": seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["15", 0], "negative": ["16", 0],
            "latent_image": ["10", 0], "start_at_step": switch_at, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"filename_prefix": "refined", "images": ["17", 0]}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "refined"}},
    }


def saved_pixels(srv: Server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    [image] = entry["outputs"]["19"]["images"]
    response = srv.get("/view", params=image)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content))).astype(np.int16)


def saved_latent(srv: Server, entry: dict):
    from safetensors.torch import load_file

    [info] = entry["outputs"]["20"]["latents"]
    return load_file(srv.base / "output" / info["subfolder"] / info["filename"])["latent_tensor"]


def test_base_and_refiner_template_runs_over_http(tmp_path_factory, checkpoints):
    base = tmp_path_factory.mktemp("sdxl-server")
    shutil.copytree(checkpoints, base / "models" / "checkpoints")
    srv = Server(base, packs=())
    try:
        entry = srv.run(refiner_workflow())
        first, first_latent = saved_pixels(srv, entry), saved_latent(srv, entry)
        assert first.shape == (16, 16, 3) and first.std() > 0  # 8 x 8 latent; the tiny VAE scales by 2
        again = saved_pixels(srv, srv.run(refiner_workflow(seed=5)))
        assert np.array_equal(first, again)  # deterministic for a seed
        # The refiner's aesthetic score reaches its UNet (through y), and so does the base's target size. On the
        # latents: with the tiny random models the change can stay under one 8-bit level in fp32 pixels.
        other_score = saved_latent(srv, srv.run(refiner_workflow(ascore=9.0)))
        assert float((other_score - first_latent).abs().max()) > 1e-4
        other_target = saved_latent(srv, srv.run(refiner_workflow(target_width=128)))
        assert float((other_target - first_latent).abs().max()) > 1e-4
        # SDXL base conditioning given to the refiner does not fit its y: a clear execution error.
        wrong = refiner_workflow()
        wrong["11"]["inputs"]["positive"] = ["6", 0]
        entry = srv.run(wrong)
        assert entry["status"]["status_str"] == "error"
        error = next(data for name, data in entry["status"]["messages"] if name == "execution_error")
        assert error["node_id"] == "11" and "conditioning" in error["exception_message"], error
    finally:
        srv.stop()
