"""A pack that uses ComfyUI's comfy.sd / CLIP / VAE internals the way real packs do (efficiency-nodes' copy of
BlenderNeko's advanced CLIP encode, loaders that call comfy.sd directly) and reports what it saw."""

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy.sd1_clip import SD1ClipModel, SDClipModel
from comfy.sdxl_clip import SDXLClipG, SDXLClipModel, SDXLRefinerClipModel

import nodes


def _encode_member(clip, windows, member):
    """BlenderNeko's per-encoder call: options on cond_stage_model, load_model_gpu(patcher), member encode."""
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    comfy.model_management.load_model_gpu(clip.patcher)
    return getattr(clip.cond_stage_model, member).encode_token_weights(windows)


class SdSurfaceAdvancedEncode:
    """Encodes the way the advanced CLIP encode does for the "comfy" interpretation."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "comfy_style"

    def encode(self, clip, text):
        tokens = clip.tokenize(text, return_word_ids=True)
        plain = {key: [[(token, weight) for token, weight, _ in window] for window in windows]
                 for key, windows in tokens.items()}
        if isinstance(clip.cond_stage_model, (SDXLClipModel, SDXLRefinerClipModel, SDXLClipG)):
            cond_l = None
            if isinstance(clip.cond_stage_model, SDXLClipModel):
                cond_l, _ = _encode_member(clip, plain["l"], "clip_l")
            cond_g, pooled = _encode_member(clip, plain["g"], "clip_g")
            cond = cond_g if cond_l is None else torch.cat([cond_l, cond_g], dim=-1)
        else:
            cond, pooled = clip.encode_from_tokens({"l": plain["l"]}, return_pooled=True)
        return ([[cond, {"pooled_output": pooled}]],)


class SdSurfaceReport:
    """Output node: compares the comfy.sd surface with the core loaders and encoders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "vae": ("VAE",), "text": ("STRING",),
                             "text_encoder": ("STRING",), "vae_file": ("STRING",), "unet_file": ("STRING",)}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "comfy_style"

    def report(self, clip, vae, text, text_encoder, vae_file, unet_file):
        facts = {}
        stage = clip.cond_stage_model
        facts["kinds"] = [isinstance(stage, SD1ClipModel), isinstance(stage, SDXLClipModel),
                          isinstance(getattr(stage, "clip_l", None), SDClipModel),
                          isinstance(getattr(stage, "clip_g", None), SDXLClipG)]
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        stage_cond, stage_pooled = stage.encode_token_weights(tokens)
        facts["stage_same"] = bool(torch.equal(cond, stage_cond) and torch.equal(pooled, stage_pooled))
        _, unprojected = clip.encode_from_tokens(tokens, return_pooled="unprojected")
        facts["unprojected_shape"] = list(unprojected.shape)
        facts["patcher"] = [str(clip.patcher.load_device), clip.load_model().model is stage]

        # A CLIP from comfy.sd.load_clip encodes like CLIPLoader's.
        path = folder_paths.get_full_path("text_encoders", text_encoder)
        loaded = comfy.sd.load_clip([path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                    clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        (core_clip,) = nodes.CLIPLoader().load_clip(text_encoder, "stable_diffusion")
        facts["load_clip_same"] = bool(torch.equal(loaded.encode_from_tokens(loaded.tokenize(text)),
                                                   core_clip.encode_from_tokens(core_clip.tokenize(text))))
        facts["is_clip"] = isinstance(loaded, comfy.sd.CLIP)
        refusals = []
        for refused in (lambda: comfy.sd.load_clip([path], clip_type=comfy.sd.CLIPType.SD3), comfy.sd.VAE,
                        lambda: comfy.sd.load_diffusion_model_state_dict({}, {"dtype": torch.float8_e4m3fn})):
            try:
                refused()
            except (ValueError, NotImplementedError) as exc:
                refusals.append(str(exc).split(" (")[0].split(";")[0])
        facts["refusals"] = refusals

        # VAE(sd=...) decodes like VAELoader's.
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path("vae", vae_file))
        built = comfy.sd.VAE(sd=sd)
        (core_vae,) = nodes.VAELoader().load_vae(vae_file)
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        facts["vae_sd_same"] = bool(torch.equal(built.decode(latent), core_vae.decode(latent)))
        facts["is_vae"] = isinstance(built, comfy.sd.VAE)
        facts["vae_sd_keys"] = sorted(built.get_sd()) == sorted(core_vae.first_stage_model.state_dict())
        pixels = vae.process_input(torch.ones(1, 8, 8, 3))
        facts["process"] = [float(pixels.max()), float(vae.process_output(pixels).max())]

        # load_diffusion_model is UNETLoader's.
        unet = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", unet_file))
        (core_unet,) = nodes.UNETLoader().load_unet(unet_file, "default")
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        same = torch.equal(unet.unet_apply(x, torch.tensor([300.0]), context=cond),
                           core_unet.unet_apply(x, torch.tensor([300.0]), context=cond))
        facts["unet_same"] = bool(same)
        return {"ui": {"facts": [facts]}}


NODE_CLASS_MAPPINGS = {"SdSurfaceAdvancedEncode": SdSurfaceAdvancedEncode, "SdSurfaceReport": SdSurfaceReport}
