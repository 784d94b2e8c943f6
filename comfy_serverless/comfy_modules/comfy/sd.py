"""ComfyUI's `comfy.sd` for custom node packs: loading single-file checkpoints with this server's loader.

`VAE` and `CLIP` are the ComfyUI names of what the loaders return here (comfy_serverless.models.VAEModel and
TextEncoder): isinstance checks accept ours, and they have ComfyUI's methods packs call (CLIP.tokenize,
encode_from_tokens, encode_from_tokens_scheduled; VAE.decode, encode, decode_tiled, encode_tiled,
spacial_compression_*); building one from a state dict the ComfyUI way is not provided.
`load_lora_for_models` applies a LoRA state dict the way the LoraLoader node applies a file.
"""

from __future__ import annotations

import logging

from comfy_serverless.catalog.comfy_modules import MissingComfyInternal, missing_attribute, stand_in_type
from comfy_serverless.models.text_encoder import TextEncoder
from comfy_serverless.models.vae_model import VAEModel

VAE = stand_in_type("comfy.sd.VAE", VAEModel)
CLIP = stand_in_type("comfy.sd.CLIP", TextEncoder)


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
