"""A pack that calls ComfyUI's methods on the MODEL, CLIP and VAE it receives, the way real packs do."""

import comfy.model_management
import comfy.samplers
import torch

import nodes


class ModelObjectsTextEncode:
    """A prompt encoder of the kind packs write: tokenize, then encode_from_tokens."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "comfy_style"

    def encode(self, clip, text):
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return ([[cond, {"pooled_output": pooled}]],)


class ModelObjectsDecode:
    """A decoder of the kind packs write: vae.decode on the latent's samples."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "comfy_style"

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class ModelObjectsReport:
    """Output node: compares the objects' methods with the core nodes and reports what it saw."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "text": ("STRING",)}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def report(self, model, clip, vae, text):
        facts = {}
        (core,) = nodes.CLIPTextEncode().encode(clip, text)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        facts["encode_same"] = bool(torch.equal(cond, core[0][0]) and torch.equal(pooled, core[0][1]["pooled_output"]))
        scheduled = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        facts["scheduled_same"] = bool(torch.equal(scheduled[0][0], core[0][0]))
        latent = torch.randn(1, vae.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
        (image,) = nodes.VAEDecode().decode(vae, {"samples": latent})
        facts["decode_same"] = bool(torch.equal(vae.decode(latent), image))
        facts["encoded"] = list(vae.encode(image).shape)
        facts["compression"] = [vae.spacial_compression_decode(), vae.spacial_compression_encode(),
                                vae.downscale_ratio, vae.upscale_ratio]
        clone = model.clone()
        clone.model_options["transformer_options"]["pack_key"] = 1
        facts["clone_isolated"] = "pack_key" not in model.model_options["transformer_options"]
        sampling = model.get_model_object("model_sampling")
        facts["sigmas"] = len(comfy.samplers.calculate_sigmas(sampling, "karras", 4))
        facts["devices"] = [str(model.load_device), str(model.offload_device),
                            str(comfy.model_management.get_torch_device())]
        facts["dtype"] = isinstance(model.model_dtype(), torch.dtype)
        return {"ui": {"facts": [facts]}}


NODE_CLASS_MAPPINGS = {
    "ModelObjectsTextEncode": ModelObjectsTextEncode,
    "ModelObjectsDecode": ModelObjectsDecode,
    "ModelObjectsReport": ModelObjectsReport,
}
