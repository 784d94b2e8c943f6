"""Our ControlNet and T2I-Adapter networks against diffusers' ControlNetModel and T2IAdapter on small configs.

The same random weights go into both (converted by our own key maps), the same inputs, outputs equal to ~1e-4.
"""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch

from comfy_serverless.models.controlnets import controlnet_config, diffusers_to_original, original_to_diffusers
from comfy_serverless.models.random_checkpoints import TINY_SDXL_POOLED_DIM
from comfy_serverless.models.random_controlnets import (
    _adapter_to_diffusers,
    random_controlnet_weights,
    tiny_adapter_config,
    tiny_controlnet_config,
)
from comfy_serverless.models.t2i_adapters import adapter_config, to_original_names
from comfy_serverless.networks.build import build_from_state_dict, build_on_meta, random_state_dict
from comfy_serverless.networks.controlnet import ControlNetConfig, ControlNetModel
from comfy_serverless.networks.t2i_adapter import T2IAdapter
from comfy_serverless.networks.unet import UNetConfig, sdxl_adm_vector

FAMILIES = ["sd15", "sd2", "sdxl"]
FP32_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def size_width(cfg: UNetConfig) -> int:
    pooled = 1280 if cfg.adm_in_channels == 2816 else TINY_SDXL_POOLED_DIM
    return (cfg.adm_in_channels - pooled) // 6


def diffusers_controlnet_config(config: ControlNetConfig) -> dict:
    cfg = config.unet
    widths = [cfg.model_channels * mult for mult in cfg.channel_mult]
    has_attention = [depth > 0 for depth in cfg.transformer_depth]
    args = dict(
        in_channels=cfg.in_channels, conditioning_channels=config.hint_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=[cfg.attention_heads(width)[0] for width in widths],  # diffusers' name for heads
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=[max(depth, 1) for depth in cfg.transformer_depth],
        conditioning_embedding_out_channels=config.hint_block_channels,
    )
    if cfg.adm_in_channels is not None:
        args.update(addition_embed_type="text_time", addition_time_embed_dim=size_width(cfg),
                    projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return args


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def controlnet_pair(config: ControlNetConfig, seed: int = 0):
    weights = random_controlnet_weights(config, seed)
    ours = build_from_state_dict(lambda: ControlNetModel(config), weights)
    reference = diffusers.ControlNetModel(**diffusers_controlnet_config(config)).eval()
    reference.load_state_dict(original_to_diffusers(weights, config), strict=True)
    return weights, ours, reference


def run_both(config: ControlNetConfig, ours, reference, height: int, width: int, seed: int = 1):
    cfg = config.unet
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, cfg.in_channels, height, width, generator=generator)
    hint = torch.rand(2, config.hint_channels, height * 8, width * 8, generator=generator)
    context = torch.randn(2, 7, cfg.context_dim, generator=generator)
    timesteps = torch.tensor([10.0, 901.0])
    y = added = None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(2, TINY_SDXL_POOLED_DIM, generator=generator)
        sizes = torch.tensor([[512.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]] * 2)
        y = sdxl_adm_vector(pooled, sizes, size_width(cfg))
        added = {"text_embeds": pooled, "time_ids": sizes}
    with torch.inference_mode():
        got = ours(latents, hint, timesteps, context, y)
        down, mid = reference(latents, timesteps, encoder_hidden_states=context, controlnet_cond=hint,
                              added_cond_kwargs=added, return_dict=False)
    return got, list(down), mid


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_controlnet_matches_diffusers(family):
    config = tiny_controlnet_config(family)
    _, ours, reference = controlnet_pair(config)
    got, down, mid = run_both(config, ours, reference, 8, 8)
    assert len(got["output"]) == len(down) == len(ours.input_blocks)
    for mine, theirs in zip(got["output"] + got["middle"], down + [mid]):
        assert mine.shape == theirs.shape
        assert theirs.abs().max() > 0.01  # a meaningful comparison
        assert relative_error(mine, theirs) < FP32_RELATIVE_TOLERANCE


def test_two_res_blocks_full_hint_encoder_and_odd_latent_match_diffusers():
    # The released hint encoder widths, two res blocks per level, a latent size that is not a power of two.
    unet = dataclasses.replace(tiny_controlnet_config("sd15").unet, num_res_blocks=2)
    config = ControlNetConfig(unet)
    _, ours, reference = controlnet_pair(config, seed=3)
    got, down, mid = run_both(config, ours, reference, 6, 10)
    assert got["output"][0].shape[-2:] == (6, 10)
    for mine, theirs in zip(got["output"] + got["middle"], down + [mid]):
        assert relative_error(mine, theirs) < FP32_RELATIVE_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_layout_maps_back_and_config_is_read_from_shapes(family):
    config = tiny_controlnet_config(family)
    weights = random_controlnet_weights(config, seed=2)
    converted = original_to_diffusers(weights, config)
    reference = diffusers.ControlNetModel(**diffusers_controlnet_config(config))
    assert set(converted) == set(reference.state_dict())  # every diffusers key, none extra
    back = diffusers_to_original(converted)
    assert back.keys() == weights.keys() and all(back[k] is weights[k] for k in weights)
    detected, detected_family = controlnet_config(back)
    assert detected == config and detected_family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_controlnet_keys_and_shapes_match_diffusers(family):
    config = ControlNetConfig(getattr(UNetConfig, family)())
    ours = build_on_meta(lambda: ControlNetModel(config)).state_dict()
    converted = original_to_diffusers(ours, config)
    with torch.device("meta"):
        reference = diffusers.ControlNetModel(**diffusers_controlnet_config(config)).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert controlnet_config(ours) == (config, family)


def test_sdxl_controlnet_needs_y():
    config = tiny_controlnet_config("sdxl")
    model = build_from_state_dict(lambda: ControlNetModel(config), random_controlnet_weights(config))
    with pytest.raises(ValueError, match="conditioning vector y"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64), 1.0, torch.zeros(1, 7, config.unet.context_dim))


# ---- T2I-Adapters -------------------------------------------------------------------------------------

ADAPTER_CASES = {
    "full": (tiny_adapter_config("full"), "full_adapter", 8),
    "full-xl": (tiny_adapter_config("full", xl=True), "full_adapter_xl", 16),
    "light": (tiny_adapter_config("light"), "light_adapter", 8),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_t2i_adapter_matches_diffusers(case):
    config, adapter_type, downscale = ADAPTER_CASES[case]
    weights = random_state_dict(lambda: T2IAdapter(config), generator=torch.Generator().manual_seed(4), std=0.1,
                                affine_std=0.1)
    ours = build_from_state_dict(lambda: T2IAdapter(config), weights)
    # diffusers' light adapter repeats its last width for one more level, so it is given one width fewer.
    channels = list(config.channels[:-1] if config.kind == "light" else config.channels)
    reference = diffusers.T2IAdapter(in_channels=config.in_channels, channels=channels,
                                     num_res_blocks=config.res_blocks, downscale_factor=downscale,
                                     adapter_type=adapter_type).eval()
    diffusers_weights = _adapter_to_diffusers(weights, config)
    reference.load_state_dict(diffusers_weights, strict=True)
    # Our own reading of the diffusers names gives back the original ones, and the config from the shapes.
    assert to_original_names(diffusers_weights).keys() == weights.keys()
    assert adapter_config(weights) == config
    hint = torch.rand(2, config.in_channels, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = ours.features(hint)
        want = reference(hint)
    assert len(got) == len(want) == 4
    for mine, theirs in zip(got, want):
        assert mine.shape == theirs.shape
        assert relative_error(mine, theirs) < FP32_RELATIVE_TOLERANCE


def test_t2i_adapter_outputs_land_on_the_unet_blocks():
    config = tiny_adapter_config("full")
    model = build_from_state_dict(lambda: T2IAdapter(config), random_state_dict(lambda: T2IAdapter(config)))
    out = model(torch.rand(1, 3, 64, 64))
    # SD1.x: 12 input blocks; features after blocks 2, 5, 8, 11 (popped from the end).
    order = out["input"][::-1]
    assert [i for i, f in enumerate(order) if f is not None] == [2, 5, 8, 11] and "middle" not in out
    assert [order[i].shape[1:] for i in (2, 5, 8, 11)] == [(32, 8, 8), (64, 4, 4), (64, 2, 2), (64, 1, 1)]
    xl = tiny_adapter_config("full", xl=True)
    model = build_from_state_dict(lambda: T2IAdapter(xl), random_state_dict(lambda: T2IAdapter(xl)))
    out = model(torch.rand(1, 3, 128, 128))
    order = out["input"][::-1]
    # SDXL: 9 input blocks; after 3 (first downsample), 5, 8; the deepest level in the middle.
    assert [i for i, f in enumerate(order) if f is not None] == [3, 5, 8] and len(order) == 10
    assert [order[i].shape[1:] for i in (3, 5, 8)] == [(32, 8, 8), (64, 8, 8), (64, 4, 4)]
    assert out["middle"][0].shape[1:] == (64, 4, 4)


# ---- union ControlNets (ControlNet++) -----------------------------------------------------------------

def union_pair(types: int = 8):
    config = tiny_controlnet_config("sdxl", union_types=types)
    weights = random_controlnet_weights(config, seed=6)
    union = build_from_state_dict(lambda: ControlNetModel(config), weights)
    return config, weights, union


def folded_plain(config, weights, emb_offset, hint_offset):
    """A plain ControlNet with the union parts' contributions folded into two biases: the type embedding into
    the time MLP's output bias, the per-channel hint offset into the hint encoder's last bias."""
    plain_config = dataclasses.replace(config, union_types=0)
    last = f"input_hint_block.{4 * len(config.hint_block_channels) - 2}.bias"
    plain = {k: v.clone() for k, v in weights.items() if k in build_on_meta(
        lambda: ControlNetModel(plain_config)).state_dict()}
    plain["time_embed.2.bias"] += emb_offset
    plain[last] += hint_offset
    return build_from_state_dict(lambda: ControlNetModel(plain_config), plain)


def type_embedding_by_hand(weights, types: int, chosen: list[int]) -> torch.Tensor:
    one_hot = torch.zeros(types)
    one_hot[chosen] = 1.0
    half = 128
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    angles = one_hot[:, None] * freqs[None]
    sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).reshape(-1)
    hidden = torch.nn.functional.silu(sinusoid @ weights["control_add_embedding.linear_1.weight"].T
                                      + weights["control_add_embedding.linear_1.bias"])
    return hidden @ weights["control_add_embedding.linear_2.weight"].T + weights["control_add_embedding.linear_2.bias"]


def hint_offset_by_hand(weights, features: torch.Tensor, chosen: int) -> torch.Tensor:
    F = torch.nn.functional
    width = features.shape[1]
    token = features.mean(dim=(2, 3))[0] + weights["task_embedding"][chosen]
    block = "transformer_layes.0."

    def linear(x, name, rows=slice(None)):
        return x @ weights[f"{block}{name}.weight"][rows].T + weights[f"{block}{name}.bias"][rows]

    normed = F.layer_norm(token, (width,), weights[block + "ln_1.weight"], weights[block + "ln_1.bias"])
    value = linear(normed, "attn.in_proj", slice(2 * width, 3 * width))  # one token: attention returns its value
    token = token + linear(value, "attn.out_proj")
    normed = F.layer_norm(token, (width,), weights[block + "ln_2.weight"], weights[block + "ln_2.bias"])
    hidden = linear(normed, "mlp.c_fc")
    token = token + linear(hidden * torch.sigmoid(1.702 * hidden), "mlp.c_proj")
    return token @ weights["spatial_ch_projs.weight"].T + weights["spatial_ch_projs.bias"]


@pytest.mark.parametrize("chosen", [[3], []])
def test_union_controlnet_equals_plain_one_with_its_offsets_by_hand(chosen):
    config, weights, union = union_pair()
    generator = torch.Generator().manual_seed(8)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    context = torch.randn(2, 7, config.unet.context_dim, generator=generator)
    y = torch.randn(2, config.unet.adm_in_channels, generator=generator)
    timesteps = torch.tensor([50.0, 700.0])
    with torch.inference_mode():
        features = union.input_hint_block(hint)
        emb_offset = type_embedding_by_hand(weights, 8, chosen)
        hint_offset = hint_offset_by_hand(weights, features, chosen[0]) if chosen else torch.zeros(features.shape[1])
        want = folded_plain(config, weights, emb_offset, hint_offset)(latents, hint, timesteps, context, y)
        got = union(latents, hint, timesteps, context, y, control_type=chosen)
        plain = union(latents, hint, timesteps, context, y, control_type=[5])
    for mine, theirs in zip(got["output"] + got["middle"], want["output"] + want["middle"]):
        assert relative_error(mine, theirs) < FP32_RELATIVE_TOLERANCE
    assert relative_error(got["middle"][0], plain["middle"][0]) > 1e-3  # the type matters


def test_union_controlnet_rejects_unknown_types_and_maps_to_diffusers_names():
    config, weights, union = union_pair(types=6)
    with pytest.raises(ValueError, match="control type 7 is out of range"):
        union(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64), 1.0, torch.zeros(1, 7, 64),
              torch.zeros(1, config.unet.adm_in_channels), control_type=[7])
    back = diffusers_to_original(original_to_diffusers(weights, config))
    assert back.keys() == weights.keys() and controlnet_config(back) == (config, "sdxl")
    # Full size: every key and shape of diffusers' ControlNetUnionModel (its type embedding is 256 wide only when
    # its size embedding is, as in SDXL).
    full = ControlNetConfig(UNetConfig.sdxl(), union_types=6)
    converted = original_to_diffusers(build_on_meta(lambda: ControlNetModel(full)).state_dict(), full)
    args = diffusers_controlnet_config(full)
    args.update(num_control_type=6, conditioning_embedding_out_channels=full.hint_block_channels)
    with torch.device("meta"):
        reference = diffusers.ControlNetUnionModel(**args).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
