"""A LoRA stack written the way packs (LoRA managers, rgthree-style stacks) use comfy.lora: key maps, load_lora,
then add_patches on clones."""

import comfy.lora
import comfy.utils
import folder_paths


class ComfyLoraStack:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "lora_name": (folder_paths.get_filename_list("loras"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0}),
                             "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    CATEGORY = "comfy_style"

    def apply(self, model, clip, lora_name, strength_model, strength_clip):
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_name), safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        patches = comfy.lora.load_lora(lora, key_map)
        new_model = model.clone()
        loaded = new_model.add_patches(patches, strength_model)
        new_clip = clip.clone()
        loaded_clip = new_clip.add_patches(patches, strength_clip)
        if not loaded or not loaded_clip:
            raise ValueError("the LoRA matched no weight")
        return (new_model, new_clip)


NODE_CLASS_MAPPINGS = {"ComfyLoraStack": ComfyLoraStack}
