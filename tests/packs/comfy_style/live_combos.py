"""Combos built the way LoRA-stack packs build them: a fixed choice added to a model folder's files."""

import folder_paths


class LiveLoraChoice:
    @classmethod
    def INPUT_TYPES(cls):
        with_last = folder_paths.get_filename_list("loras")
        with_last.append("Last")
        return {"required": {"lora": (["None"] + folder_paths.get_filename_list("loras"),),
                             "other": (with_last,)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "pick"
    CATEGORY = "comfy_style"
    OUTPUT_NODE = True

    def pick(self, lora, other):
        return {"ui": {"text": [f"{lora}|{other}"]}, "result": (lora,)}


NODE_CLASS_MAPPINGS = {"LiveLoraChoice": LiveLoraChoice}
