"""CLIP vision, the T2I-Adapter style model and unCLIP's y, against reference implementations.

CLIP vision: transformers' CLIPVisionModelWithProjection with the same weights (both file layouts), and its
CLIPImageProcessor for the image preparation. Style model: a reference built on torch's nn.MultiheadAttention in
the original sequence-first layout. unCLIP: diffusers' DDPMScheduler ("squaredcos_cap_v2") and timestep embedding,
as diffusers' StableUnCLIPImg2ImgPipeline noises image embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from comfy_serverless.models.checkpoint_files import CheckpointError, open_state_dict, read_metadata
from comfy_serverless.models.clip_vision import (
    CLIP_STD,
    UNCLIP_CHECKPOINT_PREFIX,
    Output,
    clip_preprocess,
    detect_clip_vision,
    load_clip_vision,
    load_style_model,
)
from comfy_serverless.models.random_clip_vision import (
    make_test_clip_vision,
    make_test_style_model,
    random_clip_vision_weights,
    tiny_clip_vision_config,
)
from comfy_serverless.models.unclip import NoiseAugmentor, squaredcos_alphas_cumprod, unclip_y
from comfy_serverless.networks.build import build_from_state_dict, build_on_meta
from comfy_serverless.networks.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionModel,
    from_openclip_state_dict,
    to_openclip_state_dict,
)
from comfy_serverless.networks.style_model import StyleAdapter, StyleModelConfig
from conftest import server_context


def hf_model(config: CLIPVisionConfig, weights=None):
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=config.width, intermediate_size=config.mlp_width, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, image_size=config.image_size, patch_size=config.patch_size,
        projection_dim=config.projection_dim, hidden_act=config.activation)
    model = transformers.CLIPVisionModelWithProjection(hf_config).eval()
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    return model


# -- the transformer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", ["hf", "openclip"])
def test_file_loads_and_matches_transformers(tmp_path, activation, layout):
    config = tiny_clip_vision_config(activation)
    path = tmp_path / f"vision-{layout}.safetensors"
    weights = make_test_clip_vision(path, config, layout=layout, seed=3)
    found, loaded = detect_clip_vision(open_state_dict(path), read_metadata(path))
    assert found == config
    ours = build_from_state_dict(lambda: CLIPVisionModel(found), loaded, torch.float32)
    reference = hf_model(config, weights)
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        last, penultimate, embeds = ours(pixels)
    torch.testing.assert_close(last, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(penultimate, expected.hidden_states[-2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds, expected.image_embeds, atol=1e-4, rtol=1e-4)
    assert embeds.abs().mean() > 1e-2  # not a degenerate all-zero comparison


@pytest.mark.parametrize("preset, hf_name, positions", [
    (CLIPVisionConfig.vit_l(), "quick_gelu", 257), (CLIPVisionConfig.vit_l(336), "quick_gelu", 577),
    (CLIPVisionConfig.vit_h(), "gelu", 257), (CLIPVisionConfig.vit_bigg(), "gelu", 257)])
def test_real_sizes_have_transformers_names_and_shapes_and_are_recognised(preset, hf_name, positions):
    ours = {k: v.shape for k, v in build_on_meta(lambda: CLIPVisionModel(preset)).state_dict().items()}
    with torch.device("meta"):
        theirs = {k: v.shape for k, v in hf_model(preset).state_dict().items() if not k.endswith("position_ids")}
    assert ours == theirs
    assert ours["vision_model.embeddings.position_embedding.weight"][0] == positions
    meta_weights = build_on_meta(lambda: CLIPVisionModel(preset)).state_dict()
    assert detect_clip_vision(meta_weights)[0] == preset  # no metadata: activation and heads from the variant
    openclip = to_openclip_state_dict(dict(meta_weights), UNCLIP_CHECKPOINT_PREFIX)
    assert detect_clip_vision(openclip, prefix=UNCLIP_CHECKPOINT_PREFIX)[0] == preset
    assert preset.activation == hf_name


def test_openclip_names_round_trip():
    weights = random_clip_vision_weights(tiny_clip_vision_config(), seed=1)
    openclip = to_openclip_state_dict(weights)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in openclip and "visual.proj" in openclip
    assert openclip["visual.proj"].shape == (64, 32)  # applied as x @ proj
    back = from_openclip_state_dict({**openclip, "logit_scale": torch.ones(())})
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[key], weights[key]) for key in weights)


def test_bad_files_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="not a CLIP vision model"):
        detect_clip_vision({"model.diffusion_model.out.2.weight": torch.zeros(4)})
    weights = random_clip_vision_weights(tiny_clip_vision_config())
    del weights["visual_projection.weight"]
    with pytest.raises(ValueError, match="without its visual projection"):
        detect_clip_vision(weights)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        load_clip_vision(str(text))


# -- preprocessing and encoding ----------------------------------------------------------------------------

def _photo(height: int, width: int) -> np.ndarray:
    small = np.random.default_rng(0).integers(0, 255, (height // 8, width // 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)).copy()


@pytest.mark.parametrize("crop", [True, False])
def test_preprocessing_agrees_with_clip_image_processor(crop):
    photo = _photo(448, 672)
    ours = clip_preprocess(torch.from_numpy(photo).float()[None] / 255, 224, crop=crop)
    if crop:
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224,
                                                                                            "width": 224})
    else:
        processor = transformers.CLIPImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False)
    theirs = torch.as_tensor(np.asarray(processor(images=photo, return_tensors="np")["pixel_values"]))
    levels = (ours - theirs).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert levels.max() <= 1.01 and levels.mean() < 0.3  # torch's antialiased bicubic vs PIL's: 1 level at most


def test_preprocessing_by_hand_at_the_model_size():
    image = torch.tensor([[0.0, 0.5], [1.0, 1.2]])[None, :, :, None].expand(1, 2, 2, 4)  # RGBA, grey
    out = clip_preprocess(image, size=2)  # no resize; alpha dropped; 8-bit quantised; clipped
    expected = (torch.tensor([0.0, 128 / 255, 1.0, 1.0]).reshape(1, 1, 2, 2) - torch.tensor(
        [0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="IMAGE"):
        clip_preprocess(torch.zeros(2, 2, 3))


def test_encode_image_gives_comfyuis_fields(tmp_path):
    config = tiny_clip_vision_config()
    path = tmp_path / "vision.safetensors"
    weights = make_test_clip_vision(path, config, seed=4)
    with server_context(force_fp32=True):
        vision = load_clip_vision(str(path))
    assert vision.dtype == torch.float32 and vision.image_size == 32
    image = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    out = vision.encode_image(image, crop=True)
    assert isinstance(out, Output) and out["image_embeds"] is out.image_embeds
    assert out.last_hidden_state.shape == (2, 17, 64) and out.penultimate_hidden_states.shape == (2, 17, 64)
    assert out.image_embeds.shape == (2, 32) and out.mm_projected is None and len(out.image_sizes) == 2
    with torch.no_grad():
        expected = hf_model(config, weights)(pixel_values=clip_preprocess(image, 32, crop=True))
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=1e-4, rtol=1e-4)
    squashed = vision.encode_image(image, crop=False)
    assert not torch.allclose(squashed.image_embeds, out.image_embeds, atol=1e-4)


# -- style model -------------------------------------------------------------------------------------------

def reference_style(weights: dict, config: StyleModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """The adapter written with torch's nn.MultiheadAttention, sequence first, as the original code."""
    width = config.width
    x = torch.cat([tokens, weights["style_embedding"].expand(tokens.shape[0], -1, -1)], dim=1)
    x = torch.nn.functional.layer_norm(x, (width,), weights["ln_pre.weight"], weights["ln_pre.bias"])
    x = x.permute(1, 0, 2)
    for n in range(config.layers):
        w = {k[len(f"transformer_layes.{n}."):]: v for k, v in weights.items()
             if k.startswith(f"transformer_layes.{n}.")}
        attention = torch.nn.MultiheadAttention(width, config.heads)
        attention.load_state_dict({k[len("attn."):]: v for k, v in w.items() if k.startswith("attn.")})
        h = torch.nn.functional.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False)[0]
        h = torch.nn.functional.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"])
        h = torch.nn.functional.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        x = x + torch.nn.functional.linear(h * torch.sigmoid(1.702 * h), w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)[:, -config.tokens:, :]
    return torch.nn.functional.layer_norm(x, (width,), weights["ln_post.weight"], weights["ln_post.bias"]) @ \
        weights["proj"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_style_model_matches_the_reference(tmp_path, suffix):
    config = StyleModelConfig(width=64, context_dim=32, layers=2, tokens=4)
    path = tmp_path / f"style{suffix}"
    weights = make_test_style_model(path, config, seed=5)
    style = load_style_model(str(path))
    assert style.config == config
    vision = Output()
    vision["last_hidden_state"] = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(2))
    out = style.get_cond(vision)
    with torch.no_grad():
        expected = reference_style(weights, config, vision.last_hidden_state)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert StyleModelConfig.from_state_dict(build_on_meta(lambda: StyleAdapter(StyleModelConfig())).state_dict()) \
        == StyleModelConfig()  # the released model's shapes: 1024 -> 768, 3 layers, 8 tokens


def test_style_model_refuses_other_files_and_widths(tmp_path):
    path = tmp_path / "not-style.safetensors"
    make_test_clip_vision(path)
    with pytest.raises(CheckpointError, match="not a T2I-Adapter style model"):
        load_style_model(str(path))
    style_path = tmp_path / "style.safetensors"
    make_test_style_model(style_path)
    vision = Output()
    vision["last_hidden_state"] = torch.zeros(1, 5, 48)
    with pytest.raises(ValueError, match="64 wide, got 48"):
        load_style_model(str(style_path)).get_cond(vision)


# -- unCLIP y ----------------------------------------------------------------------------------------------

def _vision_output(embeds: torch.Tensor) -> Output:
    out = Output()
    out["image_embeds"] = embeds
    return out


def diffusers_noised(embeds: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' StableUnCLIPImg2ImgPipeline.noise_image_embeddings (mean 0, std 1)."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import get_timestep_embedding

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    levels = torch.tensor([level] * embeds.shape[0])
    noised = scheduler.add_noise(embeds, noise, levels)
    embedding = get_timestep_embedding(levels, embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([noised, embedding], dim=1)


@pytest.mark.parametrize("augmentation", [0.0, 0.3, 1.0])
def test_single_entry_matches_diffusers_noising(augmentation):
    embeds = torch.randn(1, 16, generator=torch.Generator().manual_seed(3))
    entry = {"clip_vision_output": _vision_output(embeds), "strength": 1.5, "noise_augmentation": augmentation}
    y = unclip_y([entry], {}, 32, seed=42)
    noise = torch.randn((1, 16), generator=torch.Generator().manual_seed(32))  # seed - 10, as ComfyUI
    expected = diffusers_noised(embeds, round(999 * augmentation), noise) * 1.5
    assert y.shape == (1, 32)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if augmentation == 0.0:  # level 0 barely noises
        torch.testing.assert_close(y[:, :16], embeds * 1.5, atol=0.05, rtol=0)


def test_several_embeddings_are_weighted_summed_and_noised_again():
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(2, 8, generator=generator), torch.randn(1, 8, generator=generator)
    entries = [{"clip_vision_output": _vision_output(first), "strength": 1.0, "noise_augmentation": 0.1},
               {"clip_vision_output": _vision_output(second), "strength": 0.5, "noise_augmentation": 0.2}]
    y = unclip_y(entries, {}, 16, seed=7, merge_augmentation=0.05)
    draws = torch.Generator()
    parts = []
    for rows, strength, level in ((first, 1.0, 100), (second, 0.5, 200)):
        for row in rows:
            draws.manual_seed(-3)
            parts.append(diffusers_noised(row[None], level, torch.randn((1, 8), generator=draws)) * strength)
    summed = sum(parts)[:, :8]
    expected = diffusers_noised(summed, round(999 * 0.05), torch.randn((1, 8), generator=draws))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_no_unclip_conditioning_is_zeros_and_bad_widths_are_refused():
    assert torch.equal(unclip_y(None, {}, 2048), torch.zeros(1, 2048))
    assert torch.equal(unclip_y([], {}, 1536), torch.zeros(1, 1536))
    entry = {"clip_vision_output": _vision_output(torch.zeros(1, 768)), "strength": 1.0, "noise_augmentation": 0.0}
    with pytest.raises(ValueError, match="768 wide do not fit this unCLIP model"):
        unclip_y([entry], {}, 2048)


def test_checkpoint_buffers_and_statistics_are_used():
    from diffusers import DDPMScheduler

    acp = squaredcos_alphas_cumprod()
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(acp.float(), theirs, atol=1e-6, rtol=1e-5)
    state = {"sqrt_alphas_cumprod": acp.sqrt().float(), "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt().float(),
             "data_mean": torch.full((1, 4), 2.0), "data_std": torch.full((1, 4), 3.0)}
    augmentor = NoiseAugmentor(state, 4)
    embeds, noise = torch.tensor([[2.0, 5.0, -1.0, 8.0]]), torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    z, _ = augmentor(embeds, 500, noise)
    a, b = acp[500].sqrt().item(), (1 - acp[500]).sqrt().item()
    torch.testing.assert_close(z, (a * (embeds - 2) / 3 + b * noise) * 3 + 2)
    with pytest.raises(ValueError, match="statistics are 4 wide"):
        NoiseAugmentor(state, 8)


def test_the_image_encoder_inside_an_unclip_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    config = tiny_clip_vision_config()
    weights = random_clip_vision_weights(config, seed=6)
    stored = {key: value.contiguous()
              for key, value in to_openclip_state_dict(weights, UNCLIP_CHECKPOINT_PREFIX).items()}
    stored["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of the checkpoint is left alone
    stored["embedder.model.logit_scale"] = torch.ones(())
    path = tmp_path / "unclip.safetensors"
    save_file(stored, str(path), metadata={"clip_vision.heads": "4"})
    with server_context(force_fp32=True):
        vision = load_clip_vision(str(path), prefix=UNCLIP_CHECKPOINT_PREFIX)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(config, weights)(pixel_values=clip_preprocess(image, 32))
    torch.testing.assert_close(vision.encode_image(image).image_embeds, expected.image_embeds, atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="not a CLIP vision model"):
        load_clip_vision(str(path))  # without the prefix: no tower at "visual."
