"""The SD x4 upscaler: its UNet against diffusers' (class embedding, cross-attention-only blocks), recognising its
checkpoints, and the extra inputs its MODEL builds (low-res image channels, noise level label)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_serverless.models.checkpoint_files import (
    X4_UPSCALER_UNET,
    CheckpointError,
    detect_architecture,
    open_checkpoint,
)
from comfy_serverless.models.random_checkpoints import make_test_checkpoint, x4_upscaler_configs
from comfy_serverless.networks.build import (
    UNET_PREFIX,
    VAE_PREFIX,
    build_from_state_dict,
    build_on_meta,
    random_state_dict,
)
from comfy_serverless.networks.clip import SD2_CLIP_H_PREFIX, CLIPTextConfig, CLIPTextModel, to_openclip_layout
from comfy_serverless.networks.unet import UNetModel
from comfy_serverless.networks.vae import AutoencoderKL, VAEConfig
from conftest import server_context


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def x4_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("x4") / "tiny-x4.safetensors"
    make_test_checkpoint("sd_x4_upscaler", "tiny", path, seed=3)
    return path


def diffusers_x4_config(cfg) -> dict:
    """UNet2DConditionModel arguments of the x4 upscaler's layout (as its released config sets them)."""
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    attention = [depth > 0 for depth in cfg.transformer_depth]
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,
        use_linear_projection=True, num_class_embeds=cfg.num_classes,
        only_cross_attention=list(cfg.cross_attention_only),
    )


def test_tiny_x4_unet_matches_diffusers():
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg, _, _ = x4_upscaler_configs("tiny")
    weights = random_state_dict(lambda: UNetModel(cfg), generator=torch.Generator().manual_seed(0), std=0.1,
                                affine_std=0.1)
    ours = build_from_state_dict(lambda: UNetModel(cfg), weights)
    config = diffusers_x4_config(cfg)
    theirs = convert_ldm_unet_checkpoint({UNET_PREFIX + key: value for key, value in weights.items()}, config)
    theirs["class_embedding.weight"] = weights["label_emb.weight"]  # the converter knows only MLP label embeddings
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.load_state_dict(theirs, strict=True)
    assert reference.down_blocks[1].attentions[0].transformer_blocks[0].only_cross_attention

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 7, 12, 12, generator=generator)
    context = torch.randn(2, 5, cfg.context_dim, generator=generator)
    timesteps, levels = torch.tensor([20.0, 870.0]), torch.tensor([0, 350])
    with torch.inference_mode():
        got = ours(latents, timesteps, context, y=levels)
        want = reference(latents, timesteps, encoder_hidden_states=context, class_labels=levels).sample
        other_level = ours(latents, timesteps, context, y=torch.tensor([5, 100]))
    assert want.abs().max() > 0.1
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    assert not torch.allclose(got, other_level)  # the label reaches the output
    with pytest.raises(ValueError, match="class labels y"):
        ours(latents, timesteps, context)


def _meta_x4() -> dict:
    """A full-size x4 upscaler file: UNet, ViT-H text encoder and its 4x VAE, names and shapes only."""
    weights = {UNET_PREFIX + k: v for k, v in build_on_meta(lambda: UNetModel(X4_UPSCALER_UNET)).state_dict().items()}
    text = build_on_meta(lambda: CLIPTextModel(CLIPTextConfig.open_clip_h())).state_dict()
    weights.update({SD2_CLIP_H_PREFIX + key: value for key, value in to_openclip_layout(text).items()})
    vae = build_on_meta(lambda: AutoencoderKL(VAEConfig(channel_mult=(1, 2, 4)))).state_dict()
    weights.update({VAE_PREFIX + key: value for key, value in vae.items()})
    return weights


def test_full_size_x4_upscaler_is_recognised_by_shapes():
    arch = detect_architecture(_meta_x4())
    assert (arch.family, arch.x4_upscaler, arch.size, arch.prediction) == ("sd2", True, "full", "v_prediction")
    assert arch.unet_config == X4_UPSCALER_UNET and arch.unet_config.num_classes == 1000
    assert arch.vae_config.downscale_factor == 4 and arch.vae_config.scaling_factor == 0.08333
    assert set(arch.text_encoders) == {"clip_h"} and "x4 upscaler" in arch.description


def test_seven_channels_without_a_noise_level_embedding_are_refused():
    weights = _meta_x4()
    del weights[UNET_PREFIX + "label_emb.weight"]
    with pytest.raises(CheckpointError, match="upscaler model without a noise-level embedding"):
        detect_architecture(weights)


def test_tiny_file_round_trips(x4_file):
    parts = open_checkpoint(x4_file)
    unet, vae, _ = x4_upscaler_configs("tiny")
    assert parts.architecture.x4_upscaler and parts.architecture.unet_config == unet
    assert parts.architecture.vae_config == vae
    build_from_state_dict(lambda: UNetModel(unet), parts.unet)  # strict: every key used


def _diffusers_alphas_cumprod():
    from diffusers import DDPMScheduler

    # The x4 upscaler's low_res_scheduler and scheduler in its diffusers release.
    return DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear").alphas_cumprod


def test_loaded_model_has_the_upscalers_latent_scale_schedule_and_inputs(x4_file):
    from comfy_serverless.models.extra_inputs import X4UpscalerModel
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        model, clip, vae = load_checkpoint(str(x4_file))
    assert isinstance(model, X4UpscalerModel) and model.prediction == "v"
    assert clip is not None and vae.downscale_ratio == 4
    assert model.process_latent_in(torch.ones(1)).item() == pytest.approx(0.08333)
    acp = _diffusers_alphas_cumprod().double()
    want_sigmas = ((1 - acp) / acp) ** 0.5
    torch.testing.assert_close(model.model_sampling.sigmas, want_sigmas.float())

    shape = (2, 4, 6, 8)
    plain = model.encode_extra({}, shape, seed=5)
    assert torch.equal(plain["c_concat"], torch.zeros(2, 3, 6, 8)) and plain["y"].tolist() == [0]

    image = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clean = model.encode_extra({"concat_image": image}, shape, seed=5)
    assert torch.equal(clean["c_concat"], image.expand(2, -1, -1, -1)) and clean["y"].tolist() == [0]

    options = {"concat_image": image, "noise_augmentation": 0.5}
    noised = model.encode_extra(options, shape, seed=42)
    assert noised["y"].tolist() == [175] and noised["y"].dtype == torch.int64
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(32))  # the seed - 10, as ComfyUI
    level_acp = acp[175].float()
    torch.testing.assert_close(noised["c_concat"], (level_acp.sqrt() * image + (1 - level_acp).sqrt() * noise)
                               .expand(2, -1, -1, -1))
    assert not torch.equal(noised["c_concat"], model.encode_extra(options, shape, seed=43)["c_concat"])

    # A low-res image of another size is fitted to the latent (bilinear).
    big = model.encode_extra({"concat_image": torch.ones(1, 3, 12, 16)}, shape)["c_concat"]
    assert big.shape == (2, 3, 6, 8) and torch.allclose(big, torch.ones_like(big))


def test_labels_stay_integers_in_bf16(x4_file):
    from comfy_serverless.models.loading import load_checkpoint

    with server_context(force_fp32=True):
        model, _, _ = load_checkpoint(str(x4_file))
    # A bf16 model (inputs rounded to bf16, the network here computes in float32): 350 is not a bf16 number (it
    # rounds to 352), so the label must reach the embedding as the integer, not cast with the other inputs.
    bf16 = dataclasses.replace(model, dtype=torch.bfloat16)
    unet = model.network()
    x, context = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 48)
    c_concat = torch.zeros(1, 3, 4, 4)
    got = bf16.unet_apply(x, torch.tensor([10.0]), context=context, y=torch.tensor([350]), c_concat=c_concat)
    rounded = torch.cat([x, c_concat], 1).bfloat16().float(), context.bfloat16().float()
    with torch.no_grad():
        want = unet(rounded[0], torch.tensor([10.0]), rounded[1], torch.tensor([350]))
        near = unet(rounded[0], torch.tensor([10.0]), rounded[1], torch.tensor([352]))
    assert torch.equal(got, want) and not torch.equal(got, near)
