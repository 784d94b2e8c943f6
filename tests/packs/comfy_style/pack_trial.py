"""Uses of ComfyUI's module names that real packs make and the 2026-12 pack trial found broken here, written the
way those packs write them (rgthree-comfy, ComfyUI-KJNodes / ComfyUI_essentials, efficiency-nodes-comfyui,
Comfyroll, rgthree's Power Lora Loader)."""

import random

import comfy.sd
import comfy.utils
import folder_paths
from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler

import nodes
from nodes import SaveImage


class TrialImageResize:
    """rgthree's Image Resize: its method combo is ComfyUI's own list, read from the core class."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "width": ("INT", {"default": 0, "min": 0, "max": nodes.MAX_RESOLUTION}),
            "method": (nodes.ImageScale.upscale_methods,),
            "crop": (nodes.ImageScale.crop_methods,),
            "latent_method": (nodes.LatentUpscale.upscale_methods,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "resize"
    CATEGORY = "comfy_style"

    def resize(self, image, width, method, crop, latent_method):
        height = round(image.shape[1] * width / image.shape[2])
        return nodes.ImageScale().upscale(image, method, width, height, crop)


class TrialMaskPreview(SaveImage):
    """KJNodes' / essentials' mask previews: a SaveImage subclass that picks the temp folder in __init__."""

    def __init__(self):
        self.output_dir = folder_paths.get_temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    FUNCTION = "execute"
    CATEGORY = "comfy_style"

    def execute(self, mask, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        preview = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        return self.save_images(preview, filename_prefix, prompt, extra_pnginfo)


class TrialSaveToUserFolder(TrialMaskPreview):
    """A subclass whose output_dir is no folder this server serves files from: a clear error, not a stray file."""

    def __init__(self):
        super().__init__()
        self.output_dir = folder_paths.get_user_directory()


class TrialLoraFromStateDict:
    """efficiency-nodes' / Comfyroll's LoRA stacks: the file read with load_torch_file, applied with
    comfy.sd.load_lora_for_models; `which` leaves out the model or the CLIP (None in, None out)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0}),
            "which": (["both", "model only", "clip only"],),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    FUNCTION = "apply"
    CATEGORY = "comfy_style"

    def apply(self, model, clip, lora_name, strength_model, strength_clip, which):
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_name), safe_load=True)
        given_model = None if which == "clip only" else model
        given_clip = None if which == "model only" else clip
        new_model, new_clip = comfy.sd.load_lora_for_models(given_model, given_clip, lora, strength_model,
                                                            strength_clip)
        returned = f"model={new_model is not None} clip={new_clip is not None}"
        return (new_model if new_model is not None else model, new_clip if new_clip is not None else clip, returned)


class _FlexibleOptional(dict):
    """rgthree's FlexibleOptionalInputType: claims every input name, so a prompt may carry any number of them."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def __getitem__(self, key):
        return (self.kind,)

    def __contains__(self, key):
        return True


class TrialFlexibleLoras:
    """rgthree's Power Lora Loader: any number of `lora_N` widget values (dicts), none declared by name."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": _FlexibleOptional("*")}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "collect"
    CATEGORY = "comfy_style"
    OUTPUT_NODE = True

    def collect(self, **kwargs):
        names = sorted(f"{key}:{value['lora']}" for key, value in kwargs.items() if key.startswith("lora_"))
        return {"ui": {"text": [",".join(names)]}, "result": (",".join(names),)}


class TrialAlignYourSteps:
    """efficiency-nodes' "AYS SD1" scheduler: the core AYS node called as a function for its sigmas."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 10, "min": 1, "max": 100})}}

    RETURN_TYPES = ()
    FUNCTION = "sigmas"
    CATEGORY = "comfy_style"
    OUTPUT_NODE = True

    def sigmas(self, steps):
        (sigmas,) = AlignYourStepsScheduler().get_sigmas("SD1", steps, denoise=1.0)
        return {"ui": {"sigmas": [round(float(value), 3) for value in sigmas]}}


NODE_CLASS_MAPPINGS = {
    "TrialAlignYourSteps": TrialAlignYourSteps,
    "TrialImageResize": TrialImageResize,
    "TrialMaskPreview": TrialMaskPreview,
    "TrialSaveToUserFolder": TrialSaveToUserFolder,
    "TrialLoraFromStateDict": TrialLoraFromStateDict,
    "TrialFlexibleLoras": TrialFlexibleLoras,
}
