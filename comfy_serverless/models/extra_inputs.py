"""The extra UNet inputs a conditioning entry gives besides its text context (ComfyUI's "encode_adm" and
"concat_cond"):

    y         SDXL base: pooled text + embedded (height, width, crop_h, crop_w, target_height, target_width)
              SDXL refiner: pooled text + embedded (height, width, crop_h, crop_w, aesthetic_score)
              (either: with unCLIPConditioning, "revision", the pooled text is replaced by the image embedding)
              SD 2.1 unCLIP: noise-augmented CLIP image embeddings (models/unclip.py), zeros without any
    c_concat  inpainting UNets: [mask, masked image latent] (5 channels); instruct-pix2pix: [image latent] (4)
    x4 upscaler: c_concat the low-res image in [-1, 1] at latent size ("concat_image", noise-augmented by
              "noise_augmentation" with the seed - 10, as ComfyUI), y the integer noise level (0..350)

extra_unet_inputs(model, options, latent_shape, latent_image=None, denoise_mask=None, seed=None) is called once per
conditioning entry and latent shape, with the entry's options; it returns UNet keyword inputs (y batched per entry,
repeated to the batch by the sampler; c_concat already the latent's batch size). latent_image is the sampler's
input latent in the model's space and denoise_mask the latent's noise mask: an inpainting model whose
conditioning carries no "concat_latent_image" (VAEEncodeForInpaint's latent) takes its channels from them.
seed is the sampler's noise seed, which seeds unCLIP's noise augmentation (0 when unknown, as ComfyUI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .diffusion_model import DiffusionModel

# SDXL's size conditioning: pixels per latent cell, used for ComfyUI's default original/target size.
LATENT_TO_PIXELS = 8
# Full SDXL base and refiner: 1280 pooled + 6 / 5 * 256; other widths (test models) need a pooled output.
SDXL_POOLED_WIDTH = {2816: 1280, 2560: 1280}
# Numbers embedded after the pooled text, per adm kind.
ADM_NUMBERS = {"sdxl": 6, "sdxl_refiner": 5}
# The refiner's aesthetic score when the conditioning gives none (ComfyUI: lower for negative prompts).
AESTHETIC_SCORE = {"positive": 6.0, "negative": 2.5}
# The SD x4 upscaler: its low-res image is noised up to this level of a linear (in sqrt) 1e-4..0.02 schedule,
# the same betas its sampling uses; its latents are scaled by 0.08333.
X4_MAX_NOISE_LEVEL = 350
X4_BETAS = (0.0001, 0.02)
X4_LATENT_SCALE = 0.08333
# ComfyUI's latent of an all-"zero" (mid grey) image in SD's scaled latent space: an inpainting model's masked
# image when there is neither a mask nor an image to take it from.
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


@dataclass(frozen=True)
class SDModel(DiffusionModel):
    """A MODEL that knows which extra inputs its UNet takes (the loaders make these)."""

    adm_kind: str | None = None  # "sdxl", "sdxl_refiner" or "unclip": how y is built; None: no y
    concat_kind: str | None = None  # "inpaint" or "ip2p": what c_concat holds; None: no c_concat
    # unCLIP: the checkpoint's noise_augmentor.* buffers (prefix stripped; {} computes the schedule).
    noise_augmentor_state: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class X4UpscalerModel(SDModel):
    """The SD x4 upscaler's MODEL: its own latent scale and noise schedule, and y kept as integer labels."""

    @property
    def latent_scale(self) -> float:
        return X4_LATENT_SCALE

    @property
    def model_sampling(self):
        if "model_sampling" in self.object_patches:
            return self.object_patches["model_sampling"]
        if not self._sampling:
            from ..sampling.denoising import ModelSampling

            self._sampling.append(ModelSampling(self.prediction, beta_start=X4_BETAS[0], beta_end=X4_BETAS[1]))
        return self._sampling[0]

    def unet_apply(self, x, timesteps, context=None, y=None, c_concat=None, control=None, transformer_options=None,
                   weight_patches=(), **_):
        """As DiffusionModel.unet_apply, but the noise level labels are not cast to the compute dtype (bf16
        cannot hold 350)."""
        import torch

        from .patching import patched_module

        unet = patched_module(self.handle, self.patches + tuple(weight_patches)) if weight_patches else self.network()
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        with torch.no_grad():
            out = unet(x.to(self.dtype), timesteps, context.to(self.dtype), y, control=control,
                       transformer_options=transformer_options)
        return out.float()


def extra_unet_inputs(model, options: dict, latent_shape, latent_image=None, denoise_mask=None, seed=None) -> dict:
    """{"y": ..., "c_concat": ...} as far as the model takes them."""
    inputs = {}
    if model.adm_channels is not None:
        if getattr(model, "adm_kind", None) == "unclip":
            from .unclip import unclip_y_for_options

            inputs["y"] = unclip_y_for_options(options, getattr(model, "noise_augmentor_state", {}),
                                               model.adm_channels, 0 if seed is None else seed)
        else:
            inputs["y"] = _adm(model, options, latent_shape, seed)
    concat_kind = getattr(model, "concat_kind", None)
    if concat_kind == "x4_upscale":
        inputs.update(x4_upscale_inputs(options, latent_shape, seed))
    elif concat_kind == "ip2p":
        inputs["c_concat"] = _ip2p_concat(options, latent_shape)
    elif concat_kind == "inpaint":
        inputs["c_concat"] = _inpaint_concat(model, options, latent_shape, latent_image, denoise_mask)
    return inputs


# ---- y ---------------------------------------------------------------------------------------------


def _adm(model, options: dict, latent_shape, seed=None):
    """Sizes come from the conditioning options (CLIPTextEncodeSDXL's / ...Refiner's keys) or default to the latent
    size in pixels, crop 0; the refiner's aesthetic score defaults by the entry's prompt_type. The pooled part
    is the text's, or with unclip_conditioning the image embedding's (_revision_pooled)."""
    import torch

    from ..networks.unet import sdxl_adm_vector

    adm_kind = getattr(model, "adm_kind", None) or "sdxl"
    adm_channels = model.adm_channels
    height = options.get("height", latent_shape[2] * LATENT_TO_PIXELS)
    width = options.get("width", latent_shape[3] * LATENT_TO_PIXELS)
    numbers = [height, width, options.get("crop_h", 0), options.get("crop_w", 0)]
    if adm_kind == "sdxl_refiner":
        side = "negative" if options.get("prompt_type") == "negative" else "positive"
        numbers.append(options.get("aesthetic_score", AESTHETIC_SCORE[side]))
    else:
        numbers += [options.get("target_height", height), options.get("target_width", width)]
    pooled = options.get("pooled_output")
    pooled_width = pooled.shape[-1] if pooled is not None else SDXL_POOLED_WIDTH.get(adm_channels, 0)
    if options.get("unclip_conditioning"):
        pooled = _revision_pooled(options, pooled_width, seed)
    pooled = torch.zeros(1, pooled_width) if pooled is None else pooled.float().reshape(-1, pooled_width)
    number_width = (adm_channels - pooled_width) // len(numbers)
    if number_width <= 0 or pooled_width + len(numbers) * number_width != adm_channels:
        raise ValueError(f"pooled output of width {pooled_width} does not fit this model's conditioning "
                         f"vector ({adm_channels}); was the text encoded with this model's CLIP?")
    embedded = torch.tensor([[float(number) for number in numbers]], dtype=torch.float32)
    return sdxl_adm_vector(pooled, embedded.expand(pooled.shape[0], -1), number_width)


def _revision_pooled(options: dict, pooled_width: int, seed=None):
    """SDXL "revision": ComfyUI's SDXL models replace the pooled text by the noise-augmented image embeddings of
    unCLIPConditioning (an augmentor with 1280-wide level embeddings, merge level 0, the sampler's seed); only
    the embedding half of [embedding, level embedding] is used."""
    from .unclip import unclip_y

    if not pooled_width:
        raise ValueError("this SDXL model's pooled width is unknown: encode a prompt with its CLIP together with "
                         "unCLIPConditioning")
    for entry in options["unclip_conditioning"]:
        width = entry["clip_vision_output"].image_embeds.shape[-1]
        if width != pooled_width:
            raise ValueError(f"CLIP vision embeddings {width} wide do not fit this SDXL model's pooled output "
                             f"({pooled_width}): revision needs the CLIP vision model of its text encoder "
                             f"(ViT-bigG for SDXL)")
    y = unclip_y(options["unclip_conditioning"], {}, 2 * pooled_width, 0 if seed is None else seed,
                 merge_augmentation=0.0)
    return y[:, :pooled_width]


def x4_upscale_inputs(options: dict, latent_shape, seed=None) -> dict:
    """c_concat: the conditioning's low-res image fitted to the latent (black without one), noise-augmented when
    noise_augmentation > 0; y: round(350 * noise_augmentation) as a class label."""
    import torch

    from ..sampling.schedules import scaled_linear_betas

    batch, _, height, width = latent_shape
    image = options.get("concat_image")
    image = torch.zeros(batch, 3, height, width) if image is None else _fit(image.float(), latent_shape)
    augmentation = float(options.get("noise_augmentation", 0.0))
    level = round(X4_MAX_NOISE_LEVEL * augmentation)
    if augmentation > 0:
        alpha_cumprod = torch.cumprod(1.0 - scaled_linear_betas(*X4_BETAS), dim=0)[level]
        generator = torch.Generator().manual_seed((0 if seed is None else seed) - 10)
        noise = torch.randn(image.shape, generator=generator)
        image = float(alpha_cumprod.sqrt()) * image + float((1.0 - alpha_cumprod).sqrt()) * noise
    return {"c_concat": _to_batch(image, batch), "y": torch.tensor([level])}


# ---- c_concat --------------------------------------------------------------------------------------


def _ip2p_concat(options: dict, latent_shape):
    """The image's VAE latent as it is (ComfyUI scales it only for EDM models, which this server does not load);
    zeros without one."""
    import torch

    image = options.get("concat_latent_image")
    if image is None:
        return torch.zeros(tuple(latent_shape))
    return _to_batch(_fit(image.float(), latent_shape), latent_shape[0])


def _inpaint_concat(model, options: dict, latent_shape, latent_image, denoise_mask):
    """[mask, masked image]: the conditioning's concat_mask / concat_latent_image (scaled into the model's space),
    else the latent's noise mask and the sampled latent itself; without any mask, all ones and a blank image."""
    import torch

    batch, _, height, width = latent_shape
    mask = options.get("concat_mask", denoise_mask)
    if mask is None:
        blank = torch.tensor(BLANK_INPAINT_LATENT, dtype=torch.float32).reshape(1, -1, 1, 1)
        return torch.cat([torch.ones(batch, 1, height, width), blank.expand(batch, -1, height, width)], dim=1)
    image = options.get("concat_latent_image")
    if image is not None:
        image = model.process_latent_in(image.float())
    elif latent_image is not None:
        image = latent_image.float()
    else:
        raise ValueError("an inpainting model needs the masked image: use InpaintModelConditioning (or "
                         "VAEEncodeForInpaint's latent)")
    image = _to_batch(_fit(image, latent_shape), batch)
    mask = mask.float()
    if mask.ndim == len(latent_shape):
        mask = mask[:, :1]
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    mask = _to_batch(_fit(mask, latent_shape).round(), batch)
    return torch.cat([mask, image], dim=1)


def _fit(tensor, latent_shape):
    """ComfyUI's resize of concat inputs: centre crop to the latent's aspect ratio, then bilinear to its size."""
    import torch.nn.functional as F

    height, width = latent_shape[-2], latent_shape[-1]
    old_height, old_width = tensor.shape[-2:]
    if (old_height, old_width) == (height, width):
        return tensor
    old_aspect, new_aspect = old_width / old_height, width / height
    if old_aspect > new_aspect:
        cut = round((old_width - old_width * new_aspect / old_aspect) / 2)
        tensor = tensor[..., cut:old_width - cut]
    elif old_aspect < new_aspect:
        cut = round((old_height - old_height * old_aspect / new_aspect) / 2)
        tensor = tensor[..., cut:old_height - cut, :]
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)


def _to_batch(tensor, batch: int):
    """ComfyUI's batch resize: each output item takes the input item at its relative position (a batch of 2
    stretched to 4 is a a b b), never tiled."""
    count = tensor.shape[0]
    if count == batch:
        return tensor
    if batch <= 1:
        return tensor[:batch]
    if batch < count:
        scale = (count - 1) / (batch - 1)
        picks = [min(round(index * scale), count - 1) for index in range(batch)]
    else:
        scale = count / batch
        picks = [min(math.floor((index + 0.5) * scale), count - 1) for index in range(batch)]
    return tensor[picks]
