"""unCLIP's extra UNet input y (SD 2.1 unclip-l / unclip-h): noise-augmented CLIP image embeddings.

An unCLIP UNet takes y = [augmented image embedding, embedding of the augmentation level] (1536 = 2 * 768 for
unclip-l, 2048 = 2 * 1024 for unclip-h). The augmentation is a DDPM forward step on the embedding, normalised
by the data statistics first:

    z = unscale(sqrt(acp[level]) * scale(embeds) + sqrt(1 - acp[level]) * noise),  scale(x) = (x - mean) / std

with acp the "squaredcos_cap_v2" schedule over 1000 steps and level = round(999 * noise_augmentation). The
checkpoint's "noise_augmentor.*" buffers hold that schedule (used when present, else computed: the values are
the same); real SD 2.1 unCLIP files store no statistics (mean 0, std 1), a file that does is honoured.

unclip_y follows ComfyUI's unclip_adm: each row of each entry's image_embeds is augmented at its entry's level
with noise from a generator seeded with (sampler seed - 10), and [z, level embedding] is scaled by the entry's
strength. Several rows/entries are summed; the sum's embedding half is augmented again at the merge level
(conditioning option "unclip_noise_augment_merge", default 0.05), its noise continuing the same generator. No
unclip_conditioning gives zeros.
"""

from __future__ import annotations

import math

MAX_NOISE_LEVEL = 1000
DEFAULT_MERGE_AUGMENTATION = 0.05
# ComfyUI seeds the augmentation noise with the sampler's seed minus this.
SEED_OFFSET = 10


def squaredcos_alphas_cumprod(timesteps: int = MAX_NOISE_LEVEL):
    """Cumulative alpha products of the "squaredcos_cap_v2" schedule (betas capped at 0.999), float64."""
    import torch

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                          for i in range(timesteps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseAugmentor:
    """The checkpoint's noise_augmentor for embeddings `dim` wide (its state without the prefix, or {})."""

    def __init__(self, state: dict, dim: int):
        import torch

        self.dim = dim
        if "sqrt_alphas_cumprod" in state and "sqrt_one_minus_alphas_cumprod" in state:
            self.sqrt_acp = state["sqrt_alphas_cumprod"].float()
            self.sqrt_one_minus_acp = state["sqrt_one_minus_alphas_cumprod"].float()
        else:
            acp = state["alphas_cumprod"].double() if "alphas_cumprod" in state else squaredcos_alphas_cumprod()
            self.sqrt_acp = acp.sqrt().float()
            self.sqrt_one_minus_acp = (1.0 - acp).sqrt().float()
        self.max_noise_level = self.sqrt_acp.shape[0]
        self.mean = state["data_mean"].float().reshape(1, -1) if "data_mean" in state else torch.zeros(1, dim)
        self.std = state["data_std"].float().reshape(1, -1) if "data_std" in state else torch.ones(1, dim)
        if self.mean.shape[1] != dim or self.std.shape[1] != dim:
            raise ValueError(f"the noise augmentor's statistics are {self.mean.shape[1]} wide, the model's image "
                             f"embeddings {dim}")

    def level(self, noise_augmentation: float) -> int:
        return round((self.max_noise_level - 1) * noise_augmentation)

    def __call__(self, embeds, level: int, noise):
        """(augmented embeds [N, dim], level embedding [N, dim]) for embeds [N, dim] and noise like it."""
        import torch

        from ..networks.attention import timestep_embedding

        scaled = (embeds - self.mean) / self.std
        noised = self.sqrt_acp[level] * scaled + self.sqrt_one_minus_acp[level] * noise
        levels = torch.full((embeds.shape[0],), level, dtype=torch.long)
        return noised * self.std + self.mean, timestep_embedding(levels, self.dim)


def unclip_y(unclip_conditioning: list | None, noise_augmentor_state: dict, adm_channels: int, seed: int = 0,
             merge_augmentation: float = DEFAULT_MERGE_AUGMENTATION):
    """y [1, adm_channels] for a conditioning entry's "unclip_conditioning" list (unCLIPConditioning's
    {clip_vision_output, strength, noise_augmentation} dicts). `seed`: the sampler's noise seed;
    `merge_augmentation`: the entry's "unclip_noise_augment_merge" option, if any."""
    import torch

    if not unclip_conditioning:
        return torch.zeros(1, adm_channels)
    dim = adm_channels // 2
    if 2 * dim != adm_channels:
        raise ValueError(f"an unCLIP model's y is twice the image embedding width; {adm_channels} is odd")
    augmentor = NoiseAugmentor(noise_augmentor_state, dim)
    generator = torch.Generator()
    outputs = []
    for entry in unclip_conditioning:
        embeds = entry["clip_vision_output"].image_embeds.float()
        if embeds.shape[-1] != dim:
            raise ValueError(f"CLIP vision embeddings {embeds.shape[-1]} wide do not fit this unCLIP model "
                             f"(made for {dim}): use the CLIP vision model of the unCLIP checkpoint")
        for row in embeds.reshape(-1, dim):
            generator.manual_seed(seed - SEED_OFFSET)
            noise = torch.randn((1, dim), generator=generator)
            z, level_embedding = augmentor(row[None], augmentor.level(entry["noise_augmentation"]), noise)
            outputs.append(torch.cat([z, level_embedding], dim=1) * entry["strength"])
    if len(outputs) == 1:
        return outputs[0]
    summed = torch.stack(outputs).sum(0)
    noise = torch.randn((1, dim), generator=generator)  # continues after the last entry's draw, as ComfyUI
    z, level_embedding = augmentor(summed[:, :dim], augmentor.level(merge_augmentation), noise)
    return torch.cat([z, level_embedding], dim=1)


def unclip_y_for_options(options: dict, noise_augmentor_state: dict, adm_channels: int, seed: int = 0):
    """unclip_y from a conditioning entry's options dict (the keys unCLIPConditioning sets)."""
    return unclip_y(options.get("unclip_conditioning"), noise_augmentor_state, adm_channels, seed,
                    options.get("unclip_noise_augment_merge", DEFAULT_MERGE_AUGMENTATION))
