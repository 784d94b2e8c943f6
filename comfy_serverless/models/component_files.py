"""Model files holding one part of a model: a UNet alone (UNETLoader, models/diffusion_models) and a text encoder
alone (CLIPLoader / DualCLIPLoader, models/text_encoders).

    unet_weights(sd)              LDM-named UNet weights of a file: bare keys, model.diffusion_model.*, or
                                  diffusers' UNet2DConditionModel names (renamed; same tensors)
    open_unet(path)               (Architecture without text encoders or VAE, UNet weights)
    text_encoder_weights(sd, md)  (kind "clip_l" / "clip_h" / "clip_g", weights, CLIPTextConfig) of a file in
                                  transformers' layout (text_model.*, with or without the prefix) or OpenCLIP's
                                  (token_embedding, transformer.resblocks.*), or under a checkpoint's prefix
    open_text_encoder(path)       the same, from a path

Errors are CheckpointErrors naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import torch

from ..networks.build import UNET_PREFIX, build_on_meta, strip_prefix
from ..networks.clip import (
    SD1_CLIP_L_PREFIX,
    SD2_CLIP_H_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    CLIPTextConfig,
)
from ..networks.unet import UNetConfig, UNetModel
from .checkpoint_files import (
    _FULL_TEXT,
    _TEXT_KEYS,
    TEST_CHECKPOINT_METADATA_KEY,
    CheckpointError,
    _not_supported,
    _open,
    _text_config,
    detect_unet,
)

# ---- UNet files --------------------------------------------------------------------------------------

def unet_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's weights under our (LDM) names."""
    if any(key.startswith(UNET_PREFIX) for key in state_dict):
        return strip_prefix(state_dict, UNET_PREFIX)
    if "input_blocks.0.0.weight" in state_dict:
        return dict(state_dict)
    if "conv_in.weight" in state_dict and "down_blocks.0.resnets.0.conv1.weight" in state_dict:
        return _from_diffusers_unet(state_dict)
    raise CheckpointError(_not_supported(state_dict, expected="expected a diffusion model (UNet) on its own"))


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = re.compile(pattern)
    return 1 + max((int(match[1]) for key in state_dict if (match := found.match(key))), default=-1)


def _diffusers_shape_config(state_dict: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The LDM config with diffusers' block structure (the head split does not change any name)."""
    model_channels, in_channels = state_dict["conv_in.weight"].shape[:2]
    levels = _count(state_dict, r"^down_blocks\.(\d+)\.")
    channel_mult = tuple(state_dict[f"down_blocks.{level}.resnets.0.conv1.weight"].shape[0] // model_channels
                         for level in range(levels))
    depths = tuple(_count(state_dict, rf"^down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                   for level in range(levels))
    context = next((value.shape[1] for key, value in state_dict.items() if key.endswith("attn2.to_k.weight")), 768)
    proj_in = next((value for key, value in state_dict.items() if key.endswith("proj_in.weight")), None)
    label = state_dict.get("add_embedding.linear_1.weight")
    return UNetConfig(
        in_channels=in_channels, out_channels=state_dict["conv_out.weight"].shape[0], model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=_count(state_dict, r"^down_blocks\.0\.resnets\.(\d+)\."),
        transformer_depth=depths,
        transformer_depth_middle=_count(state_dict, r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        context_dim=context, num_heads=1, use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
        adm_in_channels=None if label is None else label.shape[1])


def _from_diffusers_unet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names -> ours, through the same block map LoRA loading uses (every one of our weights must be
    found, else the file is not a UNet this server builds)."""
    from .lora import diffusers_unet_name

    try:
        config = _diffusers_shape_config(state_dict)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"a diffusers-layout UNet that is incomplete or unusual ({exc})") from None
    renamed, missing = {}, []
    for name in build_on_meta(lambda: UNetModel(config)).state_dict():
        module, _, leaf = name.rpartition(".")
        theirs = diffusers_unet_name(module, config)
        key = f"{theirs}.{leaf}" if theirs else None
        if key in state_dict:
            renamed[name] = state_dict[key]
        else:
            missing.append(key or name)
    if missing:
        raise CheckpointError(f"a diffusers-layout UNet without {len(missing)} expected weights (e.g. "
                              f"{missing[0]!r}): not an SD1.x/SD2.x/SDXL UNet?")
    return renamed


def open_unet(path: str | os.PathLike):
    """(Architecture, LDM-named UNet weights) of a diffusion_models/ file."""
    state_dict, metadata = _open(path)
    try:
        unet = unet_weights(state_dict)
        return detect_unet(unet, metadata, state_dict), unet
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None


# ---- text encoder files -------------------------------------------------------------------------------

# Where a text encoder's keys may start, most common first.
_TEXT_PREFIXES = ("text_model.", "", SD1_CLIP_L_PREFIX, SDXL_CLIP_L_PREFIX, SD2_CLIP_H_PREFIX, SDXL_CLIP_G_PREFIX,
                  SDXL_REFINER_CLIP_G_PREFIX)
# The released encoders, by width.
TEXT_KINDS_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
TEXT_KIND_NAMES = {"clip_l": "CLIP-L", "clip_h": "OpenCLIP ViT-H", "clip_g": "OpenCLIP ViT-bigG"}
# make-test-checkpoint's text encoder files say which encoder their (tiny) width stands for.
TEST_TEXT_ENCODER_PREFIX = "text-encoder-"


def text_encoder_weights(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                         kind: str | None = None) -> tuple[str, dict[str, torch.Tensor], CLIPTextConfig]:
    """(kind, weights loadable into CLIPTextModel(config), config). ``kind`` when the caller knows it (a
    diffusers pipeline's text_encoder / text_encoder_2), else read from the width."""
    for prefix in _TEXT_PREFIXES:
        if prefix + "embeddings.token_embedding.weight" in state_dict:
            layout = "hf"
            break
        if prefix + "token_embedding.weight" in state_dict:
            layout = "openclip"
            break
    else:
        raise CheckpointError(_not_supported(state_dict, expected="expected a CLIP text encoder (transformers' "
                                                                  "text_model.* or OpenCLIP's layout)"))
    stripped = strip_prefix(state_dict, prefix) if prefix else dict(state_dict)
    weights = {key: value for key, value in stripped.items() if key.startswith(_TEXT_KEYS[layout])}
    width = weights["embeddings.token_embedding.weight" if layout == "hf" else "token_embedding.weight"].shape[1]
    kind = kind or _text_kind(width, metadata or {})
    try:
        config = _text_config(weights, layout, _FULL_TEXT[kind]())
    except KeyError as exc:
        raise CheckpointError(f"the text encoder is incomplete: {exc.args[0]} is missing") from None
    # transformers' CLIPTextModelWithProjection: text_projection.weight [P, width], beside text_model.*
    projection = stripped.get("text_projection.weight", state_dict.get("text_projection.weight"))
    if layout == "hf" and projection is not None and kind != "clip_l":
        # Our model keeps OpenCLIP's [width, P] projection (its loader passes our own names through unchanged).
        weights["text_projection"] = projection.t()
        config = dataclasses.replace(config, layout="openclip", projection_dim=projection.shape[0])
    return kind, weights, config


def _text_kind(width: int, metadata: Mapping[str, str]) -> str:
    if width in TEXT_KINDS_BY_WIDTH:
        return TEXT_KINDS_BY_WIDTH[width]
    stated = metadata.get(TEST_CHECKPOINT_METADATA_KEY, "")
    if stated.startswith(TEST_TEXT_ENCODER_PREFIX) and stated[len(TEST_TEXT_ENCODER_PREFIX):] in TEXT_KIND_NAMES:
        return stated[len(TEST_TEXT_ENCODER_PREFIX):]
    known = ", ".join(f"{name} {width}" for width, name in
                      ((w, TEXT_KIND_NAMES[kind]) for w, kind in TEXT_KINDS_BY_WIDTH.items()))
    raise CheckpointError(f"a text encoder {width} wide, not one of the Stable Diffusion encoders ({known}); "
                          f"T5, Llama and other encoders are not supported")


def open_text_encoder(path: str | os.PathLike, kind: str | None = None
                      ) -> tuple[str, dict[str, torch.Tensor], CLIPTextConfig]:
    state_dict, metadata = _open(path)
    try:
        return text_encoder_weights(state_dict, metadata, kind)
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
