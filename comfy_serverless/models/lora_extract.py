"""LoRA extraction (LoraSave): the weights of a "difference" MODEL / CLIP (ModelMergeSubtract, CLIPMergeSubtract)
turned into a LoRA file, as ComfyUI's nodes_lora_extract does it.

"standard": every Linear / Conv2d weight difference D [out, in(, kh, kw)] becomes a rank-r pair by truncated SVD,
D ~ (U S) Vh with r = min(rank, out, in); like ComfyUI, both factors are clamped to +-q, q the 0.99 quantile of
their joined values (this trims outliers, so even a full-rank pair is close to D, not equal), and a 3x3 kernel is
flattened ([out, in*kh*kw]) so the up factor is [out, r, 1, 1] and the down factor [r, in, kh, kw]. With
bias_diff, the other (one-dimensional) weight differences are kept whole as ".diff" and biases as ".diff_b".
"full_diff": every weight difference is kept whole (".diff"), biases too with bias_diff.

Names are kohya's (lora_unet_<LDM module path with _>, lora_te_ / lora_te1_ / lora_te2_ + text_model_<...>), which
our LoraLoader and ComfyUI's both read; tensors are float16 and there is no alpha (scale 1), as ComfyUI writes.
Text-encoder embeddings and projections have no LoRA name our loader maps, so they are left out.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

LORA_TYPES = ("standard", "full_diff")
CLAMP_QUANTILE = 0.99
UNET_PREFIX = "lora_unet_"
# kohya's text-encoder prefixes: one encoder -> lora_te_, SDXL's two -> lora_te1_ (CLIP-L), lora_te2_ (bigG)
SDXL_TEXT_PREFIXES = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}


def extract_pair(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down ~ diff (flattened for convolutions), by truncated SVD with ComfyUI's clamp."""
    if diff.ndim not in (2, 4):
        raise ValueError(f"a LoRA pair needs a 2-D or 4-D weight, got shape {tuple(diff.shape)}")
    out_dim, in_dim = diff.shape[:2]
    rank = max(1, min(rank, out_dim, in_dim))
    matrix = diff.float().reshape(out_dim, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    joined = torch.cat([up.flatten(), down.flatten()])
    high = torch.quantile(joined, CLAMP_QUANTILE)
    up, down = up.clamp(-high, high), down.clamp(-high, high)
    if diff.ndim == 4:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, in_dim, *diff.shape[2:])
    return up, down


def _half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float16).contiguous()


def extract_module_weights(module: nn.Module, prefix: str, rank: int, lora_type: str, bias_diff: bool,
                           name_of=lambda name: name) -> dict[str, torch.Tensor]:
    """LoRA entries for every parameter of ``module`` (its weights are the differences), under
    prefix + name_of(module path).replace('.', '_')."""
    if lora_type not in LORA_TYPES:
        raise ValueError(f"unknown lora_type {lora_type!r}; expected one of {list(LORA_TYPES)}")
    out: dict[str, torch.Tensor] = {}
    for path, child in module.named_modules():
        own = dict(child.named_parameters(recurse=False))
        if not own or name_of(path) is None:
            continue
        key = prefix + name_of(path).replace(".", "_")
        weight, bias = own.get("weight"), own.get("bias")
        if weight is not None:
            if lora_type == "full_diff":
                out[f"{key}.diff"] = _half(weight)
            elif isinstance(child, (nn.Linear, nn.Conv2d)):
                try:
                    up, down = extract_pair(weight.detach(), rank)
                except RuntimeError as exc:  # torch.quantile refuses very large inputs, as in ComfyUI: skip
                    log.warning("could not extract a LoRA for %s: %s", key, exc)
                else:
                    out[f"{key}.lora_up.weight"] = _half(up)
                    out[f"{key}.lora_down.weight"] = _half(down)
            elif bias_diff and weight.ndim < 2:
                out[f"{key}.diff"] = _half(weight)
        if bias is not None and bias_diff:
            out[f"{key}.diff_b"] = _half(bias)
    return out


def unet_lora(model, rank: int, lora_type: str, bias_diff: bool) -> dict[str, torch.Tensor]:
    """The entries of a MODEL's UNet (its patched weights, taken as the difference)."""
    return extract_module_weights(model.network(), UNET_PREFIX, rank, lora_type, bias_diff)


def _text_name(path: str) -> str | None:
    if not path.startswith("encoder.") and not path.startswith("final_layer_norm"):
        return None  # embeddings and the projection: no LoRA name maps onto them
    return "text_model." + path


def text_encoder_lora(clip, rank: int, lora_type: str, bias_diff: bool) -> dict[str, torch.Tensor]:
    """The entries of a CLIP's text encoders (with its patches applied)."""
    from .patching import patched_module

    network = patched_module(clip.handle, clip.patches)
    encoders = {name: getattr(network, name) for name in ("clip_l", "clip_h", "clip_g") if hasattr(network, name)}
    out: dict[str, torch.Tensor] = {}
    for name, encoder in encoders.items():
        prefix = SDXL_TEXT_PREFIXES[name] if len(encoders) > 1 else "lora_te_"
        out.update(extract_module_weights(encoder, prefix, rank, lora_type, bias_diff, _text_name))
    return out
