"""Our LDM-layout UNet against diffusers' UNet2DConditionModel, plus meta-device building."""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from comfy_serverless.models.random_checkpoints import TINY_SDXL_POOLED_DIM, tiny_unet_config
from comfy_serverless.networks.build import (
    UNET_PREFIX,
    build_from_state_dict,
    build_on_meta,
    random_state_dict,
    strip_prefix,
)
from comfy_serverless.networks.unet import (
    UNetConfig,
    UNetModel,
    sdxl_adm_vector,
)


def pooled_width(cfg) -> int:
    return 1280 if cfg.adm_in_channels == 2816 else TINY_SDXL_POOLED_DIM


def size_width(cfg) -> int:
    """The size embedding width, from the conditioning vector's width: pooled text + 6 x size."""
    return (cfg.adm_in_channels - pooled_width(cfg)) // 6

FAMILIES = ["sd15", "sd2", "sdxl"]
# Max abs difference allowed, relative to the largest output magnitude (fp32, different kernels order).
FP32_RELATIVE_TOLERANCE = 1e-4
BF16_RELATIVE_TOLERANCE = 5e-2


@pytest.fixture(autouse=True)
def single_thread():
    # The test machine is shared; one thread keeps timings predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments describing the same network as ``cfg``."""
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    has_attention = [depth > 0 for depth in cfg.transformer_depth]
    # diffusers takes the middle block's depth from the last level, so our configs keep them consistent.
    assert cfg.transformer_depth_middle == max(cfg.transformer_depth[-1], 1)
    config = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        block_out_channels=widths,
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        # diffusers' historical name: this is the number of heads per level.
        attention_head_dim=[cfg.attention_heads(width)[0] for width in widths],
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=[max(depth, 1) for depth in cfg.transformer_depth],
    )
    if cfg.adm_in_channels is not None:
        size_dim = size_width(cfg)
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=size_dim,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    return config


def to_diffusers_state_dict(ours: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    checkpoint = {UNET_PREFIX + key: value for key, value in ours.items()}
    return convert_ldm_unet_checkpoint(checkpoint, config)


def build_pair(cfg: UNetConfig, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = random_state_dict(lambda: UNetModel(cfg), generator=generator, std=0.1, affine_std=0.1)
    ours = build_from_state_dict(lambda: UNetModel(cfg), weights)
    config = diffusers_unet_config(cfg)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.load_state_dict(to_diffusers_state_dict(weights, config), strict=True)
    return ours, reference


def make_inputs(cfg: UNetConfig, height: int, width: int, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
    context = torch.randn(batch, 7, cfg.context_dim, generator=generator)
    timesteps = torch.tensor([10.0, 901.0][:batch])
    extra = {}
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(batch, pooled_width(cfg), generator=generator)
        sizes = torch.tensor([[512.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]] * batch)
        extra = dict(pooled=pooled, sizes=sizes)
    return latents, timesteps, context, extra


def run_both(ours, reference, cfg, latents, timesteps, context, extra):
    y = None
    added = None
    if cfg.adm_in_channels is not None:
        y = sdxl_adm_vector(extra["pooled"], extra["sizes"], size_embed_dim=size_width(cfg))
        added = {"text_embeds": extra["pooled"], "time_ids": extra["sizes"]}
    with torch.inference_mode():
        got = ours(latents, timesteps, context, y=y)
        want = reference(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return got, want


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_unet_matches_diffusers(family):
    cfg = tiny_unet_config(family)
    ours, reference = build_pair(cfg)
    latents, timesteps, context, extra = make_inputs(cfg, 16, 16)
    got, want = run_both(ours, reference, cfg, latents, timesteps, context, extra)
    assert got.shape == want.shape == latents.shape
    assert want.abs().max() > 0.1  # the comparison is meaningful, not two near-zero outputs
    assert relative_error(got, want) < FP32_RELATIVE_TOLERANCE


def test_two_res_blocks_and_odd_latent_size_match_diffusers():
    # Real checkpoints have two res blocks per level; odd sizes exercise the upsample-to-skip-size path.
    cfg = dataclasses.replace(tiny_unet_config("sd15"), num_res_blocks=2)
    ours, reference = build_pair(cfg, seed=3)
    latents, timesteps, context, extra = make_inputs(cfg, 13, 11)
    got, want = run_both(ours, reference, cfg, latents, timesteps, context, extra)
    assert got.shape == latents.shape
    assert relative_error(got, want) < FP32_RELATIVE_TOLERANCE


def test_scalar_timestep_is_broadcast():
    cfg = tiny_unet_config("sd15")
    model = build_from_state_dict(lambda: UNetModel(cfg), random_state_dict(lambda: UNetModel(cfg)))
    latents, _, context, _ = make_inputs(cfg, 8, 8)
    with torch.inference_mode():
        scalar = model(latents, 500.0, context)
        batched = model(latents, torch.tensor([500.0, 500.0]), context)
    torch.testing.assert_close(scalar, batched)


def test_bf16_forward_close_to_fp32():
    cfg = tiny_unet_config("sdxl")
    weights = random_state_dict(lambda: UNetModel(cfg), generator=torch.Generator().manual_seed(5), std=0.1,
                                affine_std=0.1)
    fp32 = build_from_state_dict(lambda: UNetModel(cfg), weights)
    bf16 = build_from_state_dict(lambda: UNetModel(cfg), weights, dtype=torch.bfloat16)
    latents, timesteps, context, extra = make_inputs(cfg, 16, 16)
    y = sdxl_adm_vector(extra["pooled"], extra["sizes"], size_embed_dim=size_width(cfg))
    with torch.inference_mode():
        want = fp32(latents, timesteps, context, y=y)
        got = bf16(latents, timesteps, context, y=y)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < BF16_RELATIVE_TOLERANCE


# Tensor counts under model.diffusion_model. in the released single-file checkpoints.
KNOWN_CHECKPOINT_TENSORS = {"sd15": 686, "sd2": 686, "sdxl": 1680}
KNOWN_PARAMETER_COUNTS = {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_keys_and_shapes_match_checkpoint_layout(family):
    cfg = getattr(UNetConfig, family)()
    ours = build_on_meta(lambda: UNetModel(cfg)).state_dict()
    assert len(ours) == KNOWN_CHECKPOINT_TENSORS[family]
    assert sum(t.numel() for t in ours.values()) == KNOWN_PARAMETER_COUNTS[family]
    # Every one of our keys lands on a diffusers parameter of the same shape, and none is missing.
    config = diffusers_unet_config(cfg)
    converted = to_diffusers_state_dict(ours, config)
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config).state_dict()
    assert set(converted) == set(reference)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_build_from_state_dict_uses_given_tensors_and_converts_only_on_dtype_change():
    cfg = tiny_unet_config("sd15")
    weights = random_state_dict(lambda: UNetModel(cfg), dtype=torch.float16)
    checkpoint = {UNET_PREFIX + key: value for key, value in weights.items()}
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other components are ignored

    same_dtype = build_from_state_dict(lambda: UNetModel(cfg), strip_prefix(checkpoint, UNET_PREFIX),
                                       dtype=torch.float16)
    for name, param in same_dtype.named_parameters():
        assert param.data_ptr() == weights[name].data_ptr(), name
        assert not param.requires_grad
    assert not same_dtype.training

    converted = build_from_state_dict(lambda: UNetModel(cfg), weights, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in converted.parameters())
    assert weights["out.2.weight"].dtype == torch.float16  # the source dict is left alone

    with pytest.raises(RuntimeError):
        build_from_state_dict(lambda: UNetModel(cfg), {k: v for k, v in weights.items() if k != "out.2.bias"})


def test_random_state_dict_scales():
    cfg = tiny_unet_config("sd2")
    weights = random_state_dict(lambda: UNetModel(cfg), dtype=torch.bfloat16,
                                generator=torch.Generator().manual_seed(0))
    assert set(weights) == set(build_on_meta(lambda: UNetModel(cfg)).state_dict())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in weights.values())
    assert torch.equal(weights["out.0.weight"], torch.ones_like(weights["out.0.weight"]))  # GroupNorm scale
    assert torch.equal(weights["middle_block.1.transformer_blocks.0.norm1.weight"],
                       torch.ones_like(weights["middle_block.1.transformer_blocks.0.norm1.weight"]))
    assert not weights["out.0.bias"].any() and not weights["input_blocks.1.0.in_layers.2.bias"].any()
    conv = weights["input_blocks.1.0.in_layers.2.weight"].float()
    assert abs(conv.std().item() - 0.02) < 0.002
    # Same seed, same values, independent of the requested dtype.
    again = random_state_dict(lambda: UNetModel(cfg), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["input_blocks.1.0.in_layers.2.weight"].bfloat16(),
                               weights["input_blocks.1.0.in_layers.2.weight"], rtol=0, atol=0)
