"""ModelSamplingDiscrete's model sampling objects: a discrete SD noise table read as another parameterisation.

The sampler reaches them through ``model.model_sampling`` (an object patch, see patcher_api.add_object_patch), so
they are :class:`ModelSampling` subclasses changing only what ComfyUI's sampling types change:

* eps / v_prediction: the base class;
* lcm: the distilled 50-entry table (every 20th timestep) with LCM's consistency boundary conditions;
* x0: the network predicts the clean latent itself;
* img_to_img: x0, fed the noisy latent without the 1/sqrt(sigma²+1) input scaling.

``zsnr`` rescales the table to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
Steps are Flawed"); the last entry keeps a tiny alpha instead of 0, as ComfyUI does, so sigma_max stays finite.
"""

from __future__ import annotations

import torch

from ..sampling.denoising import ModelSampling, per_item_view

SAMPLING_TYPES = ("eps", "v_prediction", "lcm", "x0", "img_to_img")
# ComfyUI's alphā at the last timestep of a zero-terminal-SNR table (exactly 0 would make sigma infinite).
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
# LCM: the distilled schedule's length and the consistency model's constants.
LCM_ORIGINAL_TIMESTEPS = 50
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The table shifted and scaled in sqrt(alphā) so the last step is pure noise and the first unchanged."""
    sigmas = sigmas.double()
    root_alpha = (1.0 / (sigmas * sigmas + 1.0)).sqrt()
    first, last = root_alpha[0].clone(), root_alpha[-1].clone()
    root_alpha = (root_alpha - last) * (first / (first - last))
    alphas_cumprod = root_alpha ** 2
    alphas_cumprod[-1] = ZSNR_LAST_ALPHA_CUMPROD
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


class DiscreteModelSampling(ModelSampling):
    """A discrete table (the model's betas, optionally zero-terminal-SNR) with one of SAMPLING_TYPES."""

    def __init__(self, sampling: str, zsnr: bool = False, betas: torch.Tensor | None = None):
        if sampling not in SAMPLING_TYPES:
            raise ValueError(f"unknown sampling {sampling!r}; expected one of {list(SAMPLING_TYPES)}")
        super().__init__("v_prediction" if sampling == "v_prediction" else "eps", betas=betas)
        self.sampling = sampling
        self.zsnr = bool(zsnr)
        if zsnr:
            self.set_sigmas(zero_terminal_snr_sigmas(self.sigmas_full()))

    def sigmas_full(self) -> torch.Tensor:
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.sampling == "img_to_img":
            return x
        return super().calculate_input(sigma, x)

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        if self.sampling in ("x0", "img_to_img"):
            return model_output
        return super().calculate_denoised(sigma, model_output, model_input)


class LCMModelSampling(DiscreteModelSampling):
    """LCM's distilled schedule: 50 table entries at timesteps 19, 39, ..., 999 and the consistency
    parameterisation x_0 = c_out * eps-estimate + c_skip * x with c's from the scaled timestep."""

    def __init__(self, zsnr: bool = False, betas: torch.Tensor | None = None):
        super().__init__("lcm", zsnr, betas)
        self.skip_steps = self.num_timesteps // LCM_ORIGINAL_TIMESTEPS
        picked = [self.num_timesteps - 1 - step * self.skip_steps for step in range(LCM_ORIGINAL_TIMESTEPS)]
        full = self.sigmas
        self.sigmas = full[list(reversed(picked))].clone()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        index = super().timestep(sigma)
        return index * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep):
        timestep = torch.as_tensor(timestep)
        return super().sigma((timestep.float() - (self.skip_steps - 1)) / self.skip_steps)

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        scaled = per_item_view(self.timestep(sigma).float(), model_output) * LCM_TIMESTEP_SCALING
        x0 = model_input - model_output * per_item_view(sigma, model_output)
        c_skip = LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2)
        c_out = scaled / (scaled ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
        return c_out * x0 + c_skip * model_input


def discrete_model_sampling(sampling: str, zsnr: bool = False, betas: torch.Tensor | None = None) -> ModelSampling:
    """ModelSamplingDiscrete's object for `sampling` over the model's betas."""
    if sampling == "lcm":
        return LCMModelSampling(zsnr, betas)
    return DiscreteModelSampling(sampling, zsnr, betas)
