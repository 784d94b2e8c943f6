"""MODEL: the UNet as it travels between nodes (ComfyUI's ModelPatcher, cut down to what SD needs).

A DiffusionModel is cheap to copy: `clone()` shares the network (a ModelHandle) and carries its own list
of weight patches (LoRAs, add_patches), which are put on the shared weights lazily, right before the network
runs, and taken off again when a clone with other patches runs. Its model_options and object patches (set
through ComfyUI's ModelPatcher methods, patcher_api.py) are its own too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .model_cache import ModelHandle
from .patcher_api import ModelPatcherMethods, copy_model_options
from .patching import ComputeCast, KeyPatch, LoraPatch, patched_module

# Latent scale factors (VAE latent -> UNet latent) of the SD families.
LATENT_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


@dataclass(frozen=True)
class DiffusionModel(ModelPatcherMethods):
    handle: ModelHandle
    family: str  # "sd15", "sd2" or "sdxl"
    prediction: str  # "eps" or "v"
    dtype: object  # torch dtype the UNet computes in
    adm_channels: int | None = None  # SDXL: width of y
    patches: tuple[LoraPatch | KeyPatch | ComputeCast, ...] = ()
    _sampling: list = field(default_factory=list, compare=False, repr=False)  # lazily built ModelSampling
    # ComfyUI's model_options (cfg functions, wrappers, transformer patches), copied on clone.
    model_options: dict = field(default_factory=lambda: {"transformer_options": {}}, compare=False, repr=False)
    # ComfyUI's object patches: parts of the model replaced for this clone ("model_sampling").
    object_patches: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def latent_scale(self) -> float:
        return LATENT_SCALE[self.family]

    @property
    def model_sampling(self):
        if "model_sampling" in self.object_patches:
            return self.object_patches["model_sampling"]
        if not self._sampling:
            from ..sampling.denoising import ModelSampling

            self._sampling.append(ModelSampling(self.prediction))
        return self._sampling[0]

    def clone(self) -> DiffusionModel:
        """A copy sharing the network: its patches, model_options and object patches are its own."""
        return replace(self, model_options=copy_model_options(self.model_options),
                       object_patches=dict(self.object_patches))

    def with_patch(self, patch: LoraPatch) -> DiffusionModel:
        """A clone with one more LoRA (the weights are patched only when the model runs)."""
        return replace(self.clone(), patches=self.patches + (patch,))

    def set_model_compute_dtype(self, dtype) -> None:
        """ComfyUI's ModelPatcher method: this clone computes in `dtype` (None: the dtype the network was loaded
        in). The weights are converted when the clone runs; the shared network and other clones keep theirs."""
        casts = [patch for patch in self.patches if isinstance(patch, ComputeCast)]
        network_dtype = casts[0].network_dtype if casts else self.dtype
        patches: tuple = tuple(patch for patch in self.patches if not isinstance(patch, ComputeCast))
        wanted = network_dtype if dtype is None else dtype
        if wanted != network_dtype:
            patches += (ComputeCast(wanted, network_dtype),)
        object.__setattr__(self, "patches", patches)
        object.__setattr__(self, "dtype", wanted)

    # ComfyUI's ModelPatcher questions that packs ask.

    def model_dtype(self):
        return self.dtype

    @property
    def load_device(self):
        import torch

        return torch.device("cpu")

    offload_device = load_device

    def is_clone(self, other) -> bool:
        """Whether `other` shares this model's network."""
        return isinstance(other, DiffusionModel) and other.handle is self.handle

    def network(self):
        """The UNet with this model's patches applied (loading it if it was unloaded)."""
        return patched_module(self.handle, self.patches)

    def unet_apply(self, x, timesteps, context=None, y=None, c_concat=None, control=None, transformer_options=None,
                   weight_patches=(), **_):  # other inputs (crossattn_controlnet, ...) are for the ControlNet
        """The sampler's UNet call: inputs cast to the compute dtype, output float32. ``c_concat`` (inpainting
        and instruct-pix2pix models) is appended to the input channels. ``weight_patches`` are applied on top of
        the model's own for this call (hooked conditioning, models/hooks.py)."""
        import torch

        unet = patched_module(self.handle, self.patches + tuple(weight_patches)) if weight_patches else self.network()
        backend = self.model_options.get("torch_compile_backend")  # TorchCompileModel
        if backend is not None:
            unet = _compiled(self.handle, unet, backend)
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        with torch.no_grad():
            out = unet(x.to(self.dtype), timesteps, context.to(self.dtype), None if y is None else y.to(self.dtype),
                       control=control, transformer_options=transformer_options)
        return out.float()

    def process_latent_in(self, latent):
        if "latent_format" in self.object_patches:
            return self.object_patches["latent_format"].process_in(latent)
        return latent * self.latent_scale

    def process_latent_out(self, latent):
        if "latent_format" in self.object_patches:
            return self.object_patches["latent_format"].process_out(latent)
        return latent / self.latent_scale

    def encode_extra(self, options: dict, latent_shape, latent_image=None, denoise_mask=None, seed=None) -> dict:
        """Per-conditioning UNet inputs besides the text context (SDXL's y, an inpainting model's channels, ...):
        see models/extra_inputs.py. The sampler passes its latent (model space), denoise mask and seed."""
        from .extra_inputs import extra_unet_inputs

        return extra_unet_inputs(self, options, latent_shape, latent_image=latent_image, denoise_mask=denoise_mask,
                                 seed=seed)


def _compiled(handle: ModelHandle, module, backend: str):
    """torch.compile of the handle's network for `backend`, kept while the network stays loaded. Weight patches
    swap parameters in place, which the compiled module sees (torch recompiles if its guards ask)."""
    import torch

    compiled = handle.state.setdefault("compiled", {})
    if backend not in compiled or compiled[backend][0] is not module:
        compiled[backend] = (module, torch.compile(module, backend=backend))
    return compiled[backend][1]
