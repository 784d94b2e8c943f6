"""KSampler and KSamplerAdvanced.

Each step reports progress through ProgressBar (which is also where /interrupt stops the sampler) and, with
--preview-method other than none, sends a latent2rgb preview of the step's x0 estimate. Sampler and
scheduler combos list exactly what sampling.samplers / sampling.schedules implement, so an unknown name
fails validation with ComfyUI's value_not_in_list error. Standard library only at module level.
"""

from __future__ import annotations

from .. import progress, settings

SEED_MAX = 0xFFFFFFFFFFFFFFFF


# Exactly the names sampling.samplers / sampling.schedules implement, in ComfyUI's order. Kept here as
# plain lists because those modules import torch and INPUT_TYPES must not (tests check the lists agree).
SAMPLER_NAMES = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
                 "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                 "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
                 "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                 "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                 "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                 "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                 "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]


def step_callback(model, steps: int):
    """callback(step, x, x0, total) for the samplers: progress per step, plus a preview when enabled."""
    bar = progress.ProgressBar(steps)
    method = settings.current().preview_method
    if method != "none":
        from ..models.latent_preview import preview_method

        method = preview_method(method)
    preview_size = settings.current().preview_size

    def callback(step, x, denoised, total):
        preview = None
        if method != "none":
            from ..models.latent_preview import preview_image

            preview = ("JPEG", preview_image(denoised, model.family), preview_size)
        bar.update_absolute(step + 1, total, preview)

    return callback


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **options):
    """Samples `latent` (a LATENT dict) and returns a copy with new samples (noise_mask and batch_index kept)."""
    from ..sampling.ksampler import ksampler

    samples = ksampler(
        model.unet_apply, model.model_sampling, latent["samples"], seed=seed, steps=steps, cfg=cfg,
        sampler_name=sampler_name, scheduler=scheduler, positive=positive, negative=negative,
        noise_mask=latent.get("noise_mask"), batch_index=latent.get("batch_index"),
        callback=step_callback(model, steps), process_latent_in=model.process_latent_in,
        process_latent_out=model.process_latent_out, encode_extra=model.encode_extra,
        model_options=model.model_options, **options)
    out = dict(latent)
    out["samples"] = samples
    return (out,)


class KSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model that denoises."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Number of denoising steps."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance: how strongly to follow the prompt."}),
            "sampler_name": (list(SAMPLER_NAMES), {"tooltip": "The sampling algorithm."}),
            "scheduler": (list(SCHEDULER_NAMES), {"tooltip": "How noise levels are spaced over the steps."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "How much of the latent to replace; below 1 keeps its structure "
                                             "(image to image)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Denoises the latent with the model, guided by the positive and negative conditioning."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0):
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise)


class KSamplerAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(SAMPLER_NAMES),),
            "scheduler": (list(SCHEDULER_NAMES),),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise, disable_noise=add_noise == "disable",
                               start_step=start_at_step, last_step=end_at_step,
                               force_full_denoise=return_with_leftover_noise != "enable")


NODE_CLASS_MAPPINGS = {"KSampler": KSampler, "KSamplerAdvanced": KSamplerAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {"KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)"}
