"""SD 2.1 unCLIP checkpoints: recognised from names and shapes, loaded with their image encoder and noise
augmentation buffers, y computed from unCLIPConditioning's embeddings; SDXL "revision" (the pooled text replaced
by image embeddings). References: diffusers' DDPMScheduler + timestep embedding (StableUnCLIP's noising) and the
tiny files' own random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_serverless.models.checkpoint_files import (
    detect_architecture,
    noise_augmentor_state,
    open_checkpoint,
    open_state_dict,
)
from comfy_serverless.models.clip_vision import Output
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, unclip_checkpoint_configs
from comfy_serverless.models.unclip import squaredcos_alphas_cumprod, unclip_y
from comfy_serverless.networks.build import UNET_PREFIX, build_from_state_dict, build_on_meta
from comfy_serverless.networks.clip import SD2_CLIP_H_PREFIX, CLIPTextConfig, CLIPTextModel, to_openclip_layout
from comfy_serverless.networks.unet import UNetConfig, UNetModel
from conftest import server_context


@pytest.fixture(scope="module")
def unclip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("unclip") / "tiny-unclip.safetensors"
    make_test_checkpoint("sd2_unclip", "tiny", path, seed=4)
    return path


def _output(embeds: torch.Tensor) -> Output:
    out = Output()
    out["image_embeds"] = embeds
    return out


def _entry(embeds, strength=1.0, noise_augmentation=0.0) -> dict:
    return {"clip_vision_output": _output(embeds), "strength": strength, "noise_augmentation": noise_augmentation}


def diffusers_noised(embeds: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
    """StableUnCLIP's image-embedding noising in diffusers (mean 0, std 1): add_noise + level embedding."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import get_timestep_embedding

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    levels = torch.tensor([level] * embeds.shape[0])
    noised = scheduler.add_noise(embeds, noise, levels)
    return torch.cat([noised, get_timestep_embedding(levels, embeds.shape[-1], flip_sin_to_cos=True,
                                                     downscale_freq_shift=0)], dim=1)


# ---- recognising --------------------------------------------------------------------------------------------


def test_tiny_unclip_file_is_recognised_and_loads_strictly(unclip_file):
    parts = open_checkpoint(unclip_file)
    arch = parts.architecture
    unet_config, _, text, vision = unclip_checkpoint_configs()
    assert (arch.family, arch.unclip, arch.prediction, arch.size) == ("sd2", True, "v_prediction", "custom")
    assert arch.unet_config == unet_config and unet_config.adm_in_channels == 2 * vision.projection_dim
    assert "unCLIP" in arch.description and set(arch.text_encoders) == {"clip_h"}
    unet = build_from_state_dict(lambda: UNetModel(arch.unet_config), parts.unet)  # strict: every key used
    assert unet.label_emb[0][0].in_features == 64
    buffers = noise_augmentor_state(open_state_dict(unclip_file))
    assert sorted(buffers) == ["alphas_cumprod", "data_mean", "data_std", "sqrt_alphas_cumprod",
                               "sqrt_one_minus_alphas_cumprod"]
    torch.testing.assert_close(buffers["alphas_cumprod"], squaredcos_alphas_cumprod().float())


def _meta_unclip(adm: int, context: int = 1024) -> dict:
    """A full-size SD2 unCLIP UNet and ViT-H text encoder: names and shapes only."""
    unet = dataclasses.replace(UNetConfig.sd2(), adm_in_channels=adm, context_dim=context)
    weights = {UNET_PREFIX + key: value for key, value in build_on_meta(lambda: UNetModel(unet)).state_dict().items()}
    text = build_on_meta(lambda: CLIPTextModel(CLIPTextConfig.open_clip_h())).state_dict()
    weights.update({SD2_CLIP_H_PREFIX + key: value for key, value in to_openclip_layout(text).items()})
    return weights


@pytest.mark.parametrize("adm", [1536, 2048])  # unclip-l, unclip-h
def test_full_size_unclip_is_recognised_by_shapes(adm):
    arch = detect_architecture(_meta_unclip(adm), {"modelspec.prediction_type": "v"})
    assert (arch.family, arch.unclip, arch.size, arch.prediction) == ("sd2", True, "full", "v_prediction")
    assert arch.unet_config == dataclasses.replace(UNetConfig.sd2(), adm_in_channels=adm)


def test_a_y_of_another_width_without_unclip_parts_is_not_unclip():
    # Neither unCLIP width (1536 / 2048) nor noise_augmentor / embedder keys: read by the SDXL rules instead.
    assert not detect_architecture(_meta_unclip(512), {"modelspec.prediction_type": "v"}).unclip
    with_parts = {**_meta_unclip(512), "noise_augmentor.alphas_cumprod": torch.zeros(1000)}
    assert detect_architecture(with_parts, {"modelspec.prediction_type": "v"}).unclip


# ---- loading and y ------------------------------------------------------------------------------------------


def test_loaded_model_turns_unclip_conditioning_into_y(unclip_file):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        model, clip, vae = load_checkpoint(str(unclip_file))
    assert (model.adm_kind, model.prediction, model.adm_channels) == ("unclip", "v", 64)
    assert clip is not None and vae is not None
    assert torch.equal(model.encode_extra({}, (1, 4, 8, 8))["y"], torch.zeros(1, 64))

    embeds = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    options = {"unclip_conditioning": [_entry(embeds, 1.5, 0.3)]}
    y = model.encode_extra(options, (1, 4, 8, 8), seed=42)["y"]
    assert y.shape == (1, 64)
    torch.testing.assert_close(y, unclip_y(options["unclip_conditioning"], {}, 64, seed=42))
    noise = torch.randn((1, 32), generator=torch.Generator().manual_seed(32))  # sampler seed - 10
    torch.testing.assert_close(y, diffusers_noised(embeds, round(999 * 0.3), noise) * 1.5, atol=1e-5, rtol=1e-5)
    # The augmentation noise follows the sampler's seed.
    assert not torch.allclose(y, model.encode_extra(options, (1, 4, 8, 8), seed=43)["y"])
    torch.testing.assert_close(y, model.encode_extra(options, (1, 4, 8, 8), seed=42)["y"])


def test_unclip_y_refuses_embeddings_of_another_width(unclip_file):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        model = load_checkpoint(str(unclip_file), want_clip=False, want_vae=False)[0]
    options = {"unclip_conditioning": [_entry(torch.zeros(1, 48))]}
    with pytest.raises(ValueError, match="48 wide do not fit this unCLIP model"):
        model.encode_extra(options, (1, 4, 8, 8), seed=0)


def test_checkpoint_image_encoder_matches_its_weights(unclip_file):
    from comfy_serverless.models.loading import load_checkpoint_clip_vision
    from comfy_serverless.models.random_clip_vision import random_clip_vision_weights
    from comfy_serverless.networks.clip_vision import CLIPVisionModel

    vision_config = unclip_checkpoint_configs()[3]
    with server_context(force_fp32=True):
        vision = load_checkpoint_clip_vision(str(unclip_file))
        image = torch.rand(1, 40, 40, 3, generator=torch.Generator().manual_seed(1))
        out = vision.encode_image(image)
    # The file holds random_clip_vision_weights(seed + 1) stored in float16.
    weights = {key: value.half().float() for key, value in random_clip_vision_weights(vision_config, 5).items()}
    reference = build_from_state_dict(lambda: CLIPVisionModel(vision_config), weights, torch.float32)
    from comfy_serverless.models.clip_vision import clip_preprocess

    with torch.no_grad():
        expected = reference(clip_preprocess(image, vision_config.image_size))[2]
    torch.testing.assert_close(out.image_embeds, expected, atol=1e-4, rtol=1e-4)


def test_comfy_sd_returns_the_clip_vision_of_unclip_files_only(unclip_file, tmp_path):
    from comfy_serverless.catalog import comfy_modules

    comfy_modules.install()
    import comfy.sd

    plain = tmp_path / "plain.safetensors"
    make_test_checkpoint("sd15", "tiny", plain)
    with server_context(force_fp32=True):
        model, clip, vae, vision = comfy.sd.load_checkpoint_guess_config(str(unclip_file), output_clipvision=True)
        assert vision is not None and vision.config.projection_dim == 32 and model.adm_kind == "unclip"
        assert comfy.sd.load_checkpoint_guess_config(str(unclip_file))[3] is None  # not asked for
        assert comfy.sd.load_checkpoint_guess_config(str(plain), output_clipvision=True)[3] is None


# ---- SDXL revision ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from comfy_serverless.models.loading import load_checkpoint

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    make_test_checkpoint("sdxl", "tiny", path)
    with server_context(force_fp32=True):
        return load_checkpoint(str(path), want_clip=False, want_vae=False)[0]


def test_sdxl_revision_replaces_the_pooled_text_with_the_image_embedding(sdxl_model):
    from comfy_serverless.models.random_checkpoints import TINY_SDXL_POOLED_DIM as pooled_width

    pooled = torch.randn(1, pooled_width, generator=torch.Generator().manual_seed(2))
    embeds = torch.randn(1, pooled_width, generator=torch.Generator().manual_seed(3))
    text_only = sdxl_model.encode_extra({"pooled_output": pooled}, (1, 4, 8, 8), seed=5)["y"]
    options = {"pooled_output": pooled, "unclip_conditioning": [_entry(embeds, 2.0, 0.2)]}
    revision = sdxl_model.encode_extra(options, (1, 4, 8, 8), seed=5)["y"]
    # Only the pooled part changes; the size embedding after it is the same.
    torch.testing.assert_close(revision[:, pooled_width:], text_only[:, pooled_width:])
    noise = torch.randn((1, pooled_width), generator=torch.Generator().manual_seed(-5))  # seed - 10
    expected = diffusers_noised(embeds, round(999 * 0.2), noise)[:, :pooled_width] * 2.0
    torch.testing.assert_close(revision[:, :pooled_width], expected, atol=1e-5, rtol=1e-5)
    # Two images: summed, then augmented at the merge level 0 (not unCLIP models' 0.05).
    two = dict(options, unclip_conditioning=[_entry(embeds, 1.0, 0.0), _entry(-embeds, 0.5, 0.0)])
    merged = sdxl_model.encode_extra(two, (1, 4, 8, 8), seed=5)["y"][:, :pooled_width]
    torch.testing.assert_close(merged, unclip_y(two["unclip_conditioning"], {}, 2 * pooled_width, 5,
                                                merge_augmentation=0.0)[:, :pooled_width])


def test_sdxl_revision_with_embeddings_of_another_width_is_refused(sdxl_model):
    options = {"pooled_output": torch.zeros(1, 64), "unclip_conditioning": [_entry(torch.zeros(1, 48))]}
    with pytest.raises(ValueError, match="48 wide do not fit this SDXL model's pooled output \\(64\\)"):
        sdxl_model.encode_extra(options, (1, 4, 8, 8), seed=0)
