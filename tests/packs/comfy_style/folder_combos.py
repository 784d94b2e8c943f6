"""A single-file pack whose combos list model folders it registers at import, the ways ComfyUI packs do: a new
folder with add_model_folder_path, and one more directory appended to a built-in folder's list."""

import os

import folder_paths

UPSCALERS = os.path.join(folder_paths.models_dir, "comfy_style_upscalers")
folder_paths.add_model_folder_path("comfy_style_upscalers", UPSCALERS)
folder_paths.folder_names_and_paths["loras"][0].append(os.path.join(folder_paths.base_path, "more_loras"))


class PickPackModels:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"upscaler": (folder_paths.get_filename_list("comfy_style_upscalers"),),
                             "lora": (folder_paths.get_filename_list("loras"),)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def run(self, upscaler, lora):
        return {"ui": {"picked": [{"upscaler": folder_paths.get_full_path("comfy_style_upscalers", upscaler),
                                   "lora": folder_paths.get_full_path("loras", lora)}]}}


NODE_CLASS_MAPPINGS = {"PickPackModels": PickPackModels}
