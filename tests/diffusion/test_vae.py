"""Our LDM-layout KL autoencoder against diffusers' AutoencoderKL, plus tiled encode/decode."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from comfy_serverless.diffusion.build import VAE_PREFIX, build_from_state_dict, build_on_meta, random_state_dict
from comfy_serverless.diffusion.vae import AutoencoderKL, VAEConfig, run_tiled

# Max abs difference allowed, relative to the largest output magnitude.
FP32_RELATIVE_TOLERANCE = 1e-4
BF16_RELATIVE_TOLERANCE = 5e-2


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    levels = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg.base_channels * mult for mult in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        scaling_factor=cfg.scaling_factor,
    )


def to_diffusers_state_dict(ours: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return convert_ldm_vae_checkpoint({VAE_PREFIX + key: value for key, value in ours.items()}, config)


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = VAEConfig.tiny()
    return random_state_dict(lambda: AutoencoderKL(cfg), generator=torch.Generator().manual_seed(seed), std=0.1,
                             affine_std=0.1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def test_tiny_vae_matches_diffusers():
    cfg = VAEConfig.tiny()
    weights = tiny_weights()
    ours = build_from_state_dict(lambda: AutoencoderKL(cfg), weights)
    config = diffusers_vae_config(cfg)
    reference = diffusers.AutoencoderKL(**config).eval()
    reference.load_state_dict(to_diffusers_state_dict(weights, config), strict=True)

    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 24, 16, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 6, 5, generator=generator)
    with torch.inference_mode():
        mean, logvar = ours.encode_distribution(pixels)
        distribution = reference.encode(pixels).latent_dist
        decoded = ours.decode(latents)
        want_decoded = reference.decode(latents).sample
        assert torch.equal(ours.encode(pixels), mean)

    assert mean.shape == (2, 4, 12, 8)
    assert decoded.shape == want_decoded.shape == (2, 3, 12, 10)
    assert relative_error(mean, distribution.mean) < FP32_RELATIVE_TOLERANCE
    assert relative_error(logvar, distribution.logvar) < FP32_RELATIVE_TOLERANCE
    assert relative_error(decoded, want_decoded) < FP32_RELATIVE_TOLERANCE


def test_full_size_keys_and_shapes_match_checkpoint_layout():
    cfg = VAEConfig.sd()
    ours = build_on_meta(lambda: AutoencoderKL(cfg)).state_dict()
    assert len(ours) == 248  # tensors under first_stage_model. in SD 1.x/2.x/SDXL checkpoints
    assert sum(t.numel() for t in ours.values()) == 83_653_863
    # The mid-block attention keeps the checkpoint's 1x1-conv storage shape.
    assert ours["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    config = diffusers_vae_config(cfg)
    converted = to_diffusers_state_dict(ours, config)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config).state_dict()
    assert set(converted) == set(reference)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_scaling_factors():
    assert VAEConfig.sd().scaling_factor == 0.18215
    assert VAEConfig.sdxl().scaling_factor == 0.13025
    assert VAEConfig.sd().downscale_factor == 8


def test_sampling_uses_generator():
    cfg = VAEConfig.tiny()
    vae = build_from_state_dict(lambda: AutoencoderKL(cfg), tiny_weights())
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        first = vae.encode(pixels, sample_generator=torch.Generator().manual_seed(7))
        second = vae.encode(pixels, sample_generator=torch.Generator().manual_seed(7))
        mean = vae.encode(pixels)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, mean)


@pytest.mark.parametrize("tile, overlap", [(4, 1), (5, 2), (3, 0), (16, 4)])
def test_run_tiled_blends_to_the_untiled_result(tile, overlap):
    # Functions that commute with cropping must come out exactly as if untiled, whatever the tiling.
    latents = torch.randn(2, 4, 11, 9, generator=torch.Generator().manual_seed(3))
    upscaled = run_tiled(lambda t: F.interpolate(t, scale_factor=4, mode="nearest"), latents, tile, overlap,
                         in_per_cell=1, out_per_cell=4)
    torch.testing.assert_close(upscaled, F.interpolate(latents, scale_factor=4, mode="nearest"))
    pixels = torch.randn(1, 3, 44, 36, generator=torch.Generator().manual_seed(4))
    pooled = run_tiled(lambda t: F.avg_pool2d(t, 4), pixels, tile, overlap, in_per_cell=4, out_per_cell=1)
    torch.testing.assert_close(pooled, F.avg_pool2d(pixels, 4))


def test_tiled_decode_and_encode():
    cfg = VAEConfig.tiny()
    vae = build_from_state_dict(lambda: AutoencoderKL(cfg), tiny_weights())
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 20, 14, generator=generator)
    pixels = torch.rand(1, 3, 40, 28, generator=generator) * 2 - 1
    with torch.inference_mode():
        # One tile covering everything is the plain call.
        torch.testing.assert_close(vae.decode_tiled(latents, tile_size=32, overlap=4), vae.decode(latents))
        torch.testing.assert_close(vae.encode_tiled(pixels, tile_size=64, overlap=8), vae.encode(pixels))
        # Small tiles: right shape, finite, and (the model is local but for mid attention) near the full result.
        decoded = vae.decode_tiled(latents, tile_size=8, overlap=4)
        encoded = vae.encode_tiled(pixels, tile_size=16, overlap=8)
        sampled = vae.encode_tiled(pixels, tile_size=16, overlap=8, sample_generator=torch.Generator().manual_seed(1))
        full_decoded = vae.decode(latents)
    assert decoded.shape == full_decoded.shape and torch.isfinite(decoded).all()
    assert encoded.shape == sampled.shape == (1, 4, 20, 14) and torch.isfinite(encoded).all()
    assert relative_error(decoded, full_decoded) < 1.0
    with pytest.raises(ValueError):
        vae.encode_tiled(pixels[..., :27])


def test_bf16_close_to_fp32():
    cfg = VAEConfig.tiny()
    weights = tiny_weights(seed=6)
    fp32 = build_from_state_dict(lambda: AutoencoderKL(cfg), weights)
    bf16 = build_from_state_dict(lambda: AutoencoderKL(cfg), weights, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(8)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.inference_mode():
        got_latents, want_latents = bf16.encode(pixels), fp32.encode(pixels)
        got_pixels, want_pixels = bf16.decode(latents), fp32.decode(latents)
    assert got_latents.dtype == got_pixels.dtype == torch.bfloat16
    assert relative_error(got_latents, want_latents) < BF16_RELATIVE_TOLERANCE
    assert relative_error(got_pixels, want_pixels) < BF16_RELATIVE_TOLERANCE
