"""Upscale models (UPSCALE_MODEL): read a file, recognise its network, run it over an image in tiles.

Choice of own code over spandrel (measured 2026-12-01 on this project's 2-core machine, torch 2.13.0 CPU):
spandrel 0.4.2 is a 321 kB wheel, 1.8 MB installed (4.2 MB with bytecode) plus einops (0.3 MB), 37,900 lines
over 40+ architectures. `import spandrel` fails without torchvision (its package __init__ imports every
architecture, and LaMa imports torchvision at module level); PyPI's torchvision wheels need CUDA torch, so it
cannot be installed by the project's two commands. With a stand-in torchvision module it imports in 125 ms
(median of 5 fresh processes, torch already imported; 1006 ms for torch + spandrel against 855 ms for torch).
Own code: ESRGAN (RRDBNet), Real-ESRGAN compact and SPAN in ~490 lines (networks/upscalers), importing in a
few ms. Checked against spandrel outside the test suite: RRDBNet and compact outputs identical (max difference
0.0, 11 configurations, incl. spandrel's padding and clamping on 33 shape cases), SPAN within float rounding.

A loaded model lives in the loaded-model cache (models.model_cache) like every other network: the
UpscaleModel object holds a handle, so /free really releases the weights and the next use reads the file again.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from types import SimpleNamespace

import torch

from ..networks.upscalers import UnsupportedUpscaler, UpscalerInfo, build
from .checkpoint_files import CheckpointError, open_state_dict
from .model_cache import file_stamp, loaded_models

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl", ".pt2")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net")  # BasicSR / Lightning / misc. trainers
START_TILE, OVERLAP, SMALLEST_TILE = 512, 32, 128  # ComfyUI's ImageUpscaleWithModel


class UpscaleModelError(ValueError):
    """A file that cannot be used as an upscale model; the message names the file and what was found."""


# ---- reading -------------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an upscale-model file (.pth etc. through torch.load(weights_only=True), or safetensors),
    unwrapped from the containers trainers save them in ({"params_ema": {...}} and the like)."""
    lowered = path.lower()
    try:
        if lowered.endswith(SAFETENSORS_SUFFIXES):
            loaded = open_state_dict(path)
        elif lowered.endswith(PICKLE_SUFFIXES):
            loaded = _load_pickle(path)
        else:
            raise UpscaleModelError(f"{path}: unknown model file type; expected one of "
                                    f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")
    except CheckpointError as exc:
        raise UpscaleModelError(str(exc)) from None
    for key in WRAPPER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UpscaleModelError(f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(loaded)[:6]))})")
    return tensors


def _load_pickle(path: str) -> Mapping:
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise UpscaleModelError(f"{path}: missing or empty file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    is_zip = head.startswith(b"PK\x03\x04")
    if not is_zip and not (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):  # pickle protocol 2-5
        raise UpscaleModelError(f"{path}: not a PyTorch file (it starts with {head!r}); truncated, corrupt or "
                                f"another kind of file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc)):
            raise UpscaleModelError(f"{path}: refused: the file holds Python objects besides tensors "
                                    f"({found.group(1)}), and loading those could run code; use a .safetensors "
                                    f"version of the model") from None
        raise UpscaleModelError(f"{path}: cannot read PyTorch file (truncated or corrupt?)") from None
    except Exception as exc:  # truncated or damaged files fail in many ways
        raise UpscaleModelError(f"{path}: cannot read PyTorch file (truncated or corrupt?): "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(loaded, Mapping):
        raise UpscaleModelError(f"{path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    return loaded


def build_from_file(path: str) -> torch.nn.Module:
    """The network of an upscale-model file, with its UpscalerInfo as `.upscaler_info`."""
    try:
        network, info = build(read_state_dict(path))
    except UnsupportedUpscaler as exc:
        raise UpscaleModelError(f"{os.path.basename(path)}: {exc}") from None
    network.upscaler_info = info
    return network.requires_grad_(False)


# ---- the UPSCALE_MODEL object ------------------------------------------------------------------------


class UpscaleModel:
    """What UpscaleModelLoader returns. Callable on [N, C, H, W] images in 0..1 (as spandrel's image
    descriptors are, which ComfyUI passes around): pads to the network's size multiple, clamps to 0..1."""

    def __init__(self, handle, info: UpscalerInfo):
        self.handle = handle
        self.info = info
        self.scale = info.scale
        self.input_channels = info.input_channels
        self.output_channels = info.output_channels
        self.architecture = SimpleNamespace(name=info.architecture, id=info.architecture)
        self.size_requirements = SimpleNamespace(minimum=info.minimum, multiple_of=info.multiple_of, square=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.handle.get()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, *args, **kwargs) -> UpscaleModel:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> UpscaleModel:
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != self.input_channels:
            raise ValueError(f"{self.info.architecture} x{self.scale} takes [N, {self.input_channels}, H, W] "
                             f"images; got {list(image.shape)}")
        network = self.model
        height, width = image.shape[-2:]
        padded = _pad_to(image.to(self.dtype), self.size_requirements.multiple_of,
                         self.size_requirements.minimum)
        with torch.inference_mode():
            out = network(padded).clamp_(0, 1)
        return out[..., : height * self.scale, : width * self.scale].to(image.dtype)

    def __repr__(self) -> str:
        return f"<UpscaleModel {self.info.architecture} x{self.scale} ({self.handle.description})>"


def _pad_to(image: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """Bottom/right padding up to the size the network needs: mirrored where possible, edge pixels beyond."""
    height, width = image.shape[-2:]
    need_h = -(-max(height, minimum) // multiple) * multiple - height
    need_w = -(-max(width, minimum) // multiple) * multiple - width
    if not need_h and not need_w:
        return image
    mirror_h, mirror_w = min(need_h, height - 1), min(need_w, width - 1)
    image = torch.nn.functional.pad(image, (0, mirror_w, 0, mirror_h), mode="reflect")
    return torch.nn.functional.pad(image, (0, need_w - mirror_w, 0, need_h - mirror_h), mode="replicate")


def load_upscale_model(path: str) -> UpscaleModel:
    """Reads and recognises the file now (a bad file fails in the loader node, as in ComfyUI); the network
    stays in the loaded-model cache, from which /free can drop it."""
    stamp = file_stamp(path)
    handle = loaded_models().handle((stamp, "upscale_model"), f"{os.path.basename(path)} (upscale model)",
                                    lambda: build_from_file(path), os.path.getsize(path),
                                    family=(stamp[0], "upscale_model"))
    return UpscaleModel(handle, handle.get().upscaler_info)


# ---- tiled upscaling -------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles begin along one side (ComfyUI's placement: steps of tile - overlap, the last tile shorter)."""
    return list(range(0, size - overlap, tile - overlap)) if size > tile else [0]


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def tiled_scale(images: torch.Tensor, function: Callable, tile: int, overlap: int, scale: int,
                out_channels: int = 3, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """`function` over overlapping tiles of each [C, H, W] image, results blended with linear ramps of
    round(overlap * scale) pixels at every tile side and normalised by the summed weights."""
    batch, _, height, width = images.shape
    out_h, out_w = round(height * scale), round(width * scale)
    output = torch.empty(batch, out_channels, out_h, out_w)
    for index in range(batch):
        image = images[index: index + 1]
        if height <= tile and width <= tile:
            output[index: index + 1] = function(image).float().cpu()
            if on_tile:
                on_tile()
            continue
        total = torch.zeros(1, out_channels, out_h, out_w)
        weights = torch.zeros(1, out_channels, out_h, out_w)
        for top, left in itertools.product(tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)):
            piece = image[..., top: top + min(tile, height - top), left: left + min(tile, width - left)]
            result = function(piece).float().cpu()
            mask = _feather(result.shape[-2:], round(overlap * scale))
            y, x = round(top * scale), round(left * scale)
            rows, cols = result.shape[-2:]
            total[..., y: y + rows, x: x + cols] += result * mask
            weights[..., y: y + rows, x: x + cols] += mask
            if on_tile:
                on_tile()
        output[index: index + 1] = total / weights
    return output


def _feather(shape, feather: int) -> torch.Tensor:
    """Per-pixel weights of a tile result: 1 inside, rising as (t + 1) / feather over `feather` pixels at each
    side (a side no longer than the feather is left flat)."""
    mask = torch.ones(shape)
    for dim, length in enumerate(shape):
        if feather >= length:
            continue
        ramp = torch.ones(length)
        steps = torch.arange(1, feather + 1, dtype=torch.float32) / feather
        ramp[:feather] *= steps
        ramp[length - feather:] *= steps.flip(0)
        mask *= ramp.view(-1, 1) if dim == 0 else ramp.view(1, -1)
    return mask


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def upscale_image(model: UpscaleModel, image: torch.Tensor, progress: Callable[[int], Callable] | None = None,
                  tile: int = START_TILE, overlap: int = OVERLAP, smallest_tile: int = SMALLEST_TILE) -> torch.Tensor:
    """ImageUpscaleWithModel: an IMAGE [B, H, W, C] scaled by the model, in tiles; the tile side halves after
    running out of memory, down to `smallest_tile`. `progress(total)` returns a per-tile callback."""
    if image.dim() != 4:
        raise ValueError(f"expected an IMAGE [B, H, W, C], got a tensor of shape {list(image.shape)}")
    if image.shape[-1] != model.input_channels:
        raise ValueError(f"the upscale model takes {model.input_channels}-channel images; this image has "
                         f"{image.shape[-1]} channels")
    pixels = image.movedim(-1, -3).to(model.device)
    while True:
        try:
            steps = pixels.shape[0] * tile_count(pixels.shape[-2], pixels.shape[-1], tile, overlap)
            on_tile = progress(steps) if progress else None
            scaled = tiled_scale(pixels, model, tile, overlap, model.scale, on_tile=on_tile)
            break
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            tile //= 2
            if tile < smallest_tile:
                raise
    return torch.clamp(scaled.movedim(-3, -1), 0.0, 1.0)
