"""ComfyUI's ModelPatcher methods on MODEL objects, as packs and ComfyUI's core nodes call them.

They change the clone they are called on (ComfyUI's contract: clone first, then patch). The sampler honours
every option they set: sampling/denoising.py reads the cfg functions and the function wrapper, networks/unet.py
and networks/attention_patches.py the block and attention patches; weight patches apply in models/patching.py.
"""

from __future__ import annotations

UNET_PREFIX = "diffusion_model."
PATCHABLE_OBJECTS = ("model_sampling", "latent_format")


class LatentFormat:
    """ComfyUI's latent format of the SD families: a single scale factor between the VAE's latent and the model's."""

    latent_channels = 4

    def __init__(self, scale_factor: float):
        self.scale_factor = scale_factor

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


def copy_model_options(options: dict) -> dict:
    """A clone's own model_options: dicts and lists copied all the way down, functions and tensors shared."""
    if isinstance(options, dict):
        return {key: copy_model_options(value) for key, value in options.items()}
    if isinstance(options, list):
        return [copy_model_options(value) for value in options]
    return options


class ModelPatcherMethods:
    """Mixed into DiffusionModel, which provides model_options, object_patches, patches, network()."""

    # ---- sampling functions ------------------------------------------------------------------------------

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        self._disable_cfg1(disable_cfg1_optimization)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options.setdefault("sampler_post_cfg_function", []).append(post_cfg_function)
        self._disable_cfg1(disable_cfg1_optimization)

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function, disable_cfg1_optimization=False):
        self.model_options.setdefault("sampler_pre_cfg_function", []).append(pre_cfg_function)
        self._disable_cfg1(disable_cfg1_optimization)

    def _disable_cfg1(self, disable: bool) -> None:
        if disable:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    # ---- block and attention patches ---------------------------------------------------------------------

    def _transformer_options(self) -> dict:
        return self.model_options.setdefault("transformer_options", {})

    def set_model_patch(self, patch, name: str):
        self._transformer_options().setdefault("patches", {}).setdefault(name, []).append(patch)

    def set_model_patch_replace(self, patch, name: str, block_name: str, number: int, transformer_index=None):
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        self._transformer_options().setdefault("patches_replace", {}).setdefault(name, {})[key] = patch

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_input_block_patch(self, patch):
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    # ---- objects --------------------------------------------------------------------------------------------

    def add_object_patch(self, name: str, obj):
        """Replace a part of the model for this clone: "model_sampling" (the noise schedule) or "latent_format"
        (an object with process_in / process_out between the VAE's latent and the model's)."""
        if name not in PATCHABLE_OBJECTS:
            raise NotImplementedError(f"this server's MODEL can only replace {PATCHABLE_OBJECTS}, not {name!r}")
        self.object_patches[name] = obj

    def get_model_object(self, name: str):
        """ComfyUI's way to reach the model's parts: "model_sampling" and "diffusion_model" (the UNet)."""
        if name in self.object_patches:
            return self.object_patches[name]
        if name == "model_sampling":
            return self.model_sampling
        if name == "latent_format":
            return LatentFormat(self.latent_scale)
        if name == "diffusion_model":
            return self.network()
        raise AttributeError(f"this server's MODEL has no object {name!r} ('model_sampling', 'latent_format', "
                             "'diffusion_model')")

    # ---- weights ---------------------------------------------------------------------------------------

    @property
    def model(self):
        """ComfyUI's `model.model` (the BaseModel), as packs pass it to comfy.lora.model_lora_keys_unet."""
        return BaseModelView(self)

    def model_state_dict(self, filter_prefix=None) -> dict:
        """The UNet's weights (with this clone's patches) under ComfyUI's names ("diffusion_model.<name>")."""
        weights = {UNET_PREFIX + name: p for name, p in self.network().state_dict(keep_vars=True).items()}
        if filter_prefix is not None:
            weights = {k: v for k, v in weights.items() if k.startswith(filter_prefix)}
        return {k: v.detach() for k, v in weights.items()}

    def get_key_patches(self, filter_prefix=None) -> dict:
        """ComfyUI's key patches of this model: {name: (weight,)}, the weight as this clone computes it, ready
        to be given to another clone's add_patches (model merging)."""
        return {name: (weight,) for name, weight in self.model_state_dict(filter_prefix).items()}

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        """Add weight patches to this clone: per key, weight = weight * strength_model + strength_patch * value.

        Values as ComfyUI gives them: (tensor,) or ("diff", (tensor,)) or ("set", (tensor,)) or comfy.lora's
        ("lora", (up, down, alpha, mid, dora_scale, reshape)); a list whose
        first item is such a value (get_key_patches of a patched model) uses that first item. Returns the keys
        that name a weight of this model; others are ignored, as ComfyUI does.
        """
        from .patching import KeyPatch

        known = set(self.handle.get().state_dict().keys())
        entries = {}
        for key, value in patches.items():
            name = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
            if name not in known:
                continue
            entries[name] = (*_patch_value(key, value), strength_patch, strength_model)
        if entries:
            object.__setattr__(self, "patches", self.patches + (KeyPatch({"": entries}),))
        return [UNET_PREFIX + name for name in entries]


class BaseModelView:
    """What packs read of ComfyUI's BaseModel: the UNet (`diffusion_model`) and its weights under ComfyUI's names."""

    def __init__(self, patcher):
        self.patcher = patcher

    @property
    def diffusion_model(self):
        return self.patcher.network()

    def state_dict(self) -> dict:
        return self.patcher.model_state_dict()


def _patch_value(key: str, value) -> tuple:
    import torch

    if isinstance(value, list):
        value = value[0]
    if getattr(value, "name", None) == "lora" and isinstance(getattr(value, "weights", None), tuple):
        value = ("lora", value.weights)  # ComfyUI's LoRAAdapter object
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "lora":
        return "lora", _low_rank_patch(key, value[1])
    if isinstance(value, tuple) and len(value) == 1 and value[0] is None:
        return "scale", None  # ComfyUI's (None,): no tensor, the weight is only scaled by strength_model
    if torch.is_tensor(value):
        return "diff", value
    if isinstance(value, tuple) and len(value) == 1 and torch.is_tensor(value[0]):
        return "diff", value[0]
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("diff", "set"):
        payload = value[1][0] if isinstance(value[1], (tuple, list)) else value[1]
        if torch.is_tensor(payload):
            return value[0], payload
    kind = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else type(value).__name__
    raise NotImplementedError(f"weight patch {kind!r} for {key} is not supported here (only diff, set and lora; "
                              "LoHa, LoKr, GLoRA and OFT are not)")


def _low_rank_patch(key: str, weights):
    """comfy.lora's (up, down, alpha, mid, dora_scale, reshape) as a patching.LowRankPatch."""
    import torch

    from .lora import LoraEntry
    from .patching import LowRankPatch

    if not isinstance(weights, (tuple, list)) or len(weights) < 2:
        raise ValueError(f"lora patch for {key} must be (up, down, alpha, mid, dora_scale, reshape)")
    up, down, alpha, mid, dora_scale, reshape = (tuple(weights) + (None,) * 4)[:6]
    if not (torch.is_tensor(up) and torch.is_tensor(down)):
        raise ValueError(f"lora patch for {key}: up and down must be tensors")
    if reshape is not None:
        raise NotImplementedError(f"lora patch for {key} reshapes the weight ({reshape}); not supported here")
    if torch.is_tensor(alpha):
        alpha = float(alpha.item())
    return LowRankPatch(LoraEntry(up=up, down=down, alpha=alpha, mid=mid), dora_scale)
