"""VAE: the autoencoder as it travels between nodes, with ComfyUI's pixel and latent conventions.

IMAGE is float32 [B, H, W, C] in 0..1; LATENT samples are the raw (unscaled) VAE latent [B, 4, H/8, W/8]
(the scale factor belongs to the diffusion model, as in ComfyUI).

A decode or encode drops the resident pages of the UNet's prepared packed weights first and the VAE's own after
(VAEModel._pass). Measured on the AMX Xeon (first_image.py, 256 px, alternating runs, 2026-12-02): peak RSS under
the AVX-512 cap 2829 / 2899 -> 2635 / 2650 MB, bf16 2285 -> 2169 MB; the peak now comes in the warm UNet steps
instead of the decode. Reading 1.7 GB of pages back from the page cache at the next step costs about 5 ms.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .model_cache import ModelHandle

# Images decoded or encoded in one batch: about this many pixels at a time bounds the activations' memory.
PIXELS_PER_BATCH = 1024 * 1024
# ComfyUI's tiled defaults: decoding in latent cells, encoding in pixels.
DEFAULT_DECODE_TILE, DEFAULT_DECODE_OVERLAP = 64, 16
DEFAULT_ENCODE_TILE, DEFAULT_ENCODE_OVERLAP = 512, 64


@dataclass(frozen=True)
class VAEModel:
    handle: ModelHandle  # loads an AutoencoderKL
    dtype: object
    downscale_ratio: int = 8
    latent_channels: int = 4

    @contextlib.contextmanager
    def _pass(self):
        """The autoencoder for one decode or encode: a pass is the prompt's memory peak, so the resident file
        pages of the every-step networks' packed weights (idle meanwhile) are dropped before it and the
        autoencoder's own after it, as a text encoder's are after encoding; each is read back from the page cache
        at its next use. See the module doc for what it bought."""
        from ..networks.cpu_kernels import release_packed_file_pages
        from ..networks.file_pages import release_module_file_pages

        release_packed_file_pages()
        vae = self.handle.get()
        try:
            yield vae
        finally:
            release_module_file_pages(vae)

    def _batches(self, count: int, height: int, width: int):
        step = max(1, PIXELS_PER_BATCH // max(1, height * width))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    def decode(self, samples):
        """Latent [B, 4, h, w] -> IMAGE [B, 8h, 8w, 3]."""
        import torch

        height, width = samples.shape[2] * self.downscale_ratio, samples.shape[3] * self.downscale_ratio
        images = []
        with self._pass() as vae, torch.no_grad():
            for part in self._batches(samples.shape[0], height, width):
                images.append(self._to_image(vae.decode(samples[part].to(self.dtype))))
        return torch.cat(images)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """ComfyUI's VAE.decode_tiled: `decode` in overlapping tiles of tile_y x tile_x latent cells (default
        64 x 64, overlap 16) cross-faded where they overlap; tile_t / overlap_t are for video VAEs (unused)."""
        import torch

        tile = (max(1, tile_y or DEFAULT_DECODE_TILE), max(1, tile_x or DEFAULT_DECODE_TILE))
        overlap = DEFAULT_DECODE_OVERLAP if overlap is None else overlap
        with self._pass() as vae, torch.no_grad():
            return self._to_image(vae.decode_tiled(samples.to(self.dtype), tile, overlap))

    def encode(self, image):
        """IMAGE [B, H, W, C] -> latent [B, 4, H/8, W/8]; sides are first cropped (centred) to multiples of 8."""
        import torch

        pixels = self._to_pixels(image)
        latents = []
        with self._pass() as vae, torch.no_grad():
            for part in self._batches(pixels.shape[0], pixels.shape[2], pixels.shape[3]):
                latents.append(vae.encode(pixels[part].to(self.dtype)).float())
        return torch.cat(latents)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """ComfyUI's VAE.encode_tiled: `encode` in overlapping tiles of tile_y x tile_x pixels (default 512 x 512,
        overlap 64; rounded down to multiples of 8); tile_t / overlap_t are for video VAEs (unused)."""
        import torch

        tile = (tile_y or DEFAULT_ENCODE_TILE, tile_x or DEFAULT_ENCODE_TILE)
        overlap = DEFAULT_ENCODE_OVERLAP if overlap is None else overlap
        with self._pass() as vae, torch.no_grad():
            return vae.encode_tiled(self._to_pixels(pixel_samples).to(self.dtype), tile, overlap).float()

    # ComfyUI's VAE attributes and questions that packs use.

    @property
    def upscale_ratio(self) -> int:
        return self.downscale_ratio

    @property
    def vae_dtype(self):
        return self.dtype

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    output_device = device
    latent_dim = 2  # image latents [B, C, H, W]
    output_channels = 3

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    @property
    def first_stage_model(self):
        """The AutoencoderKL network (ComfyUI's parameter names: encoder.*, decoder.*, quant_conv, ...)."""
        return self.handle.get()

    def get_sd(self) -> dict:
        return self.handle.get().state_dict()

    @staticmethod
    def process_input(image):
        """Pixels in 0..1 -> the VAE's -1..1 (channels first or last: elementwise)."""
        return image * 2.0 - 1.0

    @staticmethod
    def process_output(image):
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)

    def memory_used_encode(self, shape, dtype) -> int:
        """ComfyUI's estimate for the SD VAE: bytes to encode pixels of `shape` [B, C, H, W] (per image)."""
        return 1767 * shape[2] * shape[3] * _dtype_size(dtype)

    def memory_used_decode(self, shape, dtype) -> int:
        """ComfyUI's estimate for the SD VAE: bytes to decode latents of `shape` [B, C, h, w] (per latent)."""
        return 2178 * shape[2] * shape[3] * self.upscale_ratio ** 2 * _dtype_size(dtype)

    def vae_encode_crop_pixels(self, pixels):
        return self.crop_to_multiple(pixels)

    def crop_to_multiple(self, image):
        """ComfyUI's VAE input crop: both sides down to a multiple of the downscale ratio, centred."""
        ratio = self.downscale_ratio
        height, width = (image.shape[1] // ratio) * ratio, (image.shape[2] // ratio) * ratio
        if (height, width) == tuple(image.shape[1:3]):
            return image
        top, left = (image.shape[1] % ratio) // 2, (image.shape[2] % ratio) // 2
        return image[:, top:top + height, left:left + width, :]

    def _to_pixels(self, image):
        image = self.crop_to_multiple(image[..., :3])
        return image.movedim(-1, 1).float() * 2.0 - 1.0

    @staticmethod
    def _to_image(pixels):
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous()


def _dtype_size(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()
