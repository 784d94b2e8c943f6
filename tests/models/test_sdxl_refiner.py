"""The SDXL refiner's UNet against diffusers' UNet2DConditionModel (refiner-shaped config), its full-size layout,
and loading a tiny refiner checkpoint."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from comfy_serverless.models.checkpoint_files import open_checkpoint
from comfy_serverless.models.random_checkpoints import TINY_REFINER_TEXT_DIM, make_test_checkpoint, tiny_unet_config
from comfy_serverless.networks.build import UNET_PREFIX, build_from_state_dict, build_on_meta, random_state_dict
from comfy_serverless.networks.clip import SDXLRefinerTextEncoder, load_text_model
from comfy_serverless.networks.unet import UNetConfig, UNetModel, sdxl_adm_vector

REFINER_NUMBERS = 5  # height, width, crop top, crop left, aesthetic score


def diffusers_refiner_config(cfg: UNetConfig, pooled_width: int) -> dict:
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    attention = [depth > 0 for depth in cfg.transformer_depth]
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=[cfg.attention_heads(width)[0] for width in widths],
        use_linear_projection=cfg.use_linear_in_transformer,
        # diffusers' middle block takes the last level's depth; levels without attention ignore theirs.
        transformer_layers_per_block=[cfg.transformer_depth_middle] * len(widths),
        addition_embed_type="text_time", addition_time_embed_dim=(cfg.adm_in_channels - pooled_width) // 5,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
    )


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_tiny_refiner_unet_matches_diffusers():
    cfg = tiny_unet_config("sdxl_refiner")
    assert cfg.transformer_depth[0] == cfg.transformer_depth[-1] == 0  # the refiner's shape
    weights = random_state_dict(lambda: UNetModel(cfg), generator=torch.Generator().manual_seed(0), std=0.1,
                                affine_std=0.1)
    ours = build_from_state_dict(lambda: UNetModel(cfg), weights)
    config = diffusers_refiner_config(cfg, TINY_REFINER_TEXT_DIM)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in weights.items()}, config),
                              strict=True)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, cfg.context_dim, generator=generator)
    pooled = torch.randn(2, TINY_REFINER_TEXT_DIM, generator=generator)
    numbers = torch.tensor([[512.0, 768.0, 0.0, 16.0, 6.0], [1024.0, 1024.0, 8.0, 0.0, 2.5]])
    timesteps = torch.tensor([10.0, 901.0])
    y = sdxl_adm_vector(pooled, numbers, size_embed_dim=config["addition_time_embed_dim"])
    with torch.inference_mode():
        got = ours(latents, timesteps, context, y=y)
        want = reference(latents, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
    assert want.abs().max() > 0.1
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json (the values that set shapes).
RELEASED_DIFFUSERS_CONFIG = dict(
    block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
)


def test_full_refiner_unet_has_the_released_layout():
    ours = build_on_meta(lambda: UNetModel(UNetConfig.sdxl_refiner())).state_dict()
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**RELEASED_DIFFUSERS_CONFIG).state_dict()
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ours.items()}, RELEASED_DIFFUSERS_CONFIG)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert sum(t.numel() for t in ours.values()) == sum(t.numel() for t in reference.values())
    assert ours["label_emb.0.0.weight"].shape == (1536, 2560)


def test_tiny_refiner_checkpoint_loads_and_encodes(tmp_path):
    path = tmp_path / "refiner.safetensors"
    make_test_checkpoint("sdxl_refiner", "tiny", path)
    parts = open_checkpoint(path)
    arch = parts.architecture
    assert (arch.family, arch.description) == ("sdxl_refiner", "SDXL refiner (eps, custom size)")
    assert list(parts.text_encoders) == ["clip_g"] and arch.text_encoders["clip_g"].prefix == \
        "conditioner.embedders.0.model."
    encoder = SDXLRefinerTextEncoder(load_text_model(parts.text_encoders["clip_g"], arch.text_encoders["clip_g"].config,
                                                     dtype=torch.float32))
    window = [(49406, 1.0), (320, 1.0), (49407, 1.0)] + [(0, 1.0)] * 74
    cond, pooled = encoder.encode([window])
    # Penultimate layer without the final norm, as for SDXL's bigG.
    ids = torch.tensor([[token for token, _ in window]])
    hidden, want_pooled = encoder.clip_g(ids, hidden_layer=-2)
    torch.testing.assert_close(cond, hidden.float())
    torch.testing.assert_close(pooled, want_pooled.float())
    unet = build_from_state_dict(lambda: UNetModel(arch.unet_config), parts.unet, dtype=torch.float32)
    y = sdxl_adm_vector(pooled, torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]),
                        (arch.unet_config.adm_in_channels - pooled.shape[1]) // REFINER_NUMBERS)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 500.0, cond, y=y)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
