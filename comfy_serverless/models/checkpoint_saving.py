"""Writing MODEL / CLIP / VAE weights as ComfyUI's save nodes do (CheckpointSave, CLIPSave, VAESave, ModelSave).

Checkpoints use the single-file layout of each family, so they load back through CheckpointLoaderSimple:
``model.diffusion_model.*`` (plus an empty ``v_pred`` tensor for v-prediction models), ``first_stage_model.*``,
and the text encoders under their family's prefix (transformers names for CLIP-L, OpenCLIP names, q/k/v fused,
for ViT-H and bigG). Weights are saved with every patch (LoRA, merge) applied.

Files are written as safetensors, streamed one tensor at a time (no second copy of the model in memory), under a
temporary name first.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from .. import paths
from ..networks.build import UNET_PREFIX as CHECKPOINT_UNET_PREFIX
from ..networks.build import VAE_PREFIX
from ..networks.clip import (
    SD1_CLIP_L_PREFIX,
    SD2_CLIP_H_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    to_openclip_layout,
)
from .checkpoint_files import SAFETENSORS_DTYPES
from .patching import patched_module

# Where each family's checkpoint keeps each text encoder.
CLIP_PREFIXES = {"sd15": {"clip_l": SD1_CLIP_L_PREFIX}, "sd2": {"clip_h": SD2_CLIP_H_PREFIX},
                 "sdxl": {"clip_l": SDXL_CLIP_L_PREFIX, "clip_g": SDXL_CLIP_G_PREFIX},
                 "sdxl_refiner": {"clip_g": SDXL_REFINER_CLIP_G_PREFIX}}
# ComfyUI's modelspec.architecture for the models it names.
MODELSPEC_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sdxl_refiner": "stable-diffusion-xl-v1-refiner",
                           "sdxl_ip2p": "stable-diffusion-xl-v1-edit"}


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None, align: int = 8,
                      stored_as: dict | None = None) -> None:
    """A safetensors file of `tensors` (any devices, dtypes, views), written atomically. Every tensor whose size is
    a multiple of `align` bytes starts at a multiple of it in the file, and so in a memory map of it (the header
    is padded, those tensors come first); the rest follow, each aligned to its element size. `stored_as`: {key:
    dtype} for tensors converted as they are written (one at a time, not all held converted at once)."""
    stored_as = stored_as or {}

    def dtype_of(key: str) -> torch.dtype:
        return stored_as.get(key, tensors[key].dtype)

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0

    def placement(key: str) -> tuple[bool, int]:
        tensor, itemsize = tensors[key], dtype_of(key).itemsize
        return tensor.numel() * itemsize % align != 0, -itemsize

    order = sorted(tensors, key=placement)
    for key in order:
        tensor, dtype = tensors[key], dtype_of(key)
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot save {key}: dtype {dtype} has no safetensors name")
        size = tensor.numel() * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % align)  # the data starts after the 8-byte length and the header
    with paths.atomic_path(path) as partial, open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for key in order:
            data = tensors[key].detach().to("cpu", dtype_of(key)).contiguous().reshape(-1)
            if data.numel():
                file.write(data.view(torch.uint8).numpy().data)


def unet_family(model) -> str:
    """sd15, sd2, sdxl or sdxl_refiner (the refiner works in SDXL's latent space but is its own family)."""
    if getattr(model, "adm_kind", None) == "sdxl_refiner":
        return "sdxl_refiner"
    return model.family


def unet_weights(model) -> dict:
    """The UNet's weights with the model's patches, keyed as in a checkpoint; v_pred marks v models."""
    weights = {CHECKPOINT_UNET_PREFIX + name: value for name, value in model.network().state_dict().items()}
    if model.prediction == "v":
        weights["v_pred"] = torch.tensor([])
    return weights


def _clip_encoders(clip) -> dict:
    network = patched_module(clip.handle, clip.patches)
    return {name: getattr(network, name) for name in ("clip_l", "clip_h", "clip_g") if hasattr(network, name)}


def encoder_weights(module) -> dict:
    """One text encoder's weights in its checkpoint layout (transformers or OpenCLIP names)."""
    state = module.state_dict()
    if module.config.layout == "openclip":
        return to_openclip_layout(state)
    return dict(state)


def clip_checkpoint_weights(clip) -> dict:
    prefixes = CLIP_PREFIXES[clip.family]
    weights = {}
    for name, module in _clip_encoders(clip).items():
        weights.update({prefixes[name] + key: value for key, value in encoder_weights(module).items()})
    return weights


def clip_file_weights(clip) -> dict:
    """{encoder name: weights} as CLIPSave writes them: transformers names (text_model.*), the projection as
    text_projection.weight [P, width]."""
    files = {}
    for name, module in _clip_encoders(clip).items():
        state = module.state_dict()
        weights = {"text_model." + key: value for key, value in state.items() if key != "text_projection"}
        if "text_projection" in state:
            weights["text_projection.weight"] = state["text_projection"].t()
        files[name] = weights
    return files


def vae_weights(vae) -> dict:
    return {VAE_PREFIX + name: value for name, value in vae.handle.get().state_dict().items()}


def checkpoint_metadata(model, title: str, prompt, extra_pnginfo, disable_metadata: bool) -> dict:
    """CheckpointSave's metadata: modelspec for the SDXL models, the prediction type, the prompt and workflow."""
    metadata = {}
    family = unet_family(model)
    if family == "sdxl" and getattr(model, "concat_kind", None) == "ip2p":
        family = "sdxl_ip2p"
    if family in MODELSPEC_ARCHITECTURES:
        metadata["modelspec.architecture"] = MODELSPEC_ARCHITECTURES[family]
        metadata["modelspec.sai_model_spec"] = "1.0.0"
        metadata["modelspec.implementation"] = "sgm"
        metadata["modelspec.title"] = title
    metadata["modelspec.predict_key"] = "v" if model.prediction == "v" else "epsilon"
    if not disable_metadata:
        metadata.update(prompt_metadata(prompt, extra_pnginfo))
    return metadata


def prompt_metadata(prompt, extra_pnginfo) -> dict:
    """The prompt (an empty string when there is none) and each extra_pnginfo entry, as JSON."""
    metadata = {"prompt": "" if prompt is None else json.dumps(prompt)}
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


def save_checkpoint(path: str, model, clip=None, vae=None, metadata: dict | None = None) -> None:
    weights = unet_weights(model)
    if clip is not None:
        if CLIP_PREFIXES.get(clip.family) is None:
            raise ValueError(f"cannot save a {clip.family} text encoder into a checkpoint")
        weights.update(clip_checkpoint_weights(clip))
    if vae is not None:
        weights.update(vae_weights(vae))
    write_safetensors(path, weights, metadata)


def output_file(filename_prefix: str) -> tuple[str, str, int]:
    """(folder, base name, counter) for the next `<prefix>_<counter:05>_.safetensors` in the output folder."""
    from ..nodes.image_files import save_image_path

    root = paths.current().directory_for("output")
    folder, base, counter, _ = save_image_path(filename_prefix, root)
    return folder, base, counter


def safetensors_path(folder: str, base: str, counter: int) -> str:
    return os.path.join(folder, f"{base}_{counter:05}_.safetensors")
