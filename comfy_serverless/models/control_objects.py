"""CONTROL_NET objects: what ControlNetLoader returns and the apply nodes put into conditioning (options["control"]).

They behave like ComfyUI's: `copy().set_cond_hint(image, strength, (start, end))` per apply, chained through
`set_previous_controlnet`; the denoiser calls `pre_run(model, percent_to_sigma)` before sampling, then per UNet
batch `get_control(x, sigma, cond, batched_number, transformer_options)` -> {"input", "middle", "output"} lists
the UNet adds (popping from the end), and `cleanup()` after. Results of the chain are summed, each scaled by its
own strength; outside its start/end range a control returns only what the ones before it give.
"""

from __future__ import annotations

# ComfyUI's hint sizes: the hint is resized to the latent size times this (pixels per latent cell).
COMPRESSION_RATIO = 8
HINT_UPSCALE = "nearest-exact"


def resize_hint(hint, width: int, height: int, method: str = HINT_UPSCALE):
    """[B, C, H, W] hint cropped at the centre to the target aspect, then resized (ComfyUI's common_upscale)."""
    import torch.nn.functional as F

    old_h, old_w = hint.shape[-2], hint.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    trim_x = trim_y = 0
    if old_aspect > new_aspect:
        trim_x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        trim_y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    hint = hint[..., trim_y:old_h - trim_y, trim_x:old_w - trim_x]
    return F.interpolate(hint, size=(height, width), mode=method)


def broadcast_image_to(images, batch: int, batched_number: int):
    """Hints for a batch of `batched_number` conditioning chunks of batch // batched_number items each: the
    hint batch is cut or cycled to one chunk, then repeated per chunk. A single hint stays single (broadcast)."""
    import torch

    if images.shape[0] == 1:
        return images
    per_chunk = max(1, batch // max(1, batched_number))
    images = images[:per_chunk]
    if images.shape[0] < per_chunk:
        repeats = [images] * (per_chunk // images.shape[0]) + [images[:per_chunk % images.shape[0]]]
        images = torch.cat(repeats)
    if images.shape[0] == batch:
        return images
    return torch.cat([images] * batched_number)


class ControlBase:
    """What every control shares: the hint, strength, active range, chaining and merging of results."""

    def __init__(self):
        self.cond_hint_original = None
        self.cond_hint = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range = None  # (sigma_start, sigma_end) after pre_run
        self.global_average_pooling = False
        self.compression_ratio = COMPRESSION_RATIO
        self.upscale_algorithm = HINT_UPSCALE
        self.previous_controlnet = None
        self.extra_args: dict = {}
        self.vae = None
        self.extra_concat_orig: list = []

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None,
                      extra_concat=()):
        """`cond_hint` is [B, C, H, W] in 0..1 (an IMAGE moved channels-first)."""
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = tuple(timestep_percent_range)
        self.vae = vae  # SD1.x/SDXL ControlNets take pixels: kept for ComfyUI's interface, not used
        self.extra_concat_orig = list(extra_concat)
        return self

    def set_previous_controlnet(self, controlnet):
        self.previous_controlnet = controlnet
        return self

    def set_extra_arg(self, name, value=None):
        if value is None:
            self.extra_args.pop(name, None)
        else:
            self.extra_args[name] = value

    def copy_to(self, other: ControlBase) -> ControlBase:
        other.cond_hint_original = self.cond_hint_original
        other.strength = self.strength
        other.timestep_percent_range = self.timestep_percent_range
        other.global_average_pooling = self.global_average_pooling
        other.compression_ratio = self.compression_ratio
        other.upscale_algorithm = self.upscale_algorithm
        other.extra_args = dict(self.extra_args)
        other.vae = self.vae
        other.extra_concat_orig = list(self.extra_concat_orig)
        return other

    def pre_run(self, model, percent_to_sigma):
        start, end = self.timestep_percent_range
        self.timestep_range = (percent_to_sigma(start), percent_to_sigma(end))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_sigma)

    def cleanup(self):
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint = None
        self.timestep_range = None

    def get_models(self) -> list:
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def inference_memory_requirements(self, dtype) -> int:
        if self.previous_controlnet is not None:
            return self.previous_controlnet.inference_memory_requirements(dtype)
        return 0

    def _previous(self, x, sigma, cond, batched_number, transformer_options):
        if self.previous_controlnet is None:
            return None
        return self.previous_controlnet.get_control(x, sigma, cond, batched_number, transformer_options)

    def _inactive(self, sigma) -> bool:
        if self.timestep_range is None:
            return False
        current = float(sigma.reshape(-1)[0])
        return current > self.timestep_range[0] or current < self.timestep_range[1]

    def _hint_at(self, width: int, height: int, device, dtype):
        if self.cond_hint_original is None:
            raise ValueError("this ControlNet has no hint image: apply it with a ControlNetApply node")
        hint = resize_hint(self.cond_hint_original.float(), width, height, self.upscale_algorithm)
        return hint.to(device=device, dtype=dtype)

    def control_merge(self, control: dict, previous: dict | None, output_dtype=None) -> dict:
        """This control's residuals times its strength (averaged over the image for global pooling), plus the
        previous controls' results, item by item."""
        import torch

        out = {"input": [], "middle": [], "output": []}
        for key, items in control.items():
            for item in items:
                if item is not None:
                    if self.global_average_pooling:
                        item = torch.mean(item, dim=(2, 3), keepdim=True).expand_as(item)
                    item = item * self.strength
                    if output_dtype is not None:
                        item = item.to(output_dtype)
                out[key].append(item)
        if previous is not None:
            for key in out:
                mine = out[key]
                for index, theirs in enumerate(previous.get(key, [])):
                    if index >= len(mine):
                        mine.append(theirs)
                    elif theirs is not None:
                        mine[index] = theirs if mine[index] is None else theirs + mine[index]
        return out


class ControlNet(ControlBase):
    """A ControlNet network (models/controlnets.py loads it) as a control."""

    def __init__(self, handle, config, family: str, dtype, global_average_pooling: bool = False):
        super().__init__()
        self.handle = handle
        self.config = config
        self.family = family
        self.dtype = dtype
        self.global_average_pooling = global_average_pooling
        self.model_sampling_current = None

    def copy(self) -> ControlNet:
        return self.copy_to(ControlNet(self.handle, self.config, self.family, self.dtype))

    def pre_run(self, model, percent_to_sigma):
        super().pre_run(model, percent_to_sigma)
        self.model_sampling_current = getattr(model, "model_sampling", None)
        if self.model_sampling_current is None:
            raise TypeError("ControlNet.pre_run needs the MODEL being sampled (with a model_sampling)")

    def cleanup(self):
        super().cleanup()
        self.model_sampling_current = None

    def get_models(self) -> list:
        return super().get_models() + [self.handle]

    def get_control(self, x, sigma, cond, batched_number, transformer_options=None):
        import torch

        previous = self._previous(x, sigma, cond, batched_number, transformer_options)
        if self._inactive(sigma):
            return previous
        if self.model_sampling_current is None:
            raise RuntimeError("ControlNet.get_control before pre_run(model, percent_to_sigma)")
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        unet = self.config.unet
        if context.shape[-1] != unet.context_dim:
            raise ValueError(f"this {self.family} ControlNet expects text conditioning {unet.context_dim} wide, got "
                             f"{context.shape[-1]}: it does not fit the checkpoint being sampled")
        height, width = x.shape[2] * self.compression_ratio, x.shape[3] * self.compression_ratio
        if self.cond_hint is None or tuple(self.cond_hint.shape[2:]) != (height, width):
            self.cond_hint = self._hint_at(width, height, x.device, self.dtype)
        hint = self.cond_hint
        if hint.shape[1] != self.config.hint_channels:
            raise ValueError(f"this ControlNet takes hint images with {self.config.hint_channels} channels, got "
                             f"{hint.shape[1]}")
        if x.shape[0] != hint.shape[0]:
            hint = broadcast_image_to(hint, x.shape[0], batched_number)
        y = cond.get("y") if unet.adm_in_channels is not None else None
        if unet.adm_in_channels is not None and y is None:
            raise ValueError("this SDXL ControlNet needs the conditioning vector y, which this model does not give")
        sampling = self.model_sampling_current
        timesteps = sampling.timestep(sigma).float()
        x_in = sampling.calculate_input(sigma, x)
        network = self.handle.get()
        with torch.no_grad():
            control = network(x_in.to(self.dtype), hint, timesteps, context.to(self.dtype),
                              None if y is None else y.to(self.dtype), self.extra_args.get("control_type"))
        return self.control_merge(control, previous, output_dtype=None)
