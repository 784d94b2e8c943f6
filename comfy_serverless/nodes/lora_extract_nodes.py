"""LoraSave ("Extract and Save Lora", _for_testing): a LoRA file from a difference MODEL and/or CLIP (made with
ModelMergeSubtract / CLIPMergeSubtract), written to the output folder (default output/loras/) as ComfyUI does.
The extraction is models/lora_extract.py. Standard library only at module level."""

from __future__ import annotations

LORA_TYPES = ["standard", "full_diff"]


class LoraSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "filename_prefix": ("STRING", {"default": "loras/ComfyUI_extracted_lora", "multiline": False}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 4096, "step": 1}),
                "lora_type": ("COMBO", {"options": LORA_TYPES, "multiselect": False}),
                "bias_diff": ("BOOLEAN", {"default": True}),
            },
            "optional": {
                "model_diff": ("MODEL", {"tooltip": "The ModelSubtract output to be converted to a lora."}),
                "text_encoder_diff": ("CLIP", {"tooltip": "The CLIPSubtract output to be converted to a lora."}),
            },
            "hidden": {"prompt": ("PROMPT",), "extra_pnginfo": ("EXTRA_PNGINFO",)},  # V3 style, as the reference
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    DEPRECATED = False
    API_NODE = False

    def save(self, filename_prefix, rank, lora_type, bias_diff, prompt=None, extra_pnginfo=None, model_diff=None,
             text_encoder_diff=None):
        from ..models.checkpoint_saving import output_file, safetensors_path, write_safetensors
        from ..models.lora_extract import text_encoder_lora, unet_lora

        if lora_type not in LORA_TYPES:
            raise ValueError(f"unknown lora_type {lora_type!r}; expected one of {LORA_TYPES}")
        if model_diff is None and text_encoder_diff is None:
            return {}  # nothing to extract: ComfyUI writes no file either
        tensors = {}
        if model_diff is not None:
            tensors.update(unet_lora(model_diff, rank, lora_type, bias_diff))
        if text_encoder_diff is not None:
            tensors.update(text_encoder_lora(text_encoder_diff, rank, lora_type, bias_diff))
        folder, base, counter = output_file(filename_prefix)
        write_safetensors(safetensors_path(folder, base, counter), tensors)
        return {}


NODE_CLASS_MAPPINGS = {"LoraSave": LoraSave}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraSave": "Extract and Save Lora"}
