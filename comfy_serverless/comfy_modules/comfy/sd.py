"""ComfyUI's `comfy.sd` for custom node packs: loading models with this server's loaders.

`VAE` and `CLIP` are the ComfyUI names of what the loaders return here (comfy_serverless.models.VAEModel and
TextEncoder): isinstance checks accept ours, and they have ComfyUI's methods packs call (CLIP.tokenize,
encode_from_tokens, cond_stage_model, patcher, ...; VAE.decode, encode, decode_tiled, first_stage_model, ...).
`VAE(sd=state_dict)` builds a VAE from a state dict; `load_clip` / `load_diffusion_model` are CLIPLoader /
UNETLoader's loaders; `load_lora_for_models` applies a LoRA state dict the way the LoraLoader node applies a file.
"""

from __future__ import annotations

import abc
import enum
import logging

from comfy_serverless.catalog.comfy_modules import MissingComfyInternal, missing_attribute, stand_in_type
from comfy_serverless.models.text_encoder import TextEncoder
from comfy_serverless.models.vae_model import VAEModel

CLIP = stand_in_type("comfy.sd.CLIP", TextEncoder)


class VAE(abc.ABC):
    """ComfyUI's VAE: `VAE(sd=state_dict)` builds this server's VAEModel from a VAE's weights (encoder.* /
    decoder.*, or a checkpoint's first_stage_model.*); isinstance accepts every VAE the loaders return."""

    def __new__(cls, sd=None, device=None, config=None, dtype=None, metadata=None):
        from comfy_serverless.models.clip_surface import vae_from_state_dict

        if sd is None or config is not None:
            raise MissingComfyInternal("comfy.sd.VAE without a state dict (or from a config)")
        return vae_from_state_dict(sd)


VAE.register(VAEModel)


class CLIPType(enum.Enum):
    """CLIPLoader's types (ComfyUI's names); this server builds STABLE_DIFFUSION ones: CLIP-L (SD1), ViT-H (SD2),
    bigG (SDXL refiner), or CLIP-L + bigG (SDXL, DualCLIPLoader's sdxl)."""

    STABLE_DIFFUSION = 1
    STABLE_CASCADE = 2
    SD3 = 3
    STABLE_AUDIO = 4
    HUNYUAN_DIT = 5
    FLUX = 6
    MOCHI = 7
    LTXV = 8
    HUNYUAN_VIDEO = 9
    PIXART = 10
    COSMOS = 11
    LUMINA2 = 12
    WAN = 13
    HIDREAM = 14
    CHROMA = 15
    ACE = 16
    OMNIGEN2 = 17
    QWEN_IMAGE = 18
    HUNYUAN_IMAGE = 19


def load_clip(ckpt_paths, embedding_directory=None, clip_type=CLIPType.STABLE_DIFFUSION, model_options=None):
    """CLIPLoader / DualCLIPLoader's loader: one text encoder file, or a CLIP-L and a bigG file (SDXL). Textual
    inversions come from the server's embeddings folders (what packs pass as embedding_directory)."""
    from comfy_serverless.models.loading import load_text_encoders

    if clip_type != CLIPType.STABLE_DIFFUSION:
        name = getattr(clip_type, "name", clip_type)
        raise ValueError(f"CLIP type {name} is not supported by this server (its models are not built here); "
                         "use CLIPType.STABLE_DIFFUSION")
    paths = [str(path) for path in ckpt_paths]
    if len(paths) not in (1, 2):
        raise ValueError(f"load_clip takes one or two text encoder files here, not {len(paths)}")
    return load_text_encoders(paths, "stable_diffusion" if len(paths) == 1 else "sdxl")


def _weight_dtype(model_options) -> str:
    """UNETLoader's weight_dtype name for model_options["dtype"]: fp8 storage (refused by this server's loader)
    by its name; other dtypes leave the choice to the server, as the "default" option does."""
    dtype = str((model_options or {}).get("dtype", "")).removeprefix("torch.")
    return dtype.replace("float8_", "fp8_") if dtype.startswith("float8_") else "default"


def load_diffusion_model(unet_path, model_options=None):
    """UNETLoader's loader: an SD1.x/SD2.x/SDXL UNet file as a MODEL."""
    from comfy_serverless.models.loading import load_unet

    return load_unet(str(unet_path), _weight_dtype(model_options))


def load_diffusion_model_state_dict(sd, model_options=None):
    """A MODEL from a UNet's state dict (LDM or diffusers names)."""
    from comfy_serverless.models.clip_surface import diffusion_model_from_state_dict

    if _weight_dtype(model_options) != "default":
        raise ValueError(f"model_options dtype {model_options['dtype']} (fp8 weight storage) is not supported by "
                         "this server")
    return diffusion_model_from_state_dict(sd)


def load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, output_clipvision=False,
                                 embedding_directory=None, output_model=True, model_options=None,
                                 te_model_options=None):
    """(MODEL, CLIP, VAE, CLIP_VISION) of a single-file SD1.x/SD2.x/SDXL/SD 2.1 unCLIP checkpoint; CLIP_VISION is
    the image encoder of an unCLIP file when output_clipvision is set, else None; any part not asked for is None."""
    from comfy_serverless.models.loading import load_checkpoint, load_checkpoint_clip_vision

    model, clip, vae = load_checkpoint(str(ckpt_path), want_clip=output_clip, want_vae=output_vae)
    clip_vision = load_checkpoint_clip_vision(str(ckpt_path)) if output_clipvision else None
    return (model if output_model else None), clip, vae, clip_vision


def load_checkpoint(config_path=None, ckpt_path=None, output_vae=True, output_clip=True, embedding_directory=None,
                    state_dict=None, config=None):
    """The deprecated config-file loader: the architecture is read from the weights, the config is not needed."""
    if ckpt_path is None:
        raise MissingComfyInternal("comfy.sd.load_checkpoint from a state dict")
    return load_checkpoint_guess_config(ckpt_path, output_vae, output_clip)[:3]


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """(model, clip) clones carrying the LoRA in the state dict `lora` (what comfy.utils.load_torch_file read), as
    ComfyUI: either may be None (and comes back None); keys that match no weight are logged and skipped."""
    from comfy_serverless.models.loading import TEXT_ENCODERS
    from comfy_serverless.models.lora import parse_lora
    from comfy_serverless.models.patching import LoraPatch

    networks = {}
    if model is not None:
        networks["unet"] = model.handle.get()
    if clip is not None:
        encoder = clip.handle.get()
        for name in TEXT_ENCODERS[clip.family]:
            networks[name] = getattr(encoder, name)
    parsed = parse_lora(lora, networks)
    if parsed.unmapped:
        logging.warning("lora key not loaded: %s (and %d more)", parsed.unmapped[0], len(parsed.unmapped) - 1)
    new_model = new_clip = None
    if model is not None:
        unet = parsed.targets.get("unet")
        new_model = model.with_patch(LoraPatch("lora", {"": unet}, strength_model)) if unet else model.clone()
    if clip is not None:
        targets = {name: parsed.targets[name] for name in networks if name != "unet" and name in parsed.targets}
        new_clip = clip.with_patch(LoraPatch("lora", targets, strength_clip)) if targets else clip.clone()
    return new_model, new_clip


def __getattr__(name: str):
    return missing_attribute(__name__, name)
