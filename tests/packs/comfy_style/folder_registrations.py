"""A single-file pack registering model folders the two ways ComfyUI packs do, at import time."""

import os

import folder_paths

folder_paths.add_model_folder_path("comfy_style_added", os.path.join(folder_paths.models_dir, "comfy_style_added"))
folder_paths.folder_names_and_paths["comfy_style_assigned"] = (
    [os.path.join(folder_paths.models_dir, "comfy_style_assigned")], {".bin"})
folder_paths.folder_names_and_paths["comfy_style_assigned"][1].add(".gguf")


class ListRegisteredModels:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (folder_paths.get_filename_list("comfy_style_assigned"),)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def run(self, model_name):
        return {"ui": {"lists": [{
            "assigned": folder_paths.get_filename_list("comfy_style_assigned"),
            "added": folder_paths.get_filename_list("comfy_style_added"),
            "checkpoints": folder_paths.get_filename_list("checkpoints"),
            "full_path": folder_paths.get_full_path("comfy_style_assigned", model_name),
        }]}}


NODE_CLASS_MAPPINGS = {"ListRegisteredModels": ListRegisteredModels}
