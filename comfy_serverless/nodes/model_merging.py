"""Model merging and saving: ModelMerge*, CLIPMerge*, CheckpointSave and friends.

Merges are weight patches on a clone of the first model (ComfyUI's add_patches): per weight,
merged = first * ratio + second * (1 - ratio) (Simple / Blocks), first + second (Add), (first - second) * m
(Subtract). They apply lazily when the model runs, and saving writes the merged weights.
Standard library only at module level (see nodes/__init__.py).
"""

from __future__ import annotations

UNET_KEY_PREFIX = "diffusion_model."
# CLIP keys never merged (ComfyUI skips them: buffers, not learned weights).
CLIP_SKIPPED_SUFFIXES = (".position_ids", ".logit_scale")


def _ratio(default=1.0, minimum=0.0, maximum=1.0):
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": 0.01})


def _merged(model1, model2, strengths) -> object:
    """model1's clone with model2's UNet weights patched in; strengths(key) -> (strength_patch, strength_model)."""
    merged = model1.clone()
    for key, value in model2.get_key_patches(UNET_KEY_PREFIX).items():
        strength_patch, strength_model = strengths(key)
        merged.add_patches({key: value}, strength_patch, strength_model)
    return merged


class ModelMergeSimple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "ratio": _ratio()}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, model1, model2, ratio):
        return (_merged(model1, model2, lambda key: (1.0 - ratio, ratio)),)


class ModelMergeBlocks:
    """Per-block ratios: each weight takes the ratio of the longest input name its UNet name starts with; names
    matching none take the first input's."""

    BLOCKS = ("input", "middle", "out")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",),
                             **{name: _ratio() for name in cls.BLOCKS}}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, model1, model2, **ratios):
        if not ratios:
            raise ValueError(f"{type(self).__name__} needs at least one block ratio")
        # The first block's ratio (ComfyUI's first keyword), whatever order the keywords come in.
        default = ratios.get(self.BLOCKS[0], next(iter(ratios.values())))

        def strengths(key):
            name = key[len(UNET_KEY_PREFIX):]
            matches = [block for block in ratios if name.startswith(block)]
            ratio = ratios[max(matches, key=len)] if matches else default
            return 1.0 - ratio, ratio

        return (_merged(model1, model2, strengths),)


class ModelMergeAdd:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, model1, model2):
        return (_merged(model1, model2, lambda key: (1.0, 1.0)),)


class ModelMergeSubtract:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "multiplier": _ratio(1.0, -10.0, 10.0)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, model1, model2, multiplier):
        return (_merged(model1, model2, lambda key: (-multiplier, multiplier)),)


def _block_names(inputs: int, middle: int, outputs: int, dot: str) -> tuple:
    return (("time_embed.", "label_emb.") + tuple(f"input_blocks.{i}{dot}" for i in range(inputs))
            + tuple(f"middle_block.{i}{dot}" for i in range(middle))
            + tuple(f"output_blocks.{i}{dot}" for i in range(outputs)) + ("out.",))


class ModelMergeSD1(ModelMergeBlocks):
    BLOCKS = _block_names(12, 3, 12, ".")
    CATEGORY = "advanced/model_merging/model_specific"


class ModelMergeSD2(ModelMergeSD1):
    pass


class ModelMergeSDXL(ModelMergeSD1):
    BLOCKS = _block_names(9, 3, 9, "")


def _clip_merged(clip1, clip2, strength_patch: float, strength_model: float):
    from ..models import clip_patcher_api

    merged = clip1.clone()
    patches = {key: value for key, value in clip_patcher_api.get_key_patches(clip2).items()
               if not key.endswith(CLIP_SKIPPED_SUFFIXES)}
    clip_patcher_api.add_patches(merged, patches, strength_patch, strength_model)
    return merged


class CLIPMergeSimple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",), "ratio": _ratio()}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, clip1, clip2, ratio):
        return (_clip_merged(clip1, clip2, 1.0 - ratio, ratio),)


class CLIPMergeAdd:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, clip1, clip2):
        return (_clip_merged(clip1, clip2, 1.0, 1.0),)


class CLIPMergeSubtract:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",), "multiplier": _ratio(1.0, -10.0, 10.0)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"

    def merge(self, clip1, clip2, multiplier):
        return (_clip_merged(clip1, clip2, -multiplier, multiplier),)


# ---- saving -----------------------------------------------------------------------------------------

_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def _disable_metadata() -> bool:
    from .. import settings

    return bool(settings.current().disable_metadata)


class CheckpointSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                             "filename_prefix": ("STRING", {"default": "checkpoints/ComfyUI"})},
                "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "advanced/model_merging"

    def save(self, model, clip, vae, filename_prefix, prompt=None, extra_pnginfo=None):
        from ..models import checkpoint_saving as saving

        folder, base, counter = saving.output_file(filename_prefix)
        metadata = saving.checkpoint_metadata(model, f"{base} {counter}", prompt, extra_pnginfo,
                                              _disable_metadata())
        saving.save_checkpoint(saving.safetensors_path(folder, base, counter), model, clip, vae, metadata)
        return {}


class CLIPSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "filename_prefix": ("STRING", {"default": "clip/ComfyUI"})},
                "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "advanced/model_merging"

    def save(self, clip, filename_prefix, prompt=None, extra_pnginfo=None):
        """One file per text encoder, '<prefix>_<encoder>_<counter>_.safetensors', transformers names."""
        from ..models import checkpoint_saving as saving

        metadata = {}
        if not _disable_metadata():
            metadata = {"format": "pt", **saving.prompt_metadata(prompt, extra_pnginfo)}
        for encoder, weights in saving.clip_file_weights(clip).items():
            folder, base, counter = saving.output_file(f"{filename_prefix}_{encoder}")
            saving.write_safetensors(saving.safetensors_path(folder, base, counter), weights, metadata)
        return {}


class VAESave:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "filename_prefix": ("STRING", {"default": "vae/ComfyUI_vae"})},
                "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "advanced/model_merging"

    def save(self, vae, filename_prefix, prompt=None, extra_pnginfo=None):
        from ..models import checkpoint_saving as saving

        metadata = {} if _disable_metadata() else saving.prompt_metadata(prompt, extra_pnginfo)
        folder, base, counter = saving.output_file(filename_prefix)
        weights = dict(vae.handle.get().state_dict())
        saving.write_safetensors(saving.safetensors_path(folder, base, counter), weights, metadata)
        return {}


class ModelSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "filename_prefix": ("STRING", {"default": "diffusion_models/ComfyUI"})},
                "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "advanced/model_merging"

    def save(self, model, filename_prefix, prompt=None, extra_pnginfo=None):
        """The UNet alone under model.diffusion_model.* (UNETLoader reads it back)."""
        from ..models import checkpoint_saving as saving

        folder, base, counter = saving.output_file(filename_prefix)
        metadata = saving.checkpoint_metadata(model, f"{base} {counter}", prompt, extra_pnginfo,
                                              _disable_metadata())
        saving.write_safetensors(saving.safetensors_path(folder, base, counter), saving.unet_weights(model), metadata)
        return {}


NODE_CLASS_MAPPINGS = {
    "ModelMergeSimple": ModelMergeSimple,
    "ModelMergeBlocks": ModelMergeBlocks,
    "ModelMergeAdd": ModelMergeAdd,
    "ModelMergeSubtract": ModelMergeSubtract,
    "ModelMergeSD1": ModelMergeSD1,
    "ModelMergeSD2": ModelMergeSD2,
    "ModelMergeSDXL": ModelMergeSDXL,
    "CLIPMergeSimple": CLIPMergeSimple,
    "CLIPMergeAdd": CLIPMergeAdd,
    "CLIPMergeSubtract": CLIPMergeSubtract,
    "CheckpointSave": CheckpointSave,
    "CLIPSave": CLIPSave,
    "VAESave": VAESave,
    "ModelSave": ModelSave,
}
NODE_DISPLAY_NAME_MAPPINGS = {"CheckpointSave": "Save Checkpoint"}
