"""Our LDM-layout KL autoencoder against diffusers' AutoencoderKL, plus tiled encode/decode."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from comfy_serverless.models.random_checkpoints import tiny_vae_config
from comfy_serverless.networks.build import VAE_PREFIX, build_from_state_dict, build_on_meta, random_state_dict
from comfy_serverless.networks.vae import AutoencoderKL, VAEConfig, run_tiled

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
    cfg = tiny_vae_config()
    return random_state_dict(lambda: AutoencoderKL(cfg), generator=torch.Generator().manual_seed(seed), std=0.1,
                             affine_std=0.1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def test_tiny_vae_matches_diffusers():
    cfg = tiny_vae_config()
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
    cfg = tiny_vae_config()
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
    cfg = tiny_vae_config()
    vae = build_from_state_dict(lambda: AutoencoderKL(cfg), tiny_weights())
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 20, 14, generator=generator)
    pixels = torch.rand(1, 3, 40, 28, generator=generator) * 2 - 1
    with torch.inference_mode():
        # One tile covering everything is the plain call.
        torch.testing.assert_close(vae.decode_tiled(latents, tile_size=32, overlap=4), vae.decode(latents))
        torch.testing.assert_close(vae.encode_tiled(pixels, tile_size=64, overlap=8), vae.encode(pixels))
        # Small tiles: right shapes; sampling draws its noise once for the whole latent.
        encoded = vae.encode_tiled(pixels, tile_size=16, overlap=8)
        sampled = vae.encode_tiled(pixels, tile_size=16, overlap=8, sample_generator=torch.Generator().manual_seed(1))
        mean, logvar = vae.encode_distribution_tiled(pixels, tile_size=16, overlap=8)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert encoded.shape == sampled.shape == (1, 4, 20, 14)
    torch.testing.assert_close(encoded, mean)
    torch.testing.assert_close(sampled, mean + torch.exp(0.5 * logvar) * noise)
    with pytest.raises(ValueError):
        vae.encode_tiled(pixels[..., :27])


# Tiled decode of the tiny VAE: a 56 x 40 latent in 24-cell tiles overlapping by 8 (stride 16), so the tiles start
# at rows 0, 16, 32 and columns 0, 16, and rows 16-24 and 32-40 and columns 16-24 are where two tiles overlap.
TILE, OVERLAP = 24, 8
ROW_STARTS, COL_STARTS = (0, 16, 32), (0, 16)
# Largest difference from the untiled decode, relative to its largest value, for a tiled decode.  The VAE is not
# local (GroupNorm statistics and the mid-block attention span the whole input), so tiles never reproduce the
# untiled decode exactly; with these random weights the tiled decode is off by 0.20, while stitching the tiles
# without cross-fading gives 0.75 and a decode displaced by one latent cell 1.2 (both checked below).
TILED_DECODE_TOLERANCE = 0.3


def _spans(starts, covered_by):
    """Cells of a 1-D tiling covered by exactly the tiles in ``covered_by`` (indices into ``starts``)."""
    length = starts[-1] + TILE
    return [cell for cell in range(length)
            if {i for i, start in enumerate(starts) if start <= cell < start + TILE} == set(covered_by)]


def test_tiled_decode_is_each_tile_cross_faded_and_close_to_the_untiled_decode():
    vae = build_from_state_dict(lambda: AutoencoderKL(tiny_vae_config()), tiny_weights())
    f = vae.config.downscale_factor
    size = (ROW_STARTS[-1] + TILE, COL_STARTS[-1] + TILE)
    latents = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        tiled = vae.decode_tiled(latents, tile_size=TILE, overlap=OVERLAP)
        full = vae.decode(latents)
        tiles = {(top, left): vae.decode(latents[..., top:top + TILE, left:left + TILE])
                 for top in ROW_STARTS for left in COL_STARTS}
    assert tiled.shape == full.shape

    def pixels(cells):
        return slice(cells[0] * f, (cells[-1] + 1) * f)

    # Where one tile alone covers the latent, the output is that tile's own decode, in its place.
    for i, top in enumerate(ROW_STARTS):
        for j, left in enumerate(COL_STARTS):
            rows, cols = pixels(_spans(ROW_STARTS, [i])), pixels(_spans(COL_STARTS, [j]))
            own = tiles[(top, left)][..., rows.start - top * f:rows.stop - top * f,
                                      cols.start - left * f:cols.stop - left * f]
            torch.testing.assert_close(tiled[..., rows, cols], own, rtol=1e-5, atol=1e-6)

    # Where two tiles side by side overlap, the output cross-fades from the left tile to the right one: at each
    # pixel column it is the same mix of the two for every channel and row, moving from left to right.
    rows = pixels(_spans(ROW_STARTS, [0]))
    cols = pixels(_spans(COL_STARTS, [0, 1]))
    left = tiles[(0, 0)][..., rows, cols]
    right = tiles[(0, COL_STARTS[1])][..., rows, cols.start - COL_STARTS[1] * f:cols.stop - COL_STARTS[1] * f]
    mixed = tiled[..., rows, cols]
    differ = (left - right).abs() > 1e-2
    share = ((mixed - right) / (left - right))  # share of the left tile
    column_shares = []
    for column in range(share.shape[-1]):
        values = share[..., column][differ[..., column]]
        assert values.numel() > 20
        assert float(values.max() - values.min()) < 1e-3, "a column mixes the two tiles unevenly"
        column_shares.append(float(values.mean()))
    assert 0 < column_shares[-1] and column_shares[0] < 1
    assert all(a > b for a, b in zip(column_shares, column_shares[1:])), column_shares

    # And all together it is close to the untiled decode, where wrong tilings are not.
    assert relative_error(tiled, full) < TILED_DECODE_TOLERANCE
    stitched = full.clone()
    for (top, left), tile in tiles.items():
        stitched[..., top * f:(top + TILE) * f, left * f:(left + TILE) * f] = tile
    assert relative_error(stitched, full) > TILED_DECODE_TOLERANCE
    assert relative_error(torch.roll(tiled, shifts=f, dims=-1), full) > TILED_DECODE_TOLERANCE


def test_bf16_close_to_fp32():
    cfg = tiny_vae_config()
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
