"""ComfyUI's CLIP internals that node packs reach into, backed by this server's TextEncoder.

`clip.cond_stage_model` is ComfyUI's SD1ClipModel / SD2ClipModel / SDXLClipModel / SDXLRefinerClipModel: a
container whose `clip_l` / `clip_h` / `clip_g` members answer ComfyUI's SDClipModel calls
(`encode_token_weights(windows)` -> (cond, pooled), `set_clip_options({"layer", "projected_pooled"})`,
`reset_clip_options()`, `clip_layer(n)`). Each member keeps its layer options as ComfyUI's does ("last": the
final-normed output; "hidden" + layer_idx: that block's output, final-normed where the family norms it) and
encodes with the network of the CLIP it came from, its LoRA / hook patches applied (ComfyUI applies them when a
pack calls load_model_gpu(clip.patcher) before encoding). `ClipPatcher` is the small ModelPatcher face of
`clip.patcher`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

from .clip_patcher_api import PROJECTION_KEY, TEXT_MODEL

TOKEN_KEYS = {"clip_l": "l", "clip_h": "h", "clip_g": "g"}
END_TOKEN_ID = 49407
# The encoders of each family: ComfyUI's default layer options and whether a hidden layer gets the final norm.
FAMILY_ENCODERS = {
    "sd15": (("clip_l", ("last", None), True),),
    "sd2": (("clip_h", ("hidden", -2), True),),
    "sdxl": (("clip_l", ("hidden", -2), False), ("clip_g", ("hidden", -2), False)),
    "sdxl_refiner": (("clip_g", ("hidden", -2), False),),
}


def _network(clip):
    """The clip's text-encoder network with its patches applied, as encode_from_tokens runs it."""
    from .hooks import clip_patches
    from .patching import patched_module

    return patched_module(clip.handle, clip.patches + clip_patches(clip.hooks, clip, None))


def _unprojected(model):
    """A view of a CLIPTextModel (same parameters) whose pooled output skips text_projection."""
    if model.config.projection_dim is None:
        return model
    view = copy.copy(model)  # nn.Module's copy shares the parameter dicts; only `config` differs below
    view.config = dataclasses.replace(model.config, projection_dim=None)
    return view


class SDClipEncoder:
    """ComfyUI's SDClipModel (one CLIP text tower inside cond_stage_model)."""

    def __init__(self, clip, name: str, default: tuple, layer_norm_hidden_state: bool):
        self._clip = clip
        self.name = name
        self.options_default = (*default, True)
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.special_tokens = {"start": 49406, "end": END_TOKEN_ID, "pad": END_TOKEN_ID if name == "clip_l" else 0}
        self.reset_clip_options()

    @property
    def transformer(self):
        """The CLIPTextModel (this server's; transformers' parameter names under text_model)."""
        return getattr(_network(self._clip), self.name)

    @property
    def num_layers(self) -> int:
        return self.transformer.config.layers

    def reset_clip_options(self) -> None:
        self.layer, self.layer_idx, self.return_projected_pooled = self.options_default

    def set_clip_options(self, options: dict) -> None:
        """{"layer": n} picks block n (-1 the last, ...; beyond the depth: the final output), {"projected_pooled":
        False} returns the pooled output before the text projection."""
        self.return_projected_pooled = options.get("projected_pooled", self.return_projected_pooled)
        layer_idx = options.get("layer", self.layer_idx)
        if layer_idx is None or abs(layer_idx) > self.num_layers:
            self.layer = "last"
        else:
            self.layer, self.layer_idx = "hidden", layer_idx

    def clip_layer(self, layer_idx: int) -> None:
        self.set_clip_options({"layer": layer_idx})

    def reset_clip_layer(self) -> None:
        self.layer, self.layer_idx = self.options_default[:2]

    def encode_token_weights(self, token_weight_pairs):
        """(cond [1, 77 * windows, width], pooled [1, width]) of weighted windows ((token, weight[, word id])
        lists), weights applied against the empty prompt as CLIPTextEncode does; pooled from the first window."""
        import torch

        from ..networks.clip import encode_weighted_windows

        if not isinstance(token_weight_pairs, (list, tuple)):
            raise TypeError(f"{self.name}.encode_token_weights takes a list of token windows (one key of "
                            f"clip.tokenize()'s dict), not {type(token_weight_pairs).__name__}")
        windows = [[entry[:2] for entry in window] for window in token_weight_pairs]
        model = self.transformer
        if not self.return_projected_pooled:
            model = _unprojected(model)
        last = self.layer == "last"
        with torch.no_grad():
            return encode_weighted_windows(model, windows, pad_token_id=self.special_tokens["pad"],
                                           hidden_layer=-1 if last else self.layer_idx,
                                           normalize_hidden=last or self.layer_norm_hidden_state)

    def load_sd(self, sd: dict):
        """Weights in transformers' names (text_model.*, text_projection.weight) for this tower: see
        ClipStage.load_sd."""
        renamed = {}
        for key, value in sd.items():
            if key.startswith("text_model."):
                renamed[self.name + TEXT_MODEL + key[len("text_model."):]] = value
            elif key == "text_projection.weight":
                renamed[self.name + PROJECTION_KEY] = value
            else:
                renamed[key] = value
        return load_patches(self._clip, renamed)


class SDXLClipGEncoder(SDClipEncoder):
    """ComfyUI's SDXLClipG."""


class _Stage:
    """What every cond_stage_model has: its members (`clip_l`, `clip_h`, `clip_g`) and their options."""

    def __init__(self, clip):
        self._clip = clip
        self.members = []
        for name, default, norm in FAMILY_ENCODERS[clip.family]:
            member = (SDXLClipGEncoder if name == "clip_g" else SDClipEncoder)(clip, name, default, norm)
            setattr(self, name, member)
            self.members.append(member)
        self.clip = self.members[0].name
        self.clip_name = TOKEN_KEYS[self.clip]
        self.dtypes = {clip.dtype}

    def set_clip_options(self, options: dict) -> None:
        for member in self.members:
            member.set_clip_options(options)

    def reset_clip_options(self) -> None:
        for member in self.members:
            member.reset_clip_options()

    def clip_layer(self, layer_idx: int) -> None:
        for member in self.members:
            member.clip_layer(layer_idx)

    def reset_clip_layer(self) -> None:
        for member in self.members:
            member.reset_clip_layer()

    def _windows(self, tokens: dict, member) -> list:
        key = TOKEN_KEYS[member.name]
        if not isinstance(tokens, dict) or key not in tokens:
            raise ValueError(f"cond_stage_model.encode_token_weights takes clip.tokenize()'s dict with the key "
                             f"{key!r} for this {self._clip.family} CLIP")
        return tokens[key]

    def state_dict(self) -> dict:
        from .clip_patcher_api import model_state_dict

        return model_state_dict(self._clip)


class ClipStage(_Stage):
    """ComfyUI's SD1ClipModel: one tower, `clip` naming the member and `clip_name` its key in tokenize()'s dict."""

    def encode_token_weights(self, token_weight_pairs: dict):
        member = getattr(self, self.clip)
        return member.encode_token_weights(self._windows(token_weight_pairs, member))

    def load_sd(self, sd: dict):
        """(missing, unexpected) keys, like torch's load_state_dict. The weights become "set" patches of the CLIP
        object this came from (its clones share the network, which is never changed in place)."""
        return self.members[0].load_sd(sd)


class SD2ClipStage(ClipStage):
    """ComfyUI's SD2ClipModel."""


class SDXLRefinerClipStage(ClipStage):
    """ComfyUI's SDXLRefinerClipModel."""


class SDXLClipStage(_Stage):
    """ComfyUI's SDXLClipModel (not an SD1ClipModel there either): CLIP-L and bigG features side by side; bigG's
    pooled output."""

    def encode_token_weights(self, token_weight_pairs: dict):
        import torch

        cond_l, _ = self.clip_l.encode_token_weights(self._windows(token_weight_pairs, self.clip_l))
        cond_g, pooled = self.clip_g.encode_token_weights(self._windows(token_weight_pairs, self.clip_g))
        length = min(cond_l.shape[1], cond_g.shape[1])
        return torch.cat([cond_l[:, :length], cond_g[:, :length]], dim=-1), pooled

    def load_sd(self, sd: dict):
        """A bigG file goes to clip_g, anything else to clip_l (decided by the token embedding's width when the
        widths differ, else by depth as ComfyUI does)."""
        width = sd.get("text_model.embeddings.token_embedding.weight")
        if width is not None and self.clip_l.transformer.config.width != self.clip_g.transformer.config.width:
            target = self.clip_g if width.shape[1] == self.clip_g.transformer.config.width else self.clip_l
        else:
            target = self.clip_g if "text_model.encoder.layers.30.mlp.fc1.weight" in sd else self.clip_l
        return target.load_sd(sd)


STAGES = {"sd15": ClipStage, "sd2": SD2ClipStage, "sdxl": SDXLClipStage, "sdxl_refiner": SDXLRefinerClipStage}


def cond_stage_model(clip) -> _Stage:
    """The clip's container, made once per CLIP object (its layer options persist between calls, as ComfyUI's)."""
    stage = clip.__dict__.get("_cond_stage_model")
    if stage is None:
        stage = STAGES[clip.family](clip)
        object.__setattr__(clip, "_cond_stage_model", stage)
    return stage


def load_patches(clip, sd: dict):
    """Weights under ComfyUI's CLIP names applied as "set" patches; (missing, unexpected) like load_state_dict."""
    from .clip_patcher_api import add_patches, model_state_dict

    known = set(model_state_dict(dataclasses.replace(clip, patches=(), hooks=None)))
    loaded = set(add_patches(clip, {key: ("set", (value,)) for key, value in sd.items()}))
    unexpected = [key for key in sd if key not in loaded]
    ours = {key.split(".", 1)[0] for key in loaded}
    missing = [key for key in sorted(known) if key.split(".", 1)[0] in ours and key not in loaded]
    return missing, unexpected


def encode_unprojected(clip, tokens):
    """encode_from_tokens(return_pooled="unprojected"): (cond, pooled before the text projection)."""
    stage = cond_stage_model(clip)
    stage.reset_clip_options()
    if clip.last_layer is not None:
        stage.set_clip_options({"layer": clip.last_layer})
    stage.set_clip_options({"projected_pooled": False})
    try:
        return stage.encode_token_weights(tokens)
    finally:
        stage.reset_clip_options()


class ClipPatcher:
    """ComfyUI's ModelPatcher around a CLIP (`clip.patcher`): devices, `model` (the cond_stage_model) and the
    weight-patch methods, which act on the CLIP they came from."""

    def __init__(self, clip):
        self._clip = clip

    @property
    def model(self):
        return cond_stage_model(self._clip)

    @property
    def load_device(self):
        import torch

        return torch.device("cpu")

    offload_device = current_device = load_device

    def model_dtype(self):
        return self._clip.dtype

    def model_size(self) -> int:
        return self._clip.handle.estimated_bytes

    def loaded_size(self) -> int:
        return self.model_size() if self._clip.handle.is_loaded else 0

    def is_clone(self, other) -> bool:
        return isinstance(other, ClipPatcher) and other._clip.handle is self._clip.handle

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        return self._clip.add_patches(patches, strength_patch, strength_model)

    def get_key_patches(self, filter_prefix=None) -> dict:
        return self._clip.get_key_patches(filter_prefix)

    def model_state_dict(self, filter_prefix=None) -> dict:
        return self._clip.model_state_dict(filter_prefix)


# ---- comfy.sd's builders from state dicts (VAE(sd=...), load_diffusion_model_state_dict) ----------------------

def _private_handle(description: str, build, weights: dict, dtype):
    """A handle outside the cache's table: the network lives as long as the object holding it (as ComfyUI's
    VAE(sd=...) owns its weights), instead of a cache entry that would keep every such state dict alive."""
    from .loading import _size_in
    from .model_cache import ModelHandle, loaded_models

    key = ("state-dict", next(_handle_numbers))
    return ModelHandle(loaded_models(), key, description, build, _size_in(weights, dtype))


_handle_numbers = itertools.count(1)


def vae_from_state_dict(sd: dict):
    """ComfyUI's VAE(sd=...): a VAE file's keys (encoder.* / decoder.*, or first_stage_model.* of a checkpoint)."""
    from ..networks.build import build_from_state_dict
    from ..networks.vae import AutoencoderKL
    from .checkpoint_files import split_vae
    from .precision import dtype_name, vae_dtype
    from .vae_model import VAEModel

    weights, config = split_vae(sd)
    dtype = vae_dtype()
    handle = _private_handle(f"VAE from a state dict ({dtype_name(dtype)})",
                             lambda: build_from_state_dict(lambda: AutoencoderKL(config), weights, dtype), weights,
                             dtype)
    return VAEModel(handle, dtype, config.downscale_factor, config.latent_channels)


def diffusion_model_from_state_dict(sd: dict):
    """ComfyUI's load_diffusion_model_state_dict: an SD1.x/SD2.x/SDXL UNet (LDM names, with or without
    model.diffusion_model., or diffusers names) as a MODEL."""
    from ..networks.build import build_from_state_dict
    from ..networks.unet import UNetModel
    from .checkpoint_files import detect_unet
    from .component_files import unet_weights
    from .loading import diffusion_model
    from .precision import dtype_name, unet_dtype

    weights = unet_weights(sd)
    arch = detect_unet(weights, {}, sd)
    dtype = unet_dtype()
    handle = _private_handle(f"{arch.description} UNet from a state dict ({dtype_name(dtype)})",
                             lambda: build_from_state_dict(lambda: UNetModel(arch.unet_config), weights, dtype),
                             weights, dtype)
    return diffusion_model(handle, arch, dtype)
