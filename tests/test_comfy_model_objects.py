"""ComfyUI's methods on the MODEL, CLIP and VAE objects packs receive (issue #9 follow-up): each is backed by this
server's own code and agrees with the core nodes (CLIPTextEncode, VAEDecode, VAEEncode, VAEDecodeTiled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_serverless.models.loading import load_checkpoint
from comfy_serverless.nodes.conditioning import CLIPTextEncode
from comfy_serverless.nodes.vae_nodes import VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeTiled
from comfy_serverless.sampling.schedules import calculate_sigmas

TEXT = "a (red:1.3) cat, embedding:missing sitting on a mat"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from comfy_serverless.models.random_checkpoints import make_test_checkpoint

    folder = tmp_path_factory.mktemp("model-objects")
    files = {}
    for arch in ("sd15", "sdxl"):
        files[arch] = folder / f"tiny-{arch}.safetensors"
        make_test_checkpoint(arch, "tiny", files[arch], seed=1)
    return files


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def loaded(request, checkpoints):
    return load_checkpoint(str(checkpoints[request.param]))


# -- CLIP -------------------------------------------------------------------------------------------------------

def test_encode_from_tokens_equals_clip_text_encode(loaded):
    _, clip, _ = loaded
    (core,) = CLIPTextEncode().encode(clip, TEXT)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(TEXT), return_pooled=True)
    assert torch.equal(cond, core[0][0]) and torch.equal(pooled, core[0][1]["pooled_output"])
    assert torch.equal(clip.encode_from_tokens(clip.tokenize(TEXT)), cond)
    as_dict = clip.encode_from_tokens(clip.tokenize(TEXT), return_dict=True)
    assert torch.equal(as_dict["cond"], cond) and torch.equal(as_dict["pooled_output"], pooled)
    scheduled = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT), add_dict={"strength": 0.5})
    assert len(scheduled) == 1 and torch.equal(scheduled[0][0], cond)
    assert torch.equal(scheduled[0][1]["pooled_output"], pooled) and scheduled[0][1]["strength"] == 0.5


def test_tokenize_has_comfyuis_shape_and_word_ids(loaded):
    _, clip, _ = loaded
    tokens = clip.tokenize(TEXT)
    assert sorted(tokens) == (["l"] if clip.family == "sd15" else ["g", "l"])
    window = tokens["l"][0]
    assert len(window) == 77 and all(len(entry) == 2 for entry in window)
    assert window[0] == (49406, 1.0)
    with_words = clip.tokenize("a (red:1.3) cat", return_word_ids=True)
    entries = with_words["l"][0]
    assert all(len(entry) == 3 for entry in entries)
    assert [entry[2] for entry in entries[:5]] == [0, 1, 2, 3, 0]  # start, a, red, cat, end
    assert entries[2][1] == pytest.approx(1.3)
    assert [entry[:2] for entry in entries] == clip.tokenize("a (red:1.3) cat")["l"][0]
    # Tokens with word ids encode the same.
    assert torch.equal(clip.encode_from_tokens(with_words), clip.encode_from_tokens(clip.tokenize("a (red:1.3) cat")))


def test_tokens_of_another_family_are_refused(checkpoints):
    _, sd15, _ = load_checkpoint(str(checkpoints["sd15"]))
    _, sdxl, _ = load_checkpoint(str(checkpoints["sdxl"]))
    with pytest.raises(ValueError, match="another CLIP"):
        sdxl.encode_from_tokens(sd15.tokenize("a cat"))


def test_clip_clone_and_last_layer_are_its_own(loaded):
    _, clip, _ = loaded
    clone = clip.clone()
    assert clone is not clip and clone.handle is clip.handle
    shallower = clone.set_last_layer(-2)
    assert clip.last_layer is None and shallower.last_layer == -2


# -- VAE --------------------------------------------------------------------------------------------------------

def latent(channels: int, height: int = 8, width: int = 12) -> torch.Tensor:
    return torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(5))


def test_vae_decode_and_encode_equal_the_nodes(loaded):
    _, _, vae = loaded
    samples = latent(vae.latent_channels)
    (image,) = VAEDecode().decode(vae, {"samples": samples})
    decoded = vae.decode(samples)
    assert torch.equal(decoded, image)
    ratio = vae.downscale_ratio  # 2 in the tiny test VAE, 8 in SD's
    assert decoded.shape == (2, 8 * ratio, 12 * ratio, 3)
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
    (encoded,) = VAEEncode().encode(vae, decoded)
    assert torch.equal(vae.encode(decoded), encoded["samples"]) and encoded["samples"].shape == samples.shape


def test_vae_tiled_methods_take_comfyuis_arguments(loaded):
    _, _, vae = loaded
    ratio = vae.downscale_ratio
    samples = latent(vae.latent_channels, 16, 24)
    (node_image,) = VAEDecodeTiled().decode(vae, {"samples": samples}, tile_size=8 * ratio, overlap=2 * ratio)
    assert torch.equal(vae.decode_tiled(samples, tile_x=8, tile_y=8, overlap=2), node_image)
    rectangular = vae.decode_tiled(samples, tile_x=12, tile_y=8, overlap=2)
    assert rectangular.shape == (2, 16 * ratio, 24 * ratio, 3)
    assert not torch.equal(rectangular, node_image)
    assert torch.equal(vae.decode_tiled(samples), vae.decode_tiled(samples, tile_x=64, tile_y=64, overlap=16))
    # One tile covering everything is the plain decode.
    torch.testing.assert_close(vae.decode_tiled(samples, tile_x=24, tile_y=16, overlap=0), vae.decode(samples))
    pixels = vae.decode(samples)
    (node_latent,) = VAEEncodeTiled().encode(vae, pixels, tile_size=8 * ratio, overlap=2 * ratio)
    assert torch.equal(vae.encode_tiled(pixels, tile_x=8 * ratio, tile_y=8 * ratio, overlap=2 * ratio),
                       node_latent["samples"])
    assert vae.encode_tiled(pixels, tile_x=12 * ratio, tile_y=8 * ratio, overlap=2 * ratio).shape == samples.shape
    torch.testing.assert_close(vae.encode_tiled(pixels, tile_x=24 * ratio, tile_y=16 * ratio), vae.encode(pixels))


def test_vae_attributes(loaded):
    _, _, vae = loaded
    ratio = vae.downscale_ratio  # 8 for SD's VAE; the tiny test VAE halves
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == ratio == vae.upscale_ratio
    assert vae.latent_channels == 4
    assert vae.vae_dtype == vae.dtype and str(vae.device) == "cpu"
    assert vae.vae_encode_crop_pixels(torch.zeros(1, 8 * ratio + 1, 8 * ratio, 3)).shape == (1, 8 * ratio, 8 * ratio, 3)


# -- MODEL ------------------------------------------------------------------------------------------------------

def test_model_clone_shares_weights_and_keeps_its_own_options(loaded):
    model, _, _ = loaded
    clone = model.clone()
    assert clone is not model and clone.handle is model.handle and model.is_clone(clone)
    assert clone.network() is model.network()  # the same weights, not a copy
    clone.model_options["transformer_options"]["patch"] = "on"
    clone.model_options["sampler_cfg_function"] = len
    assert "patch" not in model.model_options["transformer_options"]
    assert "sampler_cfg_function" not in model.model_options
    assert "patch" in clone.clone().model_options["transformer_options"]


def test_model_questions(loaded):
    model, _, _ = loaded
    sampling = model.get_model_object("model_sampling")
    assert sampling is model.model_sampling
    sigmas = calculate_sigmas(sampling, "karras", 5)
    assert sigmas.shape == (6,) and float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) == pytest.approx(float(sampling.sigma_max))
    assert model.model_dtype() == model.dtype
    assert str(model.load_device) == str(model.offload_device) == "cpu"
    assert model.get_model_object("diffusion_model") is model.network()
    with pytest.raises(AttributeError, match="model_sampling"):
        model.get_model_object("first_stage_model")


# -- through the server ----------------------------------------------------------------------------------------

@pytest.fixture
def objects_server(start_server, tmp_path, checkpoints):
    base = tmp_path / "objects"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoints["sd15"].name).hardlink_to(checkpoints["sd15"])
    return start_server(packs=("comfy_style/model_objects.py",), base=base)


def test_a_pack_calls_the_objects_methods_through_the_server(objects_server):
    from PIL import Image

    srv = objects_server
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}}
    report = srv.run({"1": loader, "2": {"class_type": "ModelObjectsReport", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "text": TEXT}}})
    assert report["status"]["status_str"] == "success", report["status"]
    assert report["outputs"]["2"]["facts"] == [{
        "encode_same": True, "scheduled_same": True, "decode_same": True, "encoded": [1, 4, 8, 8],
        "compression": [2, 2, 2, 2], "clone_isolated": True, "sigmas": 5, "devices": ["cpu", "cpu", "cpu"],
        "dtype": True}]

    def txt2img(encoder: str, decoder: str, prefix: str) -> Path:
        prompt = {
            "4": loader,
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": encoder, "inputs": {"text": "a cat", "clip": ["4", 1]}},
            "7": {"class_type": encoder, "inputs": {"text": "", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {
                "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": decoder, "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
        }
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return srv.base / "output" / f"{prefix}_00001_.png"

    ours = txt2img("ModelObjectsTextEncode", "ModelObjectsDecode", "pack")
    core = txt2img("CLIPTextEncode", "VAEDecode", "core")
    assert Image.open(ours).tobytes() == Image.open(core).tobytes()
