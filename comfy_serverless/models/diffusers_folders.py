"""DiffusersLoader: an SD1.x / SD2.x / SDXL pipeline saved by diffusers (a folder with model_index.json and
unet/, vae/, text_encoder/, text_encoder_2/ subfolders) as MODEL, CLIP and VAE.

    pipeline_files(folder)   the weight file of each part, preferring the names ComfyUI tries first
    vae_from_diffusers(sd)   diffusers' AutoencoderKL names -> the original (LDM) names our VAE uses
    load_pipeline(folder)    (MODEL, CLIP or None, VAE): the UNet through UNETLoader's diffusers renaming, the
                             text encoders as CLIPLoader's files (their kind from the UNet's family), the VAE renamed

Every part is built on first use through the loaded-model cache, as single-file checkpoints are.
"""

from __future__ import annotations

import os
import re

MODEL_INDEX = "model_index.json"
# File names tried in each part's folder, in ComfyUI's order.
UNET_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.bin")
TEXT_ENCODER_FILES = ("model.fp16.safetensors", "model.safetensors", "pytorch_model.fp16.bin", "pytorch_model.bin")
# The text encoders of each UNet family, by subfolder.
TEXT_ENCODER_FOLDERS = {"sd15": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
                        "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
                        "sdxl_refiner": {"text_encoder_2": "clip_g"}}

_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # (older diffusers names)
_VAE_NAME = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(.+)$")


def _first_file(folder: str, names: tuple[str, ...]) -> str | None:
    return next((os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))), None)


def pipeline_files(folder: str) -> dict[str, str]:
    """{"unet": path, "vae": path, "text_encoder": path, "text_encoder_2": path} for the parts present."""
    from .checkpoint_files import CheckpointError

    if not os.path.isfile(os.path.join(folder, MODEL_INDEX)):
        raise CheckpointError(f"{folder}: not a diffusers pipeline folder (no {MODEL_INDEX})")
    found = {}
    for part, names in (("unet", UNET_FILES), ("vae", UNET_FILES), ("text_encoder", TEXT_ENCODER_FILES),
                        ("text_encoder_2", TEXT_ENCODER_FILES)):
        path = _first_file(os.path.join(folder, part), names)
        if path is not None:
            found[part] = path
    if "unet" not in found:
        raise CheckpointError(f"{folder}: the pipeline has no unet/ weights (expected one of {', '.join(UNET_FILES)})")
    return found


def _vae_name(key: str, levels: int) -> str:
    match = _VAE_NAME.match(key)
    if match is None:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        return key.replace("conv_norm_out", "norm_out")
    side, group, rest = match.groups()
    if group == "mid_block":
        kind, index, part = rest.split(".", 2)
        module, leaf = part.rsplit(".", 1)
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_RESNET_PARTS.get(module, module)}.{leaf}"
        return f"{side}.mid.attn_1.{_ATTENTION_PARTS.get(module, module)}.{leaf}"
    level, kind, rest = rest.split(".", 2)
    level = int(level) if group == "down_blocks" else levels - 1 - int(level)  # up blocks run deepest first
    ours = "down" if group == "down_blocks" else "up"
    if kind == "resnets":
        index, module, leaf = rest.split(".")
        return f"{side}.{ours}.{level}.block.{index}.{_RESNET_PARTS.get(module, module)}.{leaf}"
    sampler = "downsample" if kind == "downsamplers" else "upsample"
    return f"{side}.{ours}.{level}.{sampler}.{rest.split('.', 1)[1]}"  # "0.conv.weight" -> "conv.weight"


def vae_from_diffusers(state_dict: dict) -> dict:
    """The same tensors under the original names (attention's [C, C] linears are viewed as 1x1 convs later)."""
    levels = 1 + max((int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down_blocks.")),
                     default=-1)
    return {_vae_name(key, levels): value for key, value in state_dict.items()}


def load_pipeline(folder: str):
    """(DiffusionModel, TextEncoder or None, VAEModel or None) of a diffusers pipeline folder."""
    from .checkpoint_files import CheckpointError
    from .loading import load_text_encoders, load_unet

    files = pipeline_files(folder)
    try:
        model = load_unet(files["unet"])
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    family = model.adm_kind if getattr(model, "adm_kind", None) == "sdxl_refiner" else model.family
    wanted = TEXT_ENCODER_FOLDERS[family]
    clip = None
    if all(part in files for part in wanted):
        clip = load_text_encoders([files[part] for part in wanted], "diffusers", kinds=list(wanted.values()))
    else:
        missing = ", ".join(f"{part}/" for part in wanted if part not in files)
        raise CheckpointError(f"{folder}: this {family} pipeline lacks its text encoder weights ({missing})")
    vae = _load_vae(files["vae"], family) if "vae" in files else None
    return model, clip, vae


def _load_vae(path: str, family: str):
    from .checkpoint_files import CheckpointError, open_state_dict, split_vae
    from .loading import _build_vae, _size_in
    from .model_cache import file_stamp, loaded_models
    from .precision import dtype_name, vae_dtype
    from .vae_model import VAEModel

    def weights_and_config():
        try:
            return split_vae(vae_from_diffusers(open_state_dict(path)), family)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    stamp = file_stamp(path)
    weights, config = weights_and_config()
    dtype = vae_dtype()
    handle = loaded_models().handle(
        (stamp, "diffusers-vae", str(dtype)), f"{os.path.basename(os.path.dirname(os.path.dirname(path)))} VAE "
        f"({dtype_name(dtype)})", lambda: _build_vae(path, weights_and_config()[0], config, dtype),
        _size_in(weights, dtype), family=(stamp[0], "diffusers-vae"))
    return VAEModel(handle, dtype, config.downscale_factor, config.latent_channels)
