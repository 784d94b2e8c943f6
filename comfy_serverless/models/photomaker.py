"""PHOTOMAKER: loading a PhotoMaker v1 ID encoder file and fusing a face image into a prompt's encoding.

Files: the released photomaker-v1.bin (a pickle {"id_encoder": {...}, "lora_weights": {...}}), or a flat file
whose keys are "id_encoder.*" (or the ID encoder's own names). The LoRA half is not used (ComfyUI ignores it too;
users load it with a LoRA loader). The vision tower is recognised as models/clip_vision.py does.

Encoding (ComfyUI's PhotoMakerEncode): the word "photomaker" (split on spaces) is dropped from the prompt, which is
encoded as usual; the text encoder's output at the position of the word before it (its first token, counting the
start token) is fused with the first image's ID embedding; the other positions and the pooled output are unchanged.
Without the trigger word the plain encoding is returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .model_cache import ModelHandle, file_stamp, loaded_models
from .precision import dtype_name, text_encoder_dtype

TRIGGER_WORD = "photomaker"
ID_ENCODER_PREFIX = "id_encoder."
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


def read_id_encoder(path: str) -> tuple[dict, dict]:
    """(weights of the ID encoder under its own names, safetensors metadata) of a PhotoMaker file."""
    from .checkpoint_files import CheckpointError, open_state_dict, read_metadata

    if path.lower().endswith(_PICKLES):
        weights, metadata = _flat_pickle(path), {}
    else:
        weights, metadata = open_state_dict(path), read_metadata(path)
    if any(key.startswith(ID_ENCODER_PREFIX) for key in weights):
        weights = {key[len(ID_ENCODER_PREFIX):]: value for key, value in weights.items()
                   if key.startswith(ID_ENCODER_PREFIX)}
    if "fuse_module.mlp1.fc1.weight" not in weights or "visual_projection_2.weight" not in weights:
        raise CheckpointError(f"{path}: not a PhotoMaker v1 model (no id_encoder fuse_module / visual_projection_2 "
                              "weights found); PhotoMaker v2 is not supported")
    return weights, metadata


def _flat_pickle(path: str) -> dict:
    """A torch pickle's tensors, nested dicts flattened to dotted names (the released file nests id_encoder)."""
    import torch

    from .checkpoint_files import CheckpointError, open_state_dict

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return open_state_dict(path)  # raises its clear message for a damaged or unsafe file
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)

    walk("", loaded)
    return flat


def detect_photomaker(weights: dict, metadata: dict | None = None):
    """(PhotoMakerConfig, weights without the tower's position ids) of an ID encoder state dict."""
    from ..networks.photomaker import PhotoMakerConfig
    from .clip_vision import detect_clip_vision

    own = ("fuse_module.", "visual_projection_2")
    vision, tower = detect_clip_vision({k: v for k, v in weights.items() if not k.startswith(own)}, metadata)
    config = PhotoMakerConfig(vision=vision, projection_2_dim=weights["visual_projection_2.weight"].shape[0])
    fuse_width = weights["fuse_module.layer_norm.weight"].shape[0]
    if fuse_width != config.embed_dim:
        raise ValueError(f"fuse module width {fuse_width} does not match the ID embedding width {config.embed_dim}")
    rest = {key: value for key, value in weights.items() if key.startswith(own)}
    return config, {**tower, **rest}


@dataclass(frozen=True)
class PhotoMaker:
    """PHOTOMAKER as it travels between nodes: a handle on the ID encoder (loaded on first use)."""

    handle: ModelHandle
    config: object  # PhotoMakerConfig
    dtype: object

    @property
    def load_device(self):
        import torch

        return torch.device("cpu")

    def __call__(self, id_pixel_values, prompt_embeds, class_tokens_mask):
        """ComfyUI's PhotoMakerIDEncoder call: the prompt embeddings with the marked tokens fused."""
        import torch

        network = self.handle.get()
        with torch.no_grad():
            out = network(id_pixel_values.to(self.dtype), prompt_embeds.to(self.dtype), class_tokens_mask)
        return out.to(prompt_embeds.dtype)

    def encode(self, image, clip, text: str):
        """PhotoMakerEncode: CONDITIONING for `text` with the ID of `image` (its first image) fused in."""
        import torch

        from .clip_vision import clip_preprocess

        words = text.split(" ")
        word_number = words.index(TRIGGER_WORD) + 1 if TRIGGER_WORD in words else -1
        tokens = clip.tokenize(text, return_word_ids=True)
        kept = {}
        for key, windows in tokens.items():
            kept[key] = []
            for window in windows:
                left = [entry for entry in window if entry[2] != word_number]
                kept[key].append(left + [window[-1]] * (len(window) - len(left)))
        cond, pooled = clip.encode_from_tokens(kept, return_pooled=True)
        if word_number > 0:
            if cond.shape[-1] != self.config.embed_dim:
                raise ValueError(f"this PhotoMaker model fuses into {self.config.embed_dim}-wide text embeddings; "
                                 f"the CLIP gives {cond.shape[-1]} (PhotoMaker needs an SDXL CLIP)")
            pixels = clip_preprocess(image, self.config.vision.image_size).float()
            mask = torch.zeros(cond.shape[:2], dtype=torch.bool)
            mask[:, word_number - 1] = True
            cond = self(pixels[None], cond, mask)
        return [[cond, {"pooled_output": pooled}]]


def _size(weights: dict, dtype) -> int:
    import torch

    item = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * item for t in weights.values())


def _open(path: str):
    from .checkpoint_files import CheckpointError

    weights, metadata = read_id_encoder(path)
    try:
        return detect_photomaker(weights, metadata)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_photomaker(path: str) -> PhotoMaker:
    """PhotoMakerLoader: the file is checked now, the network built on first use and cached."""
    from ..networks.build import build_from_state_dict
    from ..networks.photomaker import PhotoMakerIDEncoder

    config, weights = _open(path)  # first: a missing or wrong file gets its clear CheckpointError
    stamp = file_stamp(path)
    dtype = text_encoder_dtype()
    handle = loaded_models().handle(
        (stamp, "photomaker", str(dtype)), f"{os.path.basename(path)} PhotoMaker ID encoder ({dtype_name(dtype)})",
        lambda: build_from_state_dict(lambda: PhotoMakerIDEncoder(config), _open(path)[1], dtype),
        _size(weights, dtype), family=(stamp[0], "photomaker"))
    return PhotoMaker(handle, config, dtype)
