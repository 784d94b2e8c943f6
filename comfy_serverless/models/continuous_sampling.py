"""Continuous-time model sampling (ModelSamplingContinuousEDM / ModelSamplingContinuousV), as ComfyUI defines it.

Models trained on continuous noise levels have no beta table: their sigmas run log-uniformly over
[sigma_min, sigma_max] (a 1000-entry table only for the schedulers), and the UNet is fed a function of sigma
instead of a table index:

* EDM (Karras et al. 2022): c_noise = log(sigma) / 4;
* continuous V (SD 2.x "v" models fine-tuned on continuous time): t = atan(sigma) * 2 / pi.

The output parameterisations (sigma_data s_d, c_in = 1 / sqrt(sigma² + s_d²)):

* eps: x_0 = x - sigma * out;
* v_prediction: x_0 = x * s_d² / (sigma² + s_d²) - out * sigma * s_d / sqrt(sigma² + s_d²);
* edm: the same with + (EDM's F_theta), s_d = 0.5;
* cosmos_rflow: rectified flow in the VE scale: t = sigma / (sigma + 1), input x * (1 - t), x_0 = input - t * out.

edm_playground_v2.5 is "edm" (s_d = 0.5) plus Playground v2.5's latent format: the SDXL VAE's latent is
normalised per channel, (latent - mean) * 0.5 / std, with the mean/std of Playground's VAE config.
"""

from __future__ import annotations

import math

import torch

from ..sampling.denoising import ModelSampling, per_item_view
from ..sampling.schedules import SIGMA_BEFORE_START

EDM_TYPES = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")
TABLE_SIZE = 1000


class ContinuousSampling(ModelSampling):
    """EDM-style continuous sampling: log-uniform sigma table, c_noise = log(sigma) / 4."""

    def __init__(self, prediction: str, sigma_min: float, sigma_max: float, sigma_data: float = 1.0):
        if prediction not in ("eps", "v_prediction", "edm", "cosmos_rflow"):
            raise ValueError(f"unknown continuous prediction {prediction!r}")
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        # No beta table: the base class's constructor is not used, only its interface.
        self.prediction_type = prediction
        self.sigma_data = float(sigma_data)
        self.num_timesteps = TABLE_SIZE
        self.set_sigmas(torch.linspace(math.log(sigma_min), math.log(sigma_max), TABLE_SIZE,
                                       dtype=torch.float64).exp())

    def set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.float()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        return 0.25 * torch.as_tensor(sigma).log()

    def sigma(self, timestep):
        return (torch.as_tensor(timestep) / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return SIGMA_BEFORE_START
        if percent >= 1.0:
            return 0.0
        low, high = math.log(float(self.sigma_min)), math.log(float(self.sigma_max))
        return math.exp((high - low) * (1.0 - percent) + low)

    def calculate_input(self, sigma, x):
        if self.prediction_type == "cosmos_rflow":
            t = per_item_view(sigma / (sigma + 1), x)
            return x * (1.0 - t)
        return super().calculate_input(sigma, x)

    def calculate_denoised(self, sigma, model_output, model_input):
        if self.prediction_type == "edm":
            sigma = per_item_view(sigma, model_output)
            total = sigma ** 2 + self.sigma_data ** 2
            return model_input * self.sigma_data ** 2 / total + model_output * sigma * self.sigma_data / total ** 0.5
        if self.prediction_type == "cosmos_rflow":
            t = per_item_view(sigma / (sigma + 1), model_output)
            return model_input * (1.0 - t) - model_output * t
        return super().calculate_denoised(sigma, model_output, model_input)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise: bool = False):
        if self.prediction_type == "cosmos_rflow":
            sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
            sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1)) if sigma.ndim else sigma
            return noise * sigma + latent_image
        return super().noise_scaling(sigma, noise, latent_image, max_denoise)


class CosmosRFlowSampling(ContinuousSampling):
    """Rectified-flow time t = sigma / (sigma + 1) fed to the model; sigma(t) capped at sigma_max."""

    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float = 1.0):
        super().__init__("cosmos_rflow", sigma_min, sigma_max, sigma_data)

    def timestep(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma / (sigma + 1)

    def sigma(self, timestep):
        timestep = torch.as_tensor(timestep, dtype=torch.float32)
        top = float(self.sigma_max)
        return torch.where(timestep >= top / (top + 1), torch.full_like(timestep, top),
                           timestep / (1 - timestep).clamp_min(1e-12))


class ContinuousVSampling(ContinuousSampling):
    """Continuous-time v-prediction: t = atan(sigma) * 2 / pi."""

    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float = 1.0):
        super().__init__("v_prediction", sigma_min, sigma_max, sigma_data)

    def timestep(self, sigma):
        return torch.as_tensor(sigma).atan() / math.pi * 2

    def sigma(self, timestep):
        return (torch.as_tensor(timestep) * math.pi / 2).tan()


PLAYGROUND_LATENT_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENT_STD = (8.4927, 5.9022, 6.5498, 5.2299)
PLAYGROUND_SCALE = 0.5


class PlaygroundLatentFormat:
    """Playground v2.5's latent format: per-channel mean/std normalisation between the VAE's and the model's
    latent (the MODEL's "latent_format" object patch)."""

    latent_channels = 4
    scale_factor = PLAYGROUND_SCALE

    def _stats(self, latent):
        shape = (1, len(PLAYGROUND_LATENT_MEAN)) + (1,) * (latent.ndim - 2)
        mean = torch.tensor(PLAYGROUND_LATENT_MEAN, dtype=latent.dtype, device=latent.device).reshape(shape)
        std = torch.tensor(PLAYGROUND_LATENT_STD, dtype=latent.dtype, device=latent.device).reshape(shape)
        if latent.ndim < 2 or latent.shape[1] != len(PLAYGROUND_LATENT_MEAN):
            raise ValueError(f"Playground v2.5 latents have 4 channels, got shape {tuple(latent.shape)}")
        return mean, std

    def process_in(self, latent):
        mean, std = self._stats(latent)
        return (latent - mean) * self.scale_factor / std

    def process_out(self, latent):
        mean, std = self._stats(latent)
        return latent * std / self.scale_factor + mean


def continuous_edm_sampling(sampling: str, sigma_min: float, sigma_max: float) -> ContinuousSampling:
    """The model sampling ModelSamplingContinuousEDM attaches for one of EDM_TYPES."""
    if sampling == "cosmos_rflow":
        return CosmosRFlowSampling(sigma_min, sigma_max)
    if sampling in ("edm", "edm_playground_v2.5"):  # Playground also needs PlaygroundLatentFormat (the node adds it)
        return ContinuousSampling("edm", sigma_min, sigma_max, sigma_data=0.5)
    if sampling in ("eps", "v_prediction"):
        return ContinuousSampling(sampling, sigma_min, sigma_max)
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {list(EDM_TYPES)}")
