"""Random-weight model files in the original layouts: checkpoints, VAEs and LoRAs.

Tiny checkpoints (a few MB, well under a second) are for tests; full ones have the real architecture sizes
(SD1.5: about 2.1 GB in fp16) and compute exactly as fast as trained weights, for benchmarks. Files are
written tensor by tensor, so memory holds one tensor at a time, never the whole checkpoint.

    comfy-serverless make-test-checkpoint --arch sd15 --size tiny out.safetensors

make_test_checkpoint("sd2_unclip", "tiny", path) writes a tiny SD 2.1 unCLIP file: the SD2 UNet with a y input for
image embeddings, a tiny CLIP vision tower under embedder.model.visual. and the noise_augmentor.* buffers;
"sd_x4_upscaler" (tiny or full) an SD x4 upscaler: 7-channel UNet with a noise-level label_emb, 4x VAE.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..networks.build import UNET_PREFIX, VAE_PREFIX, build_on_meta
from ..networks.clip import (
    SD1_CLIP_L_PREFIX,
    SD2_CLIP_H_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    CLIPTextConfig,
    CLIPTextModel,
    to_openclip_key,
)
from ..networks.unet import UNetConfig, UNetModel
from ..networks.vae import AutoencoderKL, VAEConfig
from .checkpoint_files import PREDICTION_METADATA_KEY, TEST_CHECKPOINT_METADATA_KEY
from .lora import diffusers_unet_name

ARCHES = ("sd15", "sd2", "sd2-v", "sdxl", "sdxl_refiner")
# unCLIP (tiny only) is made by make_test_checkpoint too, but is not one of the plain ARCHES tests iterate.
UNCLIP_ARCH = "sd2_unclip"
X4_UPSCALER_ARCH = "sd_x4_upscaler"
# UNet input channels: 4 (plain), 9 (inpainting: + mask + masked image), 8 (instruct-pix2pix: + image).
UNET_IN_CHANNELS = (4, 8, 9)
SIZES = ("tiny", "full")
LORA_LAYOUTS = ("kohya", "kohya-ldm", "diffusers")
WEIGHT_STD = 0.02
# Noise on biases and norm scales, so tests exercise them.
AFFINE_STD = 0.02
# sd2-v: the bias ComfyUI inspects to tell SD2 v from eps gets a std above its 0.09 threshold, so ComfyUI
# (which ignores our metadata) also treats the file as v-prediction.
V_MODEL_BIAS_STD = 0.15
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


# The tiny SDXL config's conditioning vector: pooled text of this width plus six sizes embedded this wide.
TINY_SDXL_POOLED_DIM = 64
_TINY_SDXL_SIZE_DIM = 32
# The refiner's y: pooled text, then height, width, crop top, crop left and aesthetic score. Its text is narrower
# than the tiny base's, so conditioning encoded for the other model fails clearly instead of running.
_REFINER_NUMBERS = 5
TINY_REFINER_TEXT_DIM = 48


def tiny_unet_config(family: str) -> UNetConfig:
    """A few-channel UNet with the block types and key structure of ``family``, for tests.

    Detection reads these as a "custom" size and, as for any size it does not know, applies the family's head
    rule (SD1 8 heads, SD2/SDXL 64-wide heads); the configs follow that rule so a tiny file round-trips. SD2 needs
    64 channels on its first level for one 64-wide head there (and stays 64 wide on the next to keep files small).
    """
    if family == "sd15":
        return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                          context_dim=32, num_heads=8)
    if family == "sd2":
        return UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                          context_dim=48, num_heads=None, num_head_channels=64, use_linear_in_transformer=True)
    if family == "sdxl":
        return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2),
                          transformer_depth_middle=2, context_dim=64, num_heads=None, num_head_channels=64,
                          use_linear_in_transformer=True,
                          adm_in_channels=TINY_SDXL_POOLED_DIM + 6 * _TINY_SDXL_SIZE_DIM)
    if family == "sdxl_refiner":
        # Like the real refiner: no attention on the first and last levels.
        return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 0),
                          transformer_depth_middle=1, context_dim=TINY_REFINER_TEXT_DIM, num_heads=None,
                          num_head_channels=64, use_linear_in_transformer=True,
                          adm_in_channels=TINY_REFINER_TEXT_DIM + _REFINER_NUMBERS * _TINY_SDXL_SIZE_DIM)
    raise ValueError(f"unknown UNet family {family!r}; expected sd15, sd2, sdxl or sdxl_refiner")


def tiny_vae_config() -> VAEConfig:
    """Two levels of 32/64 channels: every block type and key pattern, for tests."""
    return VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)


def tiny_clip_config(layout: str = "hf", width: int = 32, projection_dim: int | None = None,
                     heads: int | None = None) -> CLIPTextConfig:
    """Three layers with the key structure of the full text encoders, for tests. ``heads`` defaults to the rule
    detection applies to text encoders of sizes it does not know: one head per 64 channels, at least one."""
    activation = "quick_gelu" if layout == "hf" else "gelu"
    if layout == "openclip" and projection_dim is None:
        projection_dim = width
    return CLIPTextConfig(width=width, layers=3, heads=heads or max(1, width // 64), mlp_width=2 * width,
                          activation=activation, layout=layout, projection_dim=projection_dim)


def family_of(arch: str) -> str:
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    return "sd2" if arch.startswith("sd2") else arch


def checkpoint_configs(arch: str, size: str, in_channels: int = 4
                       ) -> tuple[UNetConfig, VAEConfig, dict[str, tuple[str, CLIPTextConfig]]]:
    """(UNet config, VAE config, {encoder name: (key prefix, config)}) of a test checkpoint; ``in_channels`` 9 or
    8 makes its UNet an inpainting or instruct-pix2pix one."""
    family = family_of(arch)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected tiny or full")
    if in_channels not in UNET_IN_CHANNELS:
        raise ValueError(f"unknown UNet input channels {in_channels}; expected one of {UNET_IN_CHANNELS}")
    if size == "full":
        unet = {"sd15": UNetConfig.sd15, "sd2": UNetConfig.sd2, "sdxl": UNetConfig.sdxl,
                "sdxl_refiner": UNetConfig.sdxl_refiner}[family]()
        vae = VAEConfig.sdxl() if family.startswith("sdxl") else VAEConfig.sd()
        text = {"sd15": {"clip_l": (SD1_CLIP_L_PREFIX, CLIPTextConfig.clip_l())},
                "sd2": {"clip_h": (SD2_CLIP_H_PREFIX, CLIPTextConfig.open_clip_h())},
                "sdxl": {"clip_l": (SDXL_CLIP_L_PREFIX, CLIPTextConfig.clip_l()),
                         "clip_g": (SDXL_CLIP_G_PREFIX, CLIPTextConfig.open_clip_bigg())},
                "sdxl_refiner": {"clip_g": (SDXL_REFINER_CLIP_G_PREFIX, CLIPTextConfig.open_clip_bigg())}}[family]
        return replace(unet, in_channels=in_channels), vae, text
    unet = replace(tiny_unet_config(family), in_channels=in_channels)
    # Tiny encoders keep the real vocabulary (49408) and 77 positions, so real token ids work.
    if family == "sd15":
        text = {"clip_l": (SD1_CLIP_L_PREFIX, tiny_clip_config("hf", width=unet.context_dim))}
    elif family == "sd2":
        text = {"clip_h": (SD2_CLIP_H_PREFIX, tiny_clip_config("openclip", width=unet.context_dim))}
    elif family == "sdxl_refiner":
        text = {"clip_g": (SDXL_REFINER_CLIP_G_PREFIX, tiny_clip_config("openclip", width=unet.context_dim))}
    else:
        width_l = 32
        text = {"clip_l": (SDXL_CLIP_L_PREFIX, tiny_clip_config("hf", width=width_l)),
                "clip_g": (SDXL_CLIP_G_PREFIX, tiny_clip_config("openclip", width=unet.context_dim - width_l,
                                                              projection_dim=TINY_SDXL_POOLED_DIM))}
    return unet, tiny_vae_config(), text


# ---- what to write ---------------------------------------------------------------------------------


@dataclass
class _Spec:
    """One tensor to write and how to fill it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: str  # "normal", "ones", "zeros", "arange", "logit_scale" or "given"
    std: float = 0.0  # of the values ("normal") or of the noise added to ones / zeros
    value: torch.Tensor | None = None  # "given": the tensor itself

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def _module_specs(prefix: str, build: Callable[[], nn.Module], dtype: torch.dtype) -> list[_Spec]:
    """Every parameter of the model (built on meta: names and shapes only), filled as build.random_state_dict
    does: weights normal, biases 0 and norm scales 1 plus a little noise."""
    specs = []
    for module_name, module in build_on_meta(build).named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{prefix}{module_name}.{param_name}" if module_name else f"{prefix}{param_name}"
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and param_name == "weight":
                specs.append(_Spec(name, tuple(param.shape), dtype, "ones", AFFINE_STD))
            elif param_name == "bias":
                specs.append(_Spec(name, tuple(param.shape), dtype, "zeros", AFFINE_STD))
            else:
                specs.append(_Spec(name, tuple(param.shape), dtype, "normal", WEIGHT_STD))
    return specs


def _checkpoint_specs(arch: str, size: str, dtype: torch.dtype, in_channels: int = 4) -> list[_Spec]:
    unet_config, vae_config, text = checkpoint_configs(arch, size, in_channels)
    specs = _module_specs(UNET_PREFIX, lambda: UNetModel(unet_config), dtype)
    if arch == "sd2-v":
        biases = [spec for spec in specs if spec.name.endswith(".1.transformer_blocks.0.norm1.bias")
                  and spec.name.startswith(UNET_PREFIX + "output_blocks.")]
        # The last output block with a transformer, the one checkpoint_files._prediction reads.
        max(biases, key=lambda spec: int(spec.name[len(UNET_PREFIX):].split(".")[1])).std = V_MODEL_BIAS_STD
    specs += _module_specs(VAE_PREFIX, lambda: AutoencoderKL(vae_config), dtype)
    for prefix, config in text.values():
        text_specs = _module_specs(prefix, lambda config=config: CLIPTextModel(config), dtype)
        specs += _openclip_specs(text_specs, prefix) if config.layout == "openclip" else text_specs
        # Extras real files carry and loaders must ignore.
        if config.layout == "hf":
            specs.append(_Spec(prefix + "embeddings.position_ids", (1, config.context_length), torch.int64, "arange"))
        else:
            specs.append(_Spec(prefix + "logit_scale", (), dtype, "logit_scale"))
    return specs


def _openclip_specs(specs: list[_Spec], prefix: str) -> list[_Spec]:
    """A text encoder's specs in OpenCLIP's names, each layer's q/k/v (filled alike) as one fused in_proj."""
    renamed = []
    for spec in specs:
        name, part = to_openclip_key(spec.name[len(prefix):])
        if part is None:
            renamed.append(replace(spec, name=prefix + name))
        elif part == 0:  # q comes first; k and v are in its fused rows
            renamed.append(replace(spec, name=prefix + name, shape=(3 * spec.shape[0], *spec.shape[1:])))
    return renamed


def _fill(spec: _Spec, generator: torch.Generator) -> torch.Tensor:
    if spec.fill == "given":
        return spec.value.to(spec.dtype).contiguous()
    if spec.fill == "arange":
        return torch.arange(spec.shape[-1], dtype=spec.dtype).reshape(spec.shape)
    if spec.fill == "logit_scale":
        return torch.tensor(4.6052, dtype=spec.dtype)  # log(100), OpenCLIP's trained value
    # Drawn in float32 then cast, so a seed gives the same values in every dtype.
    if spec.fill == "normal":
        tensor = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, spec.std, generator=generator)
    else:
        tensor = torch.full(spec.shape, 1.0 if spec.fill == "ones" else 0.0, dtype=torch.float32)
        if spec.std > 0:
            tensor.add_(torch.empty(spec.shape).normal_(0.0, spec.std, generator=generator))
    return tensor.to(spec.dtype)


# ---- writing -----------------------------------------------------------------------------------------


def _write_safetensors(path: str | os.PathLike, specs: list[_Spec], tensors: Iterator[torch.Tensor],
                       metadata: dict[str, str]) -> None:
    """Header first (offsets are known from the shapes), then each tensor as it is produced."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
    path = os.fspath(path)
    partial = path + ".partial"
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for spec, tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise AssertionError(f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}")
            file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, path)  # never leave a half-written file under the final name


def _write_random(path, specs: list[_Spec], seed: int, metadata: dict[str, str]) -> None:
    # Wider dtypes first keeps every tensor aligned to its element size.
    specs = sorted(specs, key=lambda spec: -spec.dtype.itemsize)
    generator = torch.Generator().manual_seed(seed)
    _write_safetensors(path, specs, (_fill(spec, generator) for spec in specs), metadata)


def make_test_checkpoint(arch: str, size: str, out_path: str | os.PathLike, seed: int = 0,
                         dtype: torch.dtype = torch.float16, in_channels: int = 4) -> None:
    """A checkpoint of ``arch`` (sd15, sd2, sd2-v, sdxl, sdxl_refiner) with random weights in the original
    single-file layout: UNet under model.diffusion_model., VAE under first_stage_model., text encoders under their
    usual prefixes. ``in_channels`` 9 / 8: an inpainting / instruct-pix2pix UNet. ``arch`` "sd2_unclip" (tiny only):
    an SD 2.1 unCLIP file (v-prediction, as the released ones)."""
    if arch == UNCLIP_ARCH:
        _write_unclip(out_path, size, seed, dtype)
        return
    if arch == X4_UPSCALER_ARCH:
        unet, vae, text = x4_upscaler_configs(size)
        specs = _module_specs(UNET_PREFIX, lambda: UNetModel(unet), dtype)
        specs += _module_specs(VAE_PREFIX, lambda: AutoencoderKL(vae), dtype)
        for prefix, config in text.values():
            specs += _openclip_specs(_module_specs(prefix, lambda config=config: CLIPTextModel(config), dtype), prefix)
        _write_random(out_path, specs, seed, {TEST_CHECKPOINT_METADATA_KEY: arch, "comfy_serverless.size": size,
                                              PREDICTION_METADATA_KEY: "v"})
        return
    metadata = {TEST_CHECKPOINT_METADATA_KEY: arch, "comfy_serverless.size": size,
                PREDICTION_METADATA_KEY: "v" if arch == "sd2-v" else "epsilon"}
    _write_random(out_path, _checkpoint_specs(arch, size, dtype, in_channels), seed, metadata)


def x4_upscaler_configs(size: str = "tiny"):
    """(UNet config, VAE config, text encoders) of an x4 upscaler file. Tiny: three levels, attn1 attending to the
    text (48 wide, so detection sees it) on the middle level; a 4x VAE (three levels) like the real one's."""
    from .checkpoint_files import X4_UPSCALER_LATENT_SCALE, X4_UPSCALER_UNET

    if size == "full":
        vae = VAEConfig(base_channels=128, channel_mult=(1, 2, 4), scaling_factor=X4_UPSCALER_LATENT_SCALE)
        return X4_UPSCALER_UNET, vae, {"clip_h": (SD2_CLIP_H_PREFIX, CLIPTextConfig.open_clip_h())}
    if size != "tiny":
        raise ValueError(f"unknown size {size!r}; expected tiny or full")
    unet = UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      transformer_depth=(0, 1, 1), context_dim=48, num_heads=8, use_linear_in_transformer=True,
                      num_classes=1000, cross_attention_only=(False, True, False))
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, scaling_factor=X4_UPSCALER_LATENT_SCALE)
    return unet, vae, {"clip_h": (SD2_CLIP_H_PREFIX, tiny_clip_config("openclip", width=unet.context_dim))}


def unclip_checkpoint_configs(seed: int = 0):
    """(UNet config, VAE config, text encoders, CLIP vision config) of the tiny unCLIP file: SD2's tiny UNet with
    y twice the image embedding width (embedding + noise level embedding)."""
    from .random_clip_vision import tiny_clip_vision_config

    unet, vae, text = checkpoint_configs("sd2", "tiny")
    vision = tiny_clip_vision_config("gelu")  # OpenCLIP's activation, which detection assumes for openclip towers
    return replace(unet, adm_in_channels=2 * vision.projection_dim), vae, text, vision


def _write_unclip(out_path, size: str, seed: int, dtype: torch.dtype) -> None:
    from ..networks.clip_vision import to_openclip_state_dict
    from .checkpoint_files import NOISE_AUGMENTOR_PREFIX, UNCLIP_VISION_PREFIX
    from .clip_vision import ACTIVATION_METADATA_KEY, HEADS_METADATA_KEY
    from .random_clip_vision import random_clip_vision_weights
    from .unclip import squaredcos_alphas_cumprod

    if size != "tiny":
        raise ValueError(f"{UNCLIP_ARCH} test checkpoints come in size tiny only, not {size!r}")
    unet, vae, text, vision = unclip_checkpoint_configs(seed)
    specs = _module_specs(UNET_PREFIX, lambda: UNetModel(unet), dtype)
    specs += _module_specs(VAE_PREFIX, lambda: AutoencoderKL(vae), dtype)
    for prefix, config in text.values():
        specs += _openclip_specs(_module_specs(prefix, lambda config=config: CLIPTextModel(config), dtype), prefix)
    tower = to_openclip_state_dict(random_clip_vision_weights(vision, seed + 1), UNCLIP_VISION_PREFIX)
    specs += [_Spec(name, tuple(tensor.shape), dtype, "given", value=tensor) for name, tensor in tower.items()]
    acp = squaredcos_alphas_cumprod().float()  # the buffers real files carry (float32)
    dim = vision.projection_dim
    buffers = {"alphas_cumprod": acp, "sqrt_alphas_cumprod": acp.sqrt(),
               "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(), "data_mean": torch.zeros(1, dim),
               "data_std": torch.ones(1, dim)}
    specs += [_Spec(NOISE_AUGMENTOR_PREFIX + name, tuple(value.shape), torch.float32, "given", value=value)
              for name, value in buffers.items()]
    metadata = {TEST_CHECKPOINT_METADATA_KEY: UNCLIP_ARCH, "comfy_serverless.size": size,
                PREDICTION_METADATA_KEY: "v", ACTIVATION_METADATA_KEY: vision.activation,
                HEADS_METADATA_KEY: str(vision.heads)}
    _write_random(out_path, specs, seed, metadata)


def make_test_vae(out_path: str | os.PathLike, size: str = "tiny", seed: int = 0,
                  dtype: torch.dtype = torch.float16) -> None:
    """A standalone VAE file (VAELoader) with bare encoder.* / decoder.* keys."""
    config = tiny_vae_config() if size == "tiny" else VAEConfig.sd()
    _write_random(out_path, _module_specs("", lambda: AutoencoderKL(config), dtype), seed,
                  {TEST_CHECKPOINT_METADATA_KEY: "vae", "comfy_serverless.size": size})


# ---- LoRA --------------------------------------------------------------------------------------------


def _lora_targets(arch: str, layout: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(file prefix, module path, weight shape) of every module a test LoRA patches (tiny models).

    UNet: every transformer projection and, for kohya layouts, the 3x3 res-block convolutions (LoCon);
    text encoders: attention and MLP projections, named as transformers names them.
    """
    family = family_of(arch)
    unet_config, _, text = checkpoint_configs(arch, "tiny")
    kohya = layout.startswith("kohya")
    # sd-scripts writes diffusers block names for SD1/SD2 and LDM names for SDXL.
    ldm_names = layout == "kohya-ldm" or (layout == "kohya" and family == "sdxl")
    targets = []
    for name, module in build_on_meta(lambda: UNetModel(unet_config)).named_modules():
        in_transformer = ".1." in name and ("transformer_blocks" in name or name.endswith(("proj_in", "proj_out")))
        is_res_conv = kohya and name.endswith("in_layers.2")
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not (in_transformer or is_res_conv):
            continue
        path = name if ldm_names else diffusers_unet_name(name, unet_config)
        targets.append(("lora_unet_" if kohya else "unet.", path, tuple(module.weight.shape)))

    for index, (encoder, (_, config)) in enumerate(text.items()):
        if kohya:
            prefix = "lora_te_" if len(text) == 1 else f"lora_te{index + 1}_"
        else:
            prefix = "text_encoder." if index == 0 else "text_encoder_2."
        width, mlp = config.width, config.mlp_width
        for layer in range(config.layers):
            base = f"text_model.encoder.layers.{layer}"
            for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
                targets.append((prefix, f"{base}.self_attn.{part}", (width, width)))
            targets.append((prefix, f"{base}.mlp.fc1", (mlp, width)))
            targets.append((prefix, f"{base}.mlp.fc2", (width, mlp)))
    return targets


def make_test_lora(arch: str, out_path: str | os.PathLike, layout: str = "kohya", rank: int = 4,
                   seed: int = 0) -> None:
    """A LoRA for the tiny ``arch`` checkpoint in ``layout``: "kohya" (lora_unet_/lora_te_ names with
    .lora_down/.lora_up/.alpha; SD1/SD2 with diffusers block names, SDXL with LDM names, as sd-scripts does),
    "kohya-ldm" (kohya with LDM names for every family) or "diffusers" (PEFT: unet./text_encoder. with
    .lora_A/.lora_B, no alpha)."""
    from safetensors.torch import save_file

    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {', '.join(LORA_LAYOUTS)}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, path, shape in _lora_targets(arch, layout):
        out_features, in_features, kernel = shape[0], shape[1], tuple(shape[2:])
        down = torch.randn((rank, in_features, *kernel), generator=generator) * 0.1
        up = torch.randn((out_features, rank, *((1, 1) if kernel else ())), generator=generator) * 0.1
        if layout == "diffusers":
            key = f"{prefix}{path}"
            tensors[f"{key}.lora_A.weight"] = down.half()
            tensors[f"{key}.lora_B.weight"] = up.half()
        else:
            key = prefix + path.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(tensors, os.fspath(out_path), metadata={TEST_CHECKPOINT_METADATA_KEY: f"lora-{arch}-{layout}"})
