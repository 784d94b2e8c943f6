"""ComfyUI's `comfy.utils` for custom node packs: progress bars, resizing, model files and attribute helpers.

`ProgressBar` is the engine's own (comfy_serverless.progress): its updates become `progress` WebSocket messages for
the running node, and it raises the interrupt exception after `/interrupt`. Resizing reuses the core nodes' code
(ImageScale / LatentUpscale), so results match them. torch is imported inside the functions that compute.
"""

from __future__ import annotations

import json
import math
import struct

from comfy_serverless import progress
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.progress import ProgressBar  # noqa: F401  (ComfyUI's name, for packs)

PROGRESS_BAR_ENABLED = True


def set_progress_bar_enabled(enabled: bool) -> None:
    """ComfyUI's switch for console progress bars; progress messages to clients are always sent here."""
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = bool(enabled)


# -- resizing ---------------------------------------------------------------------------------------------

def common_upscale(samples, width: int, height: int, upscale_method: str, crop: str):
    """Resizes [B, C, H, W] to width x height: nearest-exact, bilinear, area, bicubic, lanczos or bislerp;
    crop="center" first trims the sides to the target aspect ratio."""
    from comfy_serverless.nodes.latents import upscale_latent

    return upscale_latent(samples, width, height, upscale_method, crop)


def bislerp(samples, width: int, height: int):
    """Spherical-linear resize of [B, C, H, W] (LatentUpscale's bislerp)."""
    return common_upscale(samples, width, height, "bislerp", "disabled")


def lanczos(samples, width: int, height: int):
    """PIL's Lanczos resize of [B, C, H, W] values in 0..1, through 8 bits as ComfyUI does."""
    from comfy_serverless.nodes.images import _lanczos

    return _lanczos(samples, width, height)


def get_tiled_scale_steps(width: int, height: int, tile_x: int, tile_y: int, overlap: int) -> int:
    """How many tiles `tiled_scale` runs `function` on for one image (for sizing a ProgressBar)."""
    return math.ceil(height / (tile_y - overlap)) * math.ceil(width / (tile_x - overlap))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    return [max(0, min(start, size - tile)) for start in range(0, size, max(1, tile - overlap))]


def tiled_scale(samples, function, tile_x: int = 64, tile_y: int = 64, overlap: int = 8,
                upscale_amount: float = 4, out_channels: int = 3, output_device="cpu", pbar=None):
    """Runs `function` (e.g. an upscale model) on overlapping tiles of [B, C, H, W] and blends the results,
    which are `upscale_amount` times the tile size, with weights that ramp down over the overlaps."""
    import torch

    batch, _, height, width = samples.shape
    out_h, out_w = round(height * upscale_amount), round(width * upscale_amount)
    results = []
    for index in range(batch):
        canvas = torch.zeros((1, out_channels, out_h, out_w), device=output_device)
        weights = torch.zeros((1, 1, out_h, out_w), device=output_device)
        item = samples[index:index + 1]
        for y in _tile_starts(height, tile_y, overlap):
            for x in _tile_starts(width, tile_x, overlap):
                progress.throw_exception_if_processing_interrupted()
                result = function(item[:, :, y:y + tile_y, x:x + tile_x]).to(output_device)
                top, left = round(y * upscale_amount), round(x * upscale_amount)
                rows, cols = min(result.shape[2], out_h - top), min(result.shape[3], out_w - left)
                result = result[:, :, :rows, :cols]
                ramp = max(1, round(overlap * upscale_amount))
                mask = torch.ones((1, 1, rows, cols), device=output_device)
                for step in range(min(ramp, rows // 2, cols // 2)):
                    fade = (step + 1) / ramp
                    mask[:, :, step, :] *= fade
                    mask[:, :, rows - 1 - step, :] *= fade
                    mask[:, :, :, step] *= fade
                    mask[:, :, :, cols - 1 - step] *= fade
                canvas[:, :, top:top + rows, left:left + cols] += result * mask
                weights[:, :, top:top + rows, left:left + cols] += mask
                if pbar is not None:
                    pbar.update(1)
        results.append(canvas / weights.clamp(min=1e-8))
    return torch.cat(results)


def repeat_to_batch_size(tensor, batch_size: int, dim: int = 0):
    """Cuts or cycles dimension `dim` to batch_size entries."""
    count = tensor.shape[dim]
    if count > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if count < batch_size:
        repeats = [1] * tensor.ndim
        repeats[dim] = math.ceil(batch_size / count)
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor


def resize_to_batch_size(tensor, batch_size: int):
    """Picks batch_size evenly spread entries of the first dimension (repeating them when growing)."""
    import torch

    count = tensor.shape[0]
    if count == batch_size:
        return tensor
    if batch_size <= 1:
        return tensor[:batch_size]
    if batch_size < count:
        scale = (count - 1) / (batch_size - 1)
        picks = [min(round(i * scale), count - 1) for i in range(batch_size)]
    else:
        scale = count / batch_size
        picks = [min(math.floor((i + 0.5) * scale), count - 1) for i in range(batch_size)]
    return tensor[torch.tensor(picks, device=tensor.device)]


# -- model files ------------------------------------------------------------------------------------------

def load_torch_file(ckpt: str, safe_load: bool = False, device=None, return_metadata: bool = False):
    """A model file's tensors by name (safetensors memory-mapped; pickles always read with torch's safe loader,
    whatever safe_load says: a file holding Python objects is refused with a message saying so)."""
    from comfy_serverless.models import checkpoint_files

    path = str(ckpt)
    if path.lower().endswith(checkpoint_files.SAFETENSORS_SUFFIXES):
        tensors, metadata = checkpoint_files._open_safetensors(path)
    else:
        tensors, metadata = checkpoint_files._open_pickle(path), {}
    if device is not None and str(device) != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return (tensors, metadata) if return_metadata else tensors


def save_torch_file(sd: dict, ckpt: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(sd, ckpt, metadata=metadata)


def safetensors_header(safetensors_path: str, max_size: int = 100 * 1024 * 1024) -> bytes | None:
    """The raw JSON header of a safetensors file, or None when it claims more than max_size bytes."""
    with open(safetensors_path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > max_size:
            return None
        return fh.read(length)


def safetensors_metadata(safetensors_path: str) -> dict:
    header = safetensors_header(safetensors_path)
    return dict(json.loads(header).get("__metadata__") or {}) if header else {}


def calculate_parameters(sd: dict, prefix: str = "") -> int:
    return sum(tensor.nelement() for key, tensor in sd.items() if key.startswith(prefix))


def convert_sd_to(state_dict: dict, dtype) -> dict:
    for key in list(state_dict):
        state_dict[key] = state_dict[key].to(dtype)
    return state_dict


def state_dict_key_replace(state_dict: dict, keys_to_replace: dict) -> dict:
    for old, new in keys_to_replace.items():
        if old in state_dict:
            state_dict[new] = state_dict.pop(old)
    return state_dict


def state_dict_prefix_replace(state_dict: dict, replace_prefix: dict, filter_keys: bool = False) -> dict:
    """Renames keys starting with each prefix to start with its replacement; with filter_keys, returns only the
    renamed entries (they are removed from state_dict either way)."""
    out = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key)
    return out


# -- attributes by dotted path ----------------------------------------------------------------------------

def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr: str, value):
    """Sets obj.<a.b.c> = value; returns the previous value."""
    *parents, leaf = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    previous = getattr(obj, leaf)
    setattr(obj, leaf, value)
    return previous


def set_attr_param(obj, attr: str, value):
    import torch

    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr: str, value) -> None:
    """Copies value into the existing tensor at obj.<a.b.c> (in place)."""
    get_attr(obj, attr).data.copy_(value)


def __getattr__(name: str):
    return missing_attribute(__name__, name)
