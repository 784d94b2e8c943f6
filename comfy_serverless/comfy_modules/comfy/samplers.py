"""ComfyUI's `comfy.samplers` for custom node packs: the sampler and scheduler names (ComfyUI 0.3.64's, all
implemented), the noise schedules, `KSampler`, `KSAMPLER` / `sampler_object` / `ksampler` (SAMPLER values),
`CFGGuider` (GUIDER), `sample` and `calc_cond_batch`, over comfy_serverless.sampling.

The name lists are what KSampler's combos offer here (comfy_serverless/nodes/sampling_nodes.py), so a pack that
builds its combos from `comfy.samplers.KSampler.SAMPLERS` validates against the samplers that exist. torch is
imported only when sampling or computing sigmas.
"""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.sampling_nodes import SAMPLER_NAMES as _SAMPLERS
from comfy_serverless.nodes.sampling_nodes import SCHEDULER_NAMES as _SCHEDULERS

SAMPLER_NAMES = list(_SAMPLERS)
SCHEDULER_NAMES = list(_SCHEDULERS)
KSAMPLER_NAMES = [name for name in SAMPLER_NAMES if name not in ("ddim", "uni_pc", "uni_pc_bh2")]
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def calculate_sigmas(model_sampling, scheduler_name: str, steps: int):
    """The noise levels of a scheduler for `steps` steps (float32, ending in 0). model_sampling: a MODEL's
    `model_sampling`."""
    from comfy_serverless.sampling.schedules import calculate_sigmas as ours

    return ours(model_sampling, scheduler_name, steps)


# Packs that add schedulers replace calculate_sigmas and extend KSampler.SCHEDULERS (efficiency-nodes' "AYS SD1");
# sampling/ksampler.py then asks the replacement for those names.
OWN_CALCULATE_SIGMAS = calculate_sigmas


class KSampler:
    """KSampler as an object: `KSampler(model, steps, device, sampler, scheduler, denoise).sample(noise, positive,
    negative, cfg, latent_image, ...)` with a MODEL from this server's loaders."""

    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = DISCARD_PENULTIMATE_SIGMA_SAMPLERS

    def __init__(self, model, steps, device=None, sampler=None, scheduler=None, denoise=None, model_options=None):
        self.model = model
        self.device = device
        self.sampler = sampler if sampler is not None else SAMPLER_NAMES[0]
        self.scheduler = scheduler if scheduler is not None else SCHEDULER_NAMES[0]
        self.denoise = denoise
        self.model_options = model_options or {}
        self.set_steps(steps, denoise)

    def set_steps(self, steps, denoise=None) -> None:
        from comfy_serverless.sampling.ksampler import compute_sigmas

        self.steps = steps
        self.sigmas = compute_sigmas(self.model.model_sampling, self.scheduler, self.sampler, steps, denoise)

    def sample(self, noise, positive, negative, cfg, latent_image=None, start_step=None, last_step=None,
               force_full_denoise=False, denoise_mask=None, sigmas=None, callback=None, disable_pbar=False,
               seed=None):
        """Samples from `latent_image` (zeros when None) noised with `noise`; returns the latent in the same space
        as the input. callback(step, x0, x, total_steps) is called after every step, as in ComfyUI."""
        import torch

        from comfy_serverless.sampling import ksampler
        from comfy_serverless.sampling.denoising import CFGDenoiser

        model = self.model
        latent = torch.zeros_like(noise) if latent_image is None else latent_image
        latent = latent.to(torch.float32)
        sigmas = ksampler.slice_sigmas(self.sigmas if sigmas is None else sigmas, start_step, last_step,
                                       force_full_denoise)
        if sigmas is None or sigmas.shape[-1] == 0:
            return latent
        model_latent = model.process_latent_in(latent) if torch.count_nonzero(latent) > 0 else latent
        mask = None
        if denoise_mask is not None:
            mask = ksampler.prepare_noise_mask(denoise_mask, latent.shape, latent.device)
        denoiser = CFGDenoiser(model.unet_apply, positive, negative, cfg,
                               model_sampling=model.model_sampling, encode_extra=model.encode_extra,
                               model_options=self.model_options or model.model_options)

        def step(index, x, denoised, total):
            callback(index, denoised, x, total)

        samples = ksampler.run_sampler(denoiser, model.model_sampling, self.sampler,
                                       noise.to(latent.device, torch.float32), model_latent, sigmas, seed=seed,
                                       denoise_mask=mask, callback=None if callback is None else step)
        return model.process_latent_out(samples.to(torch.float32))


def __getattr__(name: str):
    if name in _LAZY:
        return _LAZY[name]()
    return missing_attribute(__name__, name)


def _sampler_object_class():
    from comfy_serverless.sampling.sampler_object import KSamplerObject

    return KSamplerObject


def _guider_class():
    from comfy_serverless.sampling.guiders import Guider

    return _pack_guider_class(Guider)


_GUIDER_FACES: dict = {}


def _pack_guider_class(base: type) -> type:
    """The class packs see for one of our guiders (CFGGuider, comfy_extras' Guider_PerpNeg). As in ComfyUI, every
    sampling step goes through `predict_noise(x, timestep, model_options, seed)`, which reads the guider's current
    `cfg` (and `neg_scale`), so a pack subclass that overrides it (a cfg schedule) is honoured. isinstance holds
    for the server's own guiders of that kind."""
    if base in _GUIDER_FACES:
        return _GUIDER_FACES[base]
    from comfy_serverless.sampling.guiders import _cfg_denoisers

    class PredictNoiseRoute:
        """The denoiser a sampler calls when a subclass overrides predict_noise; `parts` lets the sampling run
        begin and end on the real CFG denoisers."""

        def __init__(self, guider, inner):
            self.guider, self.inner = guider, inner
            self.parts = _cfg_denoisers(inner)
            self.model_options = getattr(inner, "model_options", {})

        def __call__(self, x, sigma, model_options=None):
            return self.guider.predict_noise(x, sigma, model_options or {}, self.guider._pack_seed)

    class FaceMeta(type(base)):
        def __instancecheck__(cls, obj):
            if cls.__dict__.get("_face_of") is not None:
                return isinstance(obj, cls._face_of)
            return super().__instancecheck__(obj)

    class PackGuider(base, metaclass=FaceMeta):
        _face_of = base
        _pack_seed = None

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            cls._face_of = None  # a pack's subclass: ordinary isinstance

        def sample(self, noise, latent_image, sampler, sigmas, *args, seed=None, **kwargs):
            self._pack_seed = seed
            return super().sample(noise, latent_image, sampler, sigmas, *args, seed=seed, **kwargs)

        def make_denoiser(self):
            inner = super().make_denoiser()
            if type(self).predict_noise is PackGuider.predict_noise:
                return inner
            return PredictNoiseRoute(self, inner)

        def predict_noise(self, x, timestep, model_options=None, seed=None):
            active = self._active
            inner = active.inner if isinstance(active, PredictNoiseRoute) else active
            if inner is None:
                inner = base.make_denoiser(self)
            for part in _cfg_denoisers(inner):
                part.cfg = float(self.cfg)
            if hasattr(inner, "neg_scale") and hasattr(self, "neg_scale"):
                inner.neg_scale = float(self.neg_scale)
            return inner(x, timestep, model_options=model_options) if model_options else inner(x, timestep)

    name = "CFGGuider" if base.__name__ == "Guider" else "Guider_PerpNeg"
    PackGuider.__name__ = PackGuider.__qualname__ = name
    _GUIDER_FACES[base] = PackGuider
    return PackGuider


def _calc_cond_batch():
    from comfy_serverless.sampling.denoising import calc_cond_batch as ours

    return ours


# Classes and functions that need torch, resolved on first access (module attribute lookup).
_LAZY = {"KSAMPLER": _sampler_object_class, "CFGGuider": _guider_class, "calc_cond_batch": _calc_cond_batch}


def sampler_object(name: str):
    """The SAMPLER for a sampler name (what KSamplerSelect returns)."""
    from comfy_serverless.sampling.sampler_object import sampler_object as ours

    return ours(name)


def ksampler(sampler_name: str, extra_options=None, inpaint_options=None):
    """A SAMPLER running ``sampler_name`` (a KSAMPLER_NAMES name) with its own keyword options."""
    from comfy_serverless.sampling.sampler_object import KSamplerObject

    return KSamplerObject(sampler_name, extra_options, inpaint_options)


def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options=None, latent_image=None,
           denoise_mask=None, callback=None, disable_pbar=False, seed=None):
    """ComfyUI's comfy.samplers.sample: a CFGGuider over ``model`` run with a SAMPLER along ``sigmas``."""
    from comfy_serverless.sampling.guiders import Guider

    guider = Guider(model)
    if model_options is not None:
        guider.model_options = model_options
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask, callback=callback,
                         disable_pbar=disable_pbar, seed=seed)
