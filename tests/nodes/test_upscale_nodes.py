"""UpscaleModelLoader and ImageUpscaleWithModel: model files in every format, ComfyUI's tiling (placement,
feathered blending, halving on out-of-memory), bad inputs, and the GAN-upscaler template through the server."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_serverless.models import random_upscalers as ru
from comfy_serverless.models import upscale_models as um
from comfy_serverless.nodes.upscale_nodes import ImageUpscaleWithModel, UpscaleModelLoader
from conftest import server_context


@pytest.fixture
def model_dir(tmp_path):
    with server_context(base_directory=str(tmp_path)):
        folder = tmp_path / "models" / "upscale_models"
        folder.mkdir(parents=True)
        yield folder


def nearest(x: torch.Tensor, scale: int) -> torch.Tensor:
    return x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


# ---- files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, wrap, layout", [
    ("plain.pth", None, "esrgan"), ("realesrgan.pth", "params_ema", "basicsr"), ("model.safetensors", None, "basicsr"),
    ("trained.pth", "params", "esrgan")])
def test_every_file_form_loads_the_same_network(model_dir, name, wrap, layout):
    weights = ru.esrgan_state_dict(2, layout, spread=0.1)
    ru.write_model(model_dir / name, weights, wrap=wrap)
    (model,) = UpscaleModelLoader().load_model(name)
    assert (model.scale, model.architecture.name, model.input_channels) == (2, "ESRGAN", 3)
    direct, _ = um.build(weights)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x).clamp(0, 1))


def test_the_node_scales_and_clamps(model_dir):
    ru.write_model(model_dir / "compact.pth", ru.compact_state_dict(4, spread=0.5))
    (model,) = UpscaleModelLoader().load_model("compact.pth")
    image = torch.rand(2, 9, 7, 3)
    (out,) = ImageUpscaleWithModel().upscale(model, image)
    assert out.shape == (2, 36, 28, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    with torch.no_grad():  # one image at a time, as the node runs them
        pixels = image.movedim(-1, 1)  # channels-last in memory, as the node hands them over
        raw = torch.cat([model.model(pixels[i: i + 1]) for i in range(2)]).movedim(1, -1)
    assert raw.min() < 0 or raw.max() > 1  # so the clamp did something
    torch.testing.assert_close(out, raw.clamp(0, 1), rtol=0, atol=1e-6)


def test_span_file_through_the_nodes(model_dir):
    ru.write_model(model_dir / "4x-span.safetensors", ru.span_state_dict(4, features=4))
    (model,) = UpscaleModelLoader().load_model("4x-span.safetensors")
    (out,) = ImageUpscaleWithModel().upscale(model, torch.rand(1, 6, 5, 3))
    assert model.architecture.name == "SPAN" and out.shape == (1, 24, 20, 3)


def test_odd_sizes_are_padded_for_unshuffle_models(model_dir):
    ru.write_model(model_dir / "x2plus.pth", ru.esrgan_state_dict(2, "basicsr"), wrap="params_ema")
    (model,) = UpscaleModelLoader().load_model("x2plus.pth")
    assert model.size_requirements.multiple_of == 4
    (out,) = ImageUpscaleWithModel().upscale(model, torch.rand(1, 5, 3, 3))
    assert out.shape == (1, 10, 6, 3)


def test_the_network_lives_in_the_model_cache(model_dir):
    from comfy_serverless.models.model_cache import loaded_models

    ru.write_model(model_dir / "c.safetensors", ru.compact_state_dict(2))
    (model,) = UpscaleModelLoader().load_model("c.safetensors")
    assert model.handle in loaded_models().loaded()
    loaded_models().unload_all()  # what /free does
    assert not model.handle.is_loaded
    (out,) = ImageUpscaleWithModel().upscale(model, torch.rand(1, 4, 4, 3))  # reloads from the file
    assert out.shape == (1, 8, 8, 3) and model.handle.loads == 2


# ---- tiling ---------------------------------------------------------------------------------------------

def test_tile_placement_is_comfyuis():
    assert um.tile_starts(512, 512, 32) == [0]
    assert um.tile_starts(600, 512, 32) == [0, 480]  # the last tile is shorter, not moved back
    assert um.tile_starts(1000, 512, 32) == [0, 480, 960]
    assert um.tile_count(600, 1000, 512, 32) == 6


def test_overlaps_are_blended_with_linear_ramps():
    """Two tiles along x (28 wide, tiles of 16 with overlap 4, at 0 and 12), each filled with its own value:
    over the overlap the weights are A 1, .75, .5, .25 against B .25, .5, .75, 1."""
    values = iter([0.2, 0.6])

    def constant_tile(piece):
        return torch.full_like(piece, next(values))

    out = um.tiled_scale(torch.zeros(1, 3, 8, 28), constant_tile, tile=16, overlap=4, scale=1)
    row = out[0, 0, 3]
    a, b = 0.2, 0.6
    expected = [a] * 12 + [(w * a + v * b) / (w + v) for w, v in [(1, .25), (.75, .5), (.5, .75), (.25, 1)]] + [b] * 12
    torch.testing.assert_close(row, torch.tensor(expected), rtol=0, atol=1e-6)


def test_tiled_equals_whole_for_a_pointwise_model():
    image = torch.rand(2, 3, 40, 30)
    calls = []
    out = um.tiled_scale(image, lambda t: calls.append(t.shape) or nearest(t, 3), tile=16, overlap=4, scale=3,
                         on_tile=lambda: None)
    assert len(calls) == 2 * um.tile_count(40, 30, 16, 4) and max(max(s[-2:]) for s in calls) == 16
    torch.testing.assert_close(out, nearest(image, 3), rtol=0, atol=1e-6)


class FussyModel:
    """An UPSCALE_MODEL stand-in that runs out of memory on tiles wider than `fits`."""

    scale, input_channels, device = 2, 3, torch.device("cpu")

    def __init__(self, fits):
        self.fits, self.widths = fits, []

    def __call__(self, tile):
        self.widths.append(tile.shape[-1])
        if tile.shape[-1] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return nearest(tile, 2)


def test_tiles_halve_after_running_out_of_memory():
    model, image = FussyModel(fits=16), torch.rand(1, 40, 40, 3)
    totals = []
    out = um.upscale_image(model, image, progress=lambda total: totals.append(total) or (lambda: None),
                           tile=64, overlap=4, smallest_tile=8)
    assert model.widths[0] == 40 and model.widths[1] == 32 and max(model.widths[2:]) == 16  # 64, 32, then 16
    assert totals == [1, um.tile_count(40, 40, 32, 4), um.tile_count(40, 40, 16, 4)]
    torch.testing.assert_close(out, nearest(image.movedim(-1, 1), 2).movedim(1, -1), rtol=0, atol=1e-6)


def test_running_out_of_memory_at_the_smallest_tile_fails():
    with pytest.raises(torch.OutOfMemoryError):
        um.upscale_image(FussyModel(fits=4), torch.rand(1, 40, 40, 3), tile=64, overlap=4, smallest_tile=16)


# ---- bad inputs -----------------------------------------------------------------------------------------

def test_bad_files_fail_with_what_was_found(model_dir):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    (model_dir / "picture.pth").write_bytes(buffer.getvalue())
    with pytest.raises(um.UpscaleModelError, match=r"picture.pth: not a PyTorch file \(it starts with b'\\x89PNG"):
        UpscaleModelLoader().load_model("picture.pth")
    ru.write_model(model_dir / "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)})
    with pytest.raises(um.UpscaleModelError, match="sd.safetensors: unsupported upscale model architecture "
                                                   r"\(it looks like a Stable Diffusion checkpoint\)"):
        UpscaleModelLoader().load_model("sd.safetensors")
    torch.save({"epoch": 3}, model_dir / "empty.pth")
    with pytest.raises(um.UpscaleModelError, match=r"empty.pth: holds no tensors \(top-level keys: epoch\)"):
        UpscaleModelLoader().load_model("empty.pth")
    with pytest.raises(FileNotFoundError, match="'gone.pth' not found in models/upscale_models"):
        UpscaleModelLoader().load_model("gone.pth")


def test_pickled_code_is_refused(model_dir):
    torch.save({"weights": torch.zeros(2), "config": os.path.join}, model_dir / "code.pth")
    refusal = r"code.pth: refused: the file holds Python objects besides tensors \(posixpath.join\)"
    with pytest.raises(um.UpscaleModelError, match=refusal):
        UpscaleModelLoader().load_model("code.pth")


def test_an_image_with_the_wrong_channels_fails_clearly(model_dir):
    ru.write_model(model_dir / "c.pth", ru.compact_state_dict(2))
    (model,) = UpscaleModelLoader().load_model("c.pth")
    with pytest.raises(ValueError, match="takes 3-channel images; this image has 4 channels"):
        ImageUpscaleWithModel().upscale(model, torch.rand(1, 4, 4, 4))


# ---- through the server ---------------------------------------------------------------------------------

def test_gan_upscaler_template_through_the_server(start_server, tmp_path):
    base = tmp_path / "base"
    (base / "models" / "upscale_models").mkdir(parents=True)
    (base / "input").mkdir(parents=True)
    ru.write_model(base / "models" / "upscale_models" / "RealESRGAN_x2plus.pth", ru.esrgan_state_dict(2, "basicsr"),
                   wrap="params_ema")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 14, 3), dtype=np.uint8)).save(
        base / "input" / "photo.png")
    server = start_server(base=base)
    options = server.get("/object_info/UpscaleModelLoader").json()["UpscaleModelLoader"]["input"]["required"]
    assert options["model_name"] == ["COMBO", {"multiselect": False, "options": ["RealESRGAN_x2plus.pth"]}]
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "RealESRGAN_x2plus.pth"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "upscaled"}},
    }
    entry = server.wait_history(server.queue_prompt(prompt)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["4"]["images"][0]
    response = server.get("/view", params=saved)
    assert Image.open(io.BytesIO(response.content)).size == (28, 40)  # (width, height) x 2

    prompt["2"]["inputs"]["model_name"] = "missing.pth"
    entry = server.wait_history(server.queue_prompt(prompt)["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    error = next(m for kind, m in entry["status"]["messages"] if kind == "execution_error")
    assert error["node_type"] == "UpscaleModelLoader" and "not found in models/upscale_models" in \
        error["exception_message"]
