"""From model files to the MODEL / CLIP / VAE objects the loader nodes return.

Opening a checkpoint reads only its header and shapes (the architecture is recognised, a bad file fails
right there with a CheckpointError). The networks are built later, when first used, through the loaded-model
cache: on the meta device, then loaded with the memory-mapped tensors themselves (assign=True), converted
only where the compute dtype differs from the file's.
"""

from __future__ import annotations

import logging
import os
import threading

from ..heap import keep_freed_memory, release_pages
from .diffusion_model import DiffusionModel
from .embeddings import embeddings_from_folders
from .model_cache import file_stamp, loaded_models
from .precision import dtype_name, text_encoder_dtype, unet_dtype, vae_dtype
from .text_encoder import TextEncoder
from .vae_model import VAEModel

log = logging.getLogger(__name__)

# The family whose latent space (scale factor, previews) a model family's UNet works in.
LATENT_FAMILY = {"sdxl_refiner": "sdxl"}
# The text encoders a family needs; a checkpoint missing one loads without CLIP.
TEXT_ENCODERS = {"sd15": {"clip_l"}, "sd2": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}, "sdxl_refiner": {"clip_g"}}

_architectures: dict[tuple, object] = {}
_lock = threading.Lock()


def _architecture(path: str, stamp: tuple):
    """The file's Architecture, recognised once per (path, mtime, size)."""
    from .checkpoint_files import CheckpointError, detect_architecture, open_state_dict, read_metadata

    with _lock:
        found = _architectures.get(stamp)
    if found is None:
        try:
            found = detect_architecture(open_state_dict(path), read_metadata(path))
        except CheckpointError as exc:
            message = str(exc)
            raise CheckpointError(message if message.startswith(path) else f"{path}: {message}") from None
        log.info("%s: %s, prediction from %s", os.path.basename(path), found.description, found.prediction_reason)
        with _lock:
            _architectures[stamp] = found
    return found


def _parts(path: str, arch):
    """(unet, text encoder dicts, vae) weights of the file: memory-mapped, nothing read yet."""
    from .checkpoint_files import open_state_dict, split_checkpoint

    return split_checkpoint(open_state_dict(path), arch)


def _size_in(weights: dict, dtype) -> int:
    import torch

    item = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * (item if t.is_floating_point() else t.element_size()) for t in weights.values())


def load_checkpoint(path: str, want_clip: bool = True, want_vae: bool = True):
    """(DiffusionModel, TextEncoder or None, VAEModel or None) for a single-file checkpoint."""
    stamp = file_stamp(path)
    arch = _architecture(path, stamp)
    name = os.path.basename(path)
    unet_weights, text_weights, vae_weights = _parts(path, arch)
    cache = loaded_models()

    dtype = unet_dtype()
    unet_handle = cache.handle(
        (stamp, "unet", str(dtype)), f"{name} UNet ({dtype_name(dtype)})",
        lambda: _build_unet(path, arch, dtype), _size_in(unet_weights, dtype), family=(stamp[0], "unet"))
    noise_state = None
    if arch.unclip:
        from .checkpoint_files import noise_augmentor_state, open_state_dict

        noise_state = noise_augmentor_state(open_state_dict(path))  # a few small memory-mapped buffers
    model = diffusion_model(unet_handle, arch, dtype, noise_state)

    clip = None
    if want_clip and set(text_weights) == TEXT_ENCODERS[arch.family]:
        te_dtype = text_encoder_dtype()
        size = sum(_size_in(weights, te_dtype) for weights in text_weights.values())
        handle = cache.handle(
            (stamp, "clip", str(te_dtype)), f"{name} text encoder ({dtype_name(te_dtype)})",
            lambda: _build_text_encoder(path, arch, te_dtype), size, family=(stamp[0], "clip"))
        first = next(iter(arch.text_encoders.values()))
        clip = TextEncoder(handle, arch.family, first.config.layers, te_dtype, embeddings=embeddings_from_folders())
    elif want_clip:
        log.warning("%s lacks text encoder weights (%s found): the CLIP output is None", name,
                    ", ".join(text_weights) or "none")

    vae = None
    if want_vae and arch.vae_config is not None:
        v_dtype = vae_dtype()
        handle = cache.handle(
            (stamp, "vae", str(v_dtype)), f"{name} VAE ({dtype_name(v_dtype)})",
            lambda: _build_vae(path, _parts(path, arch)[2], arch.vae_config, v_dtype), _size_in(vae_weights, v_dtype),
            family=(stamp[0], "vae"))
        vae = VAEModel(handle, v_dtype, arch.vae_config.downscale_factor, arch.vae_config.latent_channels)
    elif want_vae:
        log.warning("%s has no VAE: the VAE output is None", name)
    # Build the UNet and VAE in the background now, as ComfyUI loads them here too: the builds overlap the
    # text encoding that usually comes next instead of waiting for the sampler.
    unet_handle.prefetch()
    if vae is not None:
        vae.handle.prefetch()
    return model, clip, vae


def diffusion_model(handle, arch, dtype, noise_augmentor_state: dict | None = None) -> DiffusionModel:
    """The MODEL of a UNet: the refiner works in SDXL's latent space; extra_inputs.SDModel carries which y and
    which concatenated channels the UNet takes (unCLIP: and the file's noise augmentation buffers; the x4
    upscaler: its own latent scale and schedule)."""
    from .extra_inputs import SDModel, X4UpscalerModel

    if getattr(arch, "x4_upscaler", False):
        return X4UpscalerModel(handle, arch.family, "v", dtype, concat_kind="x4_upscale")
    adm_kind = None
    if arch.unet_config.adm_in_channels is not None:
        adm_kind = "unclip" if getattr(arch, "unclip", False) else arch.family
    return SDModel(handle, LATENT_FAMILY.get(arch.family, arch.family),
                   "v" if arch.prediction == "v_prediction" else "eps", dtype,
                   adm_channels=arch.unet_config.adm_in_channels, adm_kind=adm_kind,
                   concat_kind=arch.concat_kind, noise_augmentor_state=noise_augmentor_state or {})


def load_checkpoint_clip_vision(path: str):
    """unCLIPCheckpointLoader's CLIP_VISION: the image encoder inside an unCLIP checkpoint (built on first use),
    or None for a checkpoint without one (as ComfyUI returns)."""
    from .checkpoint_files import UNCLIP_VISION_PREFIX, open_state_dict
    from .clip_vision import load_clip_vision

    probe = UNCLIP_VISION_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    if probe not in open_state_dict(path):  # memory-mapped: only the header is read
        log.warning("%s has no CLIP vision model (%s*): the CLIP_VISION output is None", os.path.basename(path),
                    UNCLIP_VISION_PREFIX)
        return None
    return load_clip_vision(path, prefix=UNCLIP_VISION_PREFIX)


def load_vae(path: str) -> VAEModel:
    """VAELoader: a standalone VAE file (or the VAE inside a checkpoint)."""
    from .checkpoint_files import open_vae

    stamp = file_stamp(path)
    weights, config = open_vae(path)
    dtype = vae_dtype()
    handle = loaded_models().handle(
        (stamp, "vae-file", str(dtype)), f"{os.path.basename(path)} VAE ({dtype_name(dtype)})",
        lambda: _build_vae(path, open_vae(path)[0], config, dtype), _size_in(weights, dtype),
        family=(stamp[0], "vae-file"))
    return VAEModel(handle, dtype, config.downscale_factor, config.latent_channels)


# ---- part files: UNETLoader, CLIPLoader, DualCLIPLoader ----------------------------------------------------

# UNETLoader's weight_dtype options besides "default" (ComfyUI's fp8 storage, which this server cannot compute in).
FP8_WEIGHT_DTYPES = ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
# The family a lone text encoder serves (CLIPLoader type stable_diffusion), as ComfyUI picks it.
SINGLE_TEXT_ENCODER_FAMILY = {"clip_l": "sd15", "clip_h": "sd2", "clip_g": "sdxl_refiner"}


def load_unet(path: str, weight_dtype: str = "default") -> DiffusionModel:
    """UNETLoader: a diffusion_models/ file holding only an SD-family UNet (LDM or diffusers names)."""
    from .checkpoint_files import CheckpointError
    from .component_files import open_unet, unet_weights

    if weight_dtype != "default":
        raise CheckpointError(f"weight_dtype {weight_dtype!r} is not supported by this server (it computes in the "
                              f"dtype --unet-dtype / the device picks); choose default")
    stamp = file_stamp(path)
    key = (stamp, "unet-file")
    with _lock:
        found = _architectures.get(key)
    if found is None:
        found = open_unet(path)[0]
        log.info("%s: %s UNet, prediction from %s", os.path.basename(path), found.description,
                 found.prediction_reason)
        with _lock:
            _architectures[key] = found
    arch = found
    dtype = unet_dtype()

    def build():
        from ..networks.build import build_from_state_dict
        from ..networks.unet import UNetModel
        from .checkpoint_files import open_state_dict

        weights = _converted(path, unet_weights(open_state_dict(path)), dtype)
        return _with_packed_weights(path, build_from_state_dict(lambda: UNetModel(arch.unet_config), weights,
                                                                dtype), weights, dtype)

    from ..networks.build import build_on_meta  # shapes only: the size estimate without reading the file
    from ..networks.unet import UNetModel

    size = _size_in(build_on_meta(lambda: UNetModel(arch.unet_config)).state_dict(), dtype)
    handle = loaded_models().handle((stamp, "unet-file", str(dtype)),
                                    f"{os.path.basename(path)} UNet ({dtype_name(dtype)})", build, size,
                                    family=(stamp[0], "unet-file"))
    return diffusion_model(handle, arch, dtype)


def load_text_encoders(paths: list[str], clip_type: str, kinds: list[str] | None = None) -> TextEncoder:
    """CLIPLoader (one file, type stable_diffusion: CLIP-L -> SD1, ViT-H -> SD2, bigG -> SDXL refiner) and
    DualCLIPLoader (type sdxl: a CLIP-L and a bigG file, in either order). ``kinds`` (one per path) when the
    caller knows which encoder each file is (a diffusers pipeline), else each is read from its width."""
    from .checkpoint_files import CheckpointError
    from .component_files import TEXT_KIND_NAMES, open_text_encoder

    stamps = [file_stamp(path) for path in paths]
    given, kinds = kinds or [None] * len(paths), {}
    for path, stated in zip(paths, given):
        kind, weights, config = open_text_encoder(path, stated)
        if kind in kinds:
            raise CheckpointError(f"{os.path.basename(path)} and {os.path.basename(kinds[kind][0])} are both "
                                  f"{TEXT_KIND_NAMES[kind]} text encoders")
        kinds[kind] = (path, config, weights)
    names = " + ".join(TEXT_KIND_NAMES[kind] for kind in kinds)
    if len(paths) == 1:
        family = SINGLE_TEXT_ENCODER_FAMILY[next(iter(kinds))]
    elif set(kinds) == TEXT_ENCODERS["sdxl"]:
        family = "sdxl"
    else:
        raise CheckpointError(f"type {clip_type} needs a CLIP-L and an OpenCLIP ViT-bigG file; these are {names}")
    dtype = text_encoder_dtype()
    configs = {kind: config for kind, (_, config, _) in kinds.items()}

    def build():
        from ..networks.clip import SD1TextEncoder, SD2TextEncoder, SDXLRefinerTextEncoder, SDXLTextEncoder

        models = {kind: _build_text_model(_converted(path, open_text_encoder(path, kind)[1], dtype), configs[kind],
                                          dtype) for kind, (path, _, _) in kinds.items()}
        if family == "sdxl":
            return SDXLTextEncoder(models["clip_l"], models["clip_g"])
        encoder = {"sd15": SD1TextEncoder, "sd2": SD2TextEncoder, "sdxl_refiner": SDXLRefinerTextEncoder}[family]
        return encoder(*models.values())

    size = sum(_size_in(weights, dtype) for _, _, weights in kinds.values())
    description = " + ".join(os.path.basename(path) for path in paths)
    handle = loaded_models().handle((tuple(stamps), "text-encoder-files", str(dtype)),
                                    f"{description} text encoder ({dtype_name(dtype)})", build, size,
                                    family=(tuple(stamp[0] for stamp in stamps), "text-encoder-files"))
    first = configs["clip_l"] if family == "sdxl" else next(iter(configs.values()))
    return TextEncoder(handle, family, first.layers, dtype, embeddings=embeddings_from_folders())


def _converted(path: str, weights: dict, dtype) -> dict:
    """`weights` with floating tensors in `dtype`, converted one at a time. A tensor already in `dtype` is
    kept as it is (memory-mapped: no copy). For safetensors files (whose tensors never overlap) the source's
    pages are dropped from our resident memory after each conversion, so the file's pages and the converted
    copies are never all resident together: the peak stays near the model's size instead of file + model."""
    from .prepared import prepared_weights  # `comfy-serverless prepare`'s copy in `dtype`: mapped, not converted

    prepared = prepared_weights(path, weights, dtype)
    if prepared is not None:
        return prepared
    release = path.lower().endswith((".safetensors", ".sft"))
    converted = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            converted[name] = tensor.to(dtype)
            if release:
                release_pages(tensor)
        else:
            converted[name] = tensor
    return converted


keep_freed_memory()  # once models load (heap.py)


def _build_unet(path: str, arch, dtype):
    from ..networks.build import build_from_state_dict
    from ..networks.unet import UNetModel

    weights = _converted(path, _parts(path, arch)[0], dtype)
    return _with_packed_weights(path, build_from_state_dict(lambda: UNetModel(arch.unet_config), weights, dtype),
                                weights, dtype)


def _with_packed_weights(path: str, unet, weights: dict, dtype):
    """The UNet with the packed weights `prepare` wrote for it, where there are (prepared_packs.py)."""
    from .prepared_packs import adopt

    adopt(path, unet, weights, dtype)
    return unet


def _build_text_encoder(path: str, arch, dtype):
    from ..networks.clip import SD1TextEncoder, SD2TextEncoder, SDXLRefinerTextEncoder, SDXLTextEncoder

    weights = _parts(path, arch)[1]

    def model(name: str):
        return _build_text_model(_converted(path, weights[name], dtype), arch.text_encoders[name].config, dtype)

    if arch.family == "sd15":
        return SD1TextEncoder(model("clip_l"))
    if arch.family == "sd2":
        return SD2TextEncoder(model("clip_h"))
    if arch.family == "sdxl_refiner":
        return SDXLRefinerTextEncoder(model("clip_g"))
    return SDXLTextEncoder(model("clip_l"), model("clip_g"))


def _build_text_model(weights: dict, config, dtype):
    from ..networks.build import build_from_state_dict
    from ..networks.clip import CLIPTextModel

    return build_from_state_dict(lambda: CLIPTextModel(config), weights, dtype)


def _build_vae(path: str, weights: dict, config, dtype):
    from ..networks.build import build_from_state_dict
    from ..networks.vae import AutoencoderKL

    return build_from_state_dict(lambda: AutoencoderKL(config), _converted(path, weights, dtype), dtype)


# Parsed LoRA files, by (file stamp, networks they were mapped onto); parsing reads only names and shapes.
_LORA_CACHE_SIZE = 8
_loras: dict[tuple, object] = {}


def apply_lora_file(path: str, model, clip, strength_model: float, strength_clip: float):
    """LoraLoader: (model, clip) clones carrying the file's patches (either may come back unchanged)."""
    from .lora import load_lora
    from .patching import LoraPatch

    networks = {}
    if model is not None and strength_model != 0:
        networks["unet"] = model.handle.get()
    if clip is not None and strength_clip != 0:
        encoder = clip.handle.get()
        for name in TEXT_ENCODERS[clip.family]:
            networks[name] = getattr(encoder, name)
    # Parsing depends only on the networks' structure, which their handle keys pin down.
    with_clip = any(name != "unet" for name in networks)
    key = (file_stamp(path), model.handle.key if "unet" in networks else None,
           clip.handle.key if with_clip else None)
    parsed = _loras.get(key)
    if parsed is None:
        parsed = load_lora(path, networks)
        if parsed.unmapped:
            log.info("%s: %d LoRA keys not applied (no matching weight), e.g. %s", os.path.basename(path),
                     len(parsed.unmapped), parsed.unmapped[0])
        if len(_loras) >= _LORA_CACHE_SIZE:
            _loras.pop(next(iter(_loras)))
        _loras[key] = parsed
    name = os.path.basename(path)
    if "unet" in parsed.targets:
        model = model.with_patch(LoraPatch(name, {"": parsed.targets["unet"]}, strength_model))
    clip_targets = {target: parsed.targets[target] for target in networks if target != "unet"
                    and target in parsed.targets}
    if clip_targets:
        clip = clip.with_patch(LoraPatch(name, clip_targets, strength_clip))
    if "unet" not in parsed.targets and not clip_targets:
        log.warning("%s: no weight of these models matched the LoRA", name)
    return model, clip
