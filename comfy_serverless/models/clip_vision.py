"""CLIP_VISION and STYLE_MODEL objects: recognising their files, loading them, and encoding images.

A CLIP vision file is recognised by its keys and shapes (networks/clip_vision.py): transformers' layout
("vision_model.*", "visual_projection.weight") or OpenCLIP's ("visual.*"); a full CLIP file keeps only its
vision tower. The variant follows from the shapes: ViT-L/14 (24 blocks, 1024 wide, OpenAI's quick_gelu),
its 336 px variant (577 positions), ViT-H/14 (32 blocks) and ViT-bigG/14 (48 blocks), both gelu. Other
sizes (tiny test files) are read from the shapes too; their activation and head count may be given in the
safetensors metadata (random_clip_vision writes them).

Images are prepared as ComfyUI does (clip_preprocess): shortest side resized to the model's size (bicubic,
antialiased) and centre-cropped, or squashed to a square with crop=False; quantised to 8 bits; normalised
with CLIP's mean and std.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from .model_cache import ModelHandle, file_stamp, loaded_models
from .precision import dtype_name, text_encoder_dtype

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENCLIP_PREFIX = "visual."
# Where unCLIP checkpoints (SD 2.1 unclip-l / unclip-h) keep their image encoder, in OpenCLIP's layout.
UNCLIP_CHECKPOINT_PREFIX = "embedder.model.visual."
ACTIVATION_METADATA_KEY = "clip_vision.activation"
HEADS_METADATA_KEY = "clip_vision.heads"
_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


class Output:
    """ComfyUI's CLIP_VISION_OUTPUT: fields readable as attributes and as items (output["image_embeds"])."""

    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, value):
        setattr(self, key, value)

    def __contains__(self, key) -> bool:
        return hasattr(self, key)


def clip_preprocess(image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, crop: bool = True):
    """IMAGE [B, H, W, C] in 0..1 -> normalised pixels [B, 3, size, size] (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [batch, height, width, channels>=3], got shape {tuple(image.shape)}")
    pixels = image[..., :3].movedim(-1, 1).float()
    height, width = pixels.shape[2:]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            target = (round(scale * height), round(scale * width))
        else:
            target = (size, size)
        pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True)
        top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
        pixels = pixels[:, :, top:top + size, left:left + size]
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


# ---- recognising a file ------------------------------------------------------------------------------

def detect_clip_vision(state_dict, metadata=None, prefix: str | None = None):
    """(CLIPVisionConfig, weights with our names) of a CLIP vision state dict. `prefix`: where an OpenCLIP
    tower sits (e.g. UNCLIP_CHECKPOINT_PREFIX); None looks for "visual." and then transformers' names.
    ValueError, naming what was found, for anything else."""
    from ..networks.clip_vision import CLIPVisionConfig, from_openclip_state_dict

    metadata = metadata or {}
    openclip = prefix if prefix is not None else OPENCLIP_PREFIX
    if f"{openclip}transformer.resblocks.0.attn.in_proj_weight" in state_dict:
        weights = from_openclip_state_dict(state_dict, openclip)
    elif _PATCH_KEY in state_dict:
        weights = {key: value for key, value in state_dict.items()
                   if key.startswith(("vision_model.", "visual_projection.")) and not key.endswith("position_ids")}
    else:
        raise ValueError("not a CLIP vision model: neither transformers' vision_model.* nor OpenCLIP's "
                         f"{openclip}* keys found")
    width = weights[_PATCH_KEY].shape[0]
    if width == 1152:
        raise ValueError("a SigLIP vision model: not supported by this server (only CLIP ViT-L/H/bigG)")
    if "visual_projection.weight" not in weights:
        raise ValueError("a CLIP vision tower without its visual projection (visual_projection.weight / proj); "
                         "image_embeds cannot be computed")
    layers = 1 + max((int(m[1]) for key in weights if (m := _LAYER.match(key))), default=-1)
    if layers < 2:
        raise ValueError(f"a CLIP vision model needs at least 2 transformer blocks, found {layers}")
    patch = weights[_PATCH_KEY].shape[-1]
    positions = weights["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{positions} position embeddings: not a square grid of patches plus a class token")
    # OpenAI's ViT-L/14 uses quick_gelu; OpenCLIP's H and bigG (more than 30 blocks, as ComfyUI tells them) gelu.
    activation = metadata.get(ACTIVATION_METADATA_KEY, "gelu" if layers > 30 else "quick_gelu")
    config = CLIPVisionConfig(width=width, layers=layers, heads=int(metadata.get(HEADS_METADATA_KEY, 16)),
                              mlp_width=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                              projection_dim=weights["visual_projection.weight"].shape[0], activation=activation,
                              image_size=grid * patch, patch_size=patch)
    extra = sorted(key for key in weights if key.startswith("multi_modal_projector."))
    if extra:
        log.info("CLIP vision file: ignoring %d multi-modal projector tensors (mm_projected stays None)", len(extra))
    return config, {key: value for key, value in weights.items() if key not in extra}


def describe(config) -> str:
    known = {(1024, 24): "ViT-L/14", (1280, 32): "ViT-H/14", (1664, 48): "ViT-bigG/14"}
    name = known.get((config.width, config.layers), f"custom ({config.width} wide, {config.layers} blocks)")
    return f"CLIP vision {name} @ {config.image_size} px"


# ---- CLIP_VISION ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CLIPVision:
    """CLIP_VISION as it travels between nodes: a handle on the network (loaded on first use)."""

    handle: ModelHandle
    config: object  # CLIPVisionConfig
    dtype: object

    @property
    def image_size(self) -> int:
        return self.config.image_size

    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    @property
    def load_device(self):
        import torch

        return torch.device("cpu")

    def encode_image(self, image, crop: bool = True) -> Output:
        """ComfyUI's encode_image: last_hidden_state, image_embeds, penultimate_hidden_states (float32),
        image_sizes, and mm_projected (None: no LLaVA projector here)."""
        import torch

        pixels = clip_preprocess(image, self.image_size, crop=crop)
        network = self.handle.get()
        with torch.no_grad():
            last, penultimate, embeds = network(pixels.to(self.dtype))
        out = Output()
        out["last_hidden_state"] = last.float()
        out["image_embeds"] = embeds.float()
        out["image_sizes"] = [pixels.shape[1:]] * pixels.shape[0]
        out["penultimate_hidden_states"] = penultimate.float()
        out["mm_projected"] = None
        return out


def _build(config, weights, dtype):
    from ..networks.build import build_from_state_dict
    from ..networks.clip_vision import CLIPVisionModel

    return build_from_state_dict(lambda: CLIPVisionModel(config), weights, dtype)


def _size(weights: dict, dtype) -> int:
    import torch

    item = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * item for t in weights.values())


def _open(path: str, prefix: str | None):
    from .checkpoint_files import CheckpointError, open_state_dict, read_metadata

    try:
        return detect_clip_vision(open_state_dict(path), read_metadata(path), prefix)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_clip_vision(path: str, prefix: str | None = None) -> CLIPVision:
    """CLIPVisionLoader (and unCLIP checkpoints, with prefix=UNCLIP_CHECKPOINT_PREFIX): the file is recognised
    now, the network is built on first use and kept in the loaded-model cache."""
    stamp = file_stamp(path)
    config, weights = _open(path, prefix)
    dtype = text_encoder_dtype()
    description = f"{os.path.basename(path)} {describe(config)} ({dtype_name(dtype)})"
    handle = loaded_models().handle((stamp, "clip-vision", prefix, str(dtype)), description,
                                    lambda: _build(config, _open(path, prefix)[1], dtype), _size(weights, dtype),
                                    family=(stamp[0], "clip-vision", prefix))
    return CLIPVision(handle, config, dtype)


# ---- STYLE_MODEL -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StyleModel:
    """STYLE_MODEL: the T2I-Adapter style model (computed in float32: it is small)."""

    handle: ModelHandle
    config: object  # StyleModelConfig

    def get_cond(self, clip_vision_output):
        """Style tokens [B, tokens, context_dim] from a CLIP_VISION_OUTPUT's last_hidden_state."""
        import torch

        network = self.handle.get()
        with torch.no_grad():
            return network(clip_vision_output.last_hidden_state.float())


def load_style_model(path: str) -> StyleModel:
    from ..networks.style_model import StyleModelConfig
    from .checkpoint_files import CheckpointError, open_state_dict

    def weights():
        return open_state_dict(path)

    try:
        config = StyleModelConfig.from_state_dict(weights())
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc} (only T2I-Adapter style models are supported)") from None

    def build():
        import torch

        from ..networks.build import build_from_state_dict
        from ..networks.style_model import StyleAdapter

        return build_from_state_dict(lambda: StyleAdapter(config), weights(), torch.float32)

    stamp = file_stamp(path)
    handle = loaded_models().handle((stamp, "style-model"), f"{os.path.basename(path)} style model", build,
                                    4 * sum(t.numel() for t in weights().values()), family=(stamp[0], "style-model"))
    return StyleModel(handle, config)
