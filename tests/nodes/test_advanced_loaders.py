"""UNETLoader, CLIPLoader and DualCLIPLoader: part files in the layouts ComfyUI accepts give the same networks as
the checkpoint they came from; unsupported choices fail clearly; a split SDXL model runs over HTTP."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from PIL import Image
from safetensors.torch import save_file

from comfy_serverless.models.checkpoint_files import CheckpointError, open_checkpoint
from comfy_serverless.models.loading import load_checkpoint, load_text_encoders, load_unet
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, make_test_vae
from comfy_serverless.networks.build import UNET_PREFIX
from comfy_serverless.networks.clip import load_text_model
from comfy_serverless.nodes.loaders import CLIPLoader, DualCLIPLoader
from conftest import Server

TEST_KEY = "comfy_serverless.test_checkpoint"


def diffusers_config(unet_config, size_width: int) -> dict:
    """diffusers' UNet2DConditionModel arguments for an SDXL-like LDM config (what convert_ldm_unet_checkpoint
    reads to name the blocks)."""
    attention = [depth > 0 for depth in unet_config.transformer_depth]
    return dict(in_channels=unet_config.in_channels, layers_per_block=unet_config.num_res_blocks,
                block_out_channels=[unet_config.model_channels * mult for mult in unet_config.channel_mult],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
                transformer_layers_per_block=[max(depth, 1) for depth in unet_config.transformer_depth],
                use_linear_projection=unet_config.use_linear_in_transformer, addition_embed_type="text_time",
                addition_time_embed_dim=size_width, projection_class_embeddings_input_dim=unet_config.adm_in_channels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """models/{checkpoints,diffusion_models,text_encoders,vae} cut from tiny checkpoints."""
    base = tmp_path_factory.mktemp("split-models")
    models = base / "models"
    for sub in ("checkpoints", "diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    for arch, seed in (("sd15", 1), ("sd2", 2), ("sdxl", 3), ("sdxl_refiner", 4)):
        make_test_checkpoint(arch, "tiny", models / "checkpoints" / f"{arch}.safetensors", seed=seed)
    make_test_vae(models / "vae" / "vae.safetensors", seed=5)
    parts = {arch: open_checkpoint(models / "checkpoints" / f"{arch}.safetensors")
             for arch in ("sd15", "sd2", "sdxl", "sdxl_refiner")}

    def save(name, tensors, kind=None):
        tensors = {key: value.contiguous() for key, value in tensors.items()}
        save_file(tensors, models / name, metadata={TEST_KEY: f"text-encoder-{kind}"} if kind else None)

    # UNets: bare LDM names (SD1), the checkpoint's prefix (SD2), diffusers names made by diffusers (SDXL).
    save("diffusion_models/sd15-ldm.safetensors", parts["sd15"].unet)
    save("diffusion_models/sd2-prefixed.safetensors", {UNET_PREFIX + k: v for k, v in parts["sd2"].unet.items()})
    sdxl_config = parts["sdxl"].architecture.unet_config
    save("diffusion_models/sdxl-diffusers.safetensors", convert_ldm_unet_checkpoint(
        {UNET_PREFIX + k: v for k, v in parts["sdxl"].unet.items()}, diffusers_config(sdxl_config, 32)))
    # Text encoders: transformers' layout (CLIP-L; bigG with its projection as a Linear), OpenCLIP's (ViT-H, bigG).
    save("text_encoders/clip_l.safetensors",
         {"text_model." + k: v for k, v in parts["sdxl"].text_encoders["clip_l"].items()}, "clip_l")
    save("text_encoders/sd15_clip_l.safetensors",
         {"text_model." + k: v for k, v in parts["sd15"].text_encoders["clip_l"].items()}, "clip_l")
    save("text_encoders/clip_h.safetensors", parts["sd2"].text_encoders["clip_h"], "clip_h")
    clip_g = load_text_model(parts["sdxl"].text_encoders["clip_g"], parts["sdxl"].architecture.text_encoders[
        "clip_g"].config).state_dict()
    projection = clip_g.pop("text_projection")
    save("text_encoders/clip_g_hf.safetensors",
         {"text_model." + k: v for k, v in clip_g.items()} | {"text_projection.weight": projection.t()}, "clip_g")
    save("text_encoders/refiner_clip_g.safetensors", parts["sdxl_refiner"].text_encoders["clip_g"], "clip_g")
    save("text_encoders/no_kind.safetensors", parts["sd15"].text_encoders["clip_l"])
    return base


def models_path(folder, name):
    return str(folder / "models" / name)


@pytest.mark.parametrize("arch, unet_file", [("sd15", "sd15-ldm"), ("sd2", "sd2-prefixed"),
                                              ("sdxl", "sdxl-diffusers")])
def test_unet_files_give_the_checkpoints_unet(folder, arch, unet_file):
    model = load_unet(models_path(folder, f"diffusion_models/{unet_file}.safetensors"))
    reference, clip, _ = load_checkpoint(models_path(folder, f"checkpoints/{arch}.safetensors"))
    assert (model.family, model.adm_channels, model.prediction) == (reference.family, reference.adm_channels,
                                                                    reference.prediction)
    cond, pooled = clip.encode("a cat")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = reference.encode_extra({"pooled_output": pooled}, x.shape)
    got = model.unet_apply(x, torch.tensor([400.0]), context=cond, **extra)
    want = reference.unet_apply(x, torch.tensor([400.0]), context=cond, **extra)
    assert want.abs().max() > 0.01
    torch.testing.assert_close(got, want)


def test_unet_loader_refuses_fp8_and_files_that_are_not_a_unet(folder):
    with pytest.raises(CheckpointError, match="weight_dtype 'fp8_e4m3fn' is not supported"):
        load_unet(models_path(folder, "diffusion_models/sd15-ldm.safetensors"), "fp8_e4m3fn")
    with pytest.raises(CheckpointError, match="VAE on its own.*expected a diffusion model"):
        load_unet(models_path(folder, "vae/vae.safetensors"))


def encodes_like(clip, reference, text="a (red:1.2) fox, sharp"):
    got, want = clip.encode(text), reference.encode(text)
    assert clip.family == reference.family
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("files, arch", [(["sd15_clip_l"], "sd15"), (["clip_h"], "sd2"),
                                         (["refiner_clip_g"], "sdxl_refiner"), (["clip_g_hf", "clip_l"], "sdxl"),
                                         (["clip_l", "clip_g_hf"], "sdxl")])
def test_text_encoder_files_give_the_checkpoints_clip(folder, files, arch):
    clip = load_text_encoders([models_path(folder, f"text_encoders/{name}.safetensors") for name in files],
                              "sdxl" if len(files) == 2 else "stable_diffusion")
    encodes_like(clip, load_checkpoint(models_path(folder, f"checkpoints/{arch}.safetensors"))[1])


def test_text_encoder_loaders_refuse_what_they_cannot_build(folder):
    path = models_path(folder, "text_encoders/clip_l.safetensors")
    with pytest.raises(CheckpointError, match="both CLIP-L"):
        load_text_encoders([path, path], "sdxl")
    with pytest.raises(CheckpointError, match="needs a CLIP-L and an OpenCLIP ViT-bigG file; these are CLIP-L \\+ "
                                              "OpenCLIP ViT-H"):
        load_text_encoders([path, models_path(folder, "text_encoders/clip_h.safetensors")], "sdxl")
    with pytest.raises(CheckpointError, match="a text encoder 32 wide, not one of the Stable Diffusion encoders"):
        load_text_encoders([models_path(folder, "text_encoders/no_kind.safetensors")], "stable_diffusion")
    with pytest.raises(CheckpointError, match="expected a CLIP text encoder"):
        load_text_encoders([models_path(folder, "vae/vae.safetensors")], "stable_diffusion")
    with pytest.raises(ValueError, match="CLIP type 'sd3' is not supported"):
        CLIPLoader().load_clip("clip_l.safetensors", "sd3")
    with pytest.raises(ValueError, match="CLIP type 'flux' is not supported"):
        DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g_hf.safetensors", "flux")


def split_sdxl_workflow(split: bool) -> dict:
    if split:
        loaders = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sdxl-diffusers.safetensors",
                                                         "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "clip_g_hf.safetensors", "type": "sdxl",
                                                             "device": "default"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}},
        }
        model, clip, vae = ["1", 0], ["2", 0], ["3", 0]
    else:
        loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
                   "3": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}}}
        model, clip, vae = ["1", 0], ["1", 1], ["3", 0]
    return loaders | {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "8": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": vae}},
        "10": {"class_type": "SaveImage", "inputs": {"filename_prefix": "split", "images": ["9", 0]}},
    }


def test_split_sdxl_files_render_like_the_checkpoint_over_http(tmp_path_factory, folder):
    base = tmp_path_factory.mktemp("split-server")
    shutil.copytree(folder / "models", base / "models")
    srv = Server(base, packs=())
    try:
        info = srv.get("/object_info/UNETLoader").json()["UNETLoader"]
        assert "sdxl-diffusers.safetensors" in info["input"]["required"]["unet_name"][0]
        images = []
        for split in (True, False):
            entry = srv.run(split_sdxl_workflow(split))
            assert entry["status"]["status_str"] == "success", entry["status"]
            [image] = entry["outputs"]["10"]["images"]
            images.append(np.asarray(Image.open(io.BytesIO(srv.get("/view", params=image).content))))
        assert images[0].std() > 0 and np.array_equal(images[0], images[1])
        wrong = split_sdxl_workflow(True)
        wrong["1"]["inputs"]["weight_dtype"] = "fp8_e5m2"
        entry = srv.run(wrong)
        error = next(data for name, data in entry["status"]["messages"] if name == "execution_error")
        assert error["node_id"] == "1" and "not supported" in error["exception_message"]
    finally:
        srv.stop()
