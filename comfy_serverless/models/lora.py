"""LoRA files: map their entries onto our parameters, patch weights by copy, undo exactly.

Layouts read (module paths may use LDM names or diffusers block names for the UNet, transformers names for
text encoders):

    kohya      lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight / .lora_up.weight / .alpha
               lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q...   (SDXL, LDM names)
               lora_te_text_model_encoder_layers_0_self_attn_q_proj...         (SD1/SD2; SDXL: lora_te1_, lora_te2_)
               .lora_mid.weight (LoCon with a Tucker core) for 3x3 convolutions
    diffusers  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight
               (also .lora.down/.lora.up, .lora_linear_layer.down/.up, .processor.to_q_lora.down)
               text_encoder.text_model.encoder.layers.0.self_attn.q_proj..., text_encoder_2.... (SDXL bigG)

Text encoders have separate q/k/v projections in every layout (networks/clip.py splits OpenCLIP's fused
in_proj_weight on loading), so a LoRA on q_proj patches q_proj. LoHa, LoKr and DoRA entries are reported as
unmapped.

A patch never writes into the base tensors (they may be a shared memory map): each patched parameter is
replaced by a new tensor, and undo() puts the original Parameter objects back.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..networks.clip import to_openclip_key
from ..networks.unet import UNetConfig


class LoraEntry(NamedTuple):
    """One low-rank update: weight += strength * (alpha / rank) * up @ [mid] @ down; or, with ``diff``, a whole
    difference (ComfyUI's ".diff" / ".diff_b" keys, as LoraSave's full_diff and bias_diff write them)."""

    up: torch.Tensor | None  # [out, rank] or [out, rank, 1, 1]
    down: torch.Tensor | None  # [rank, in] or [rank, in, kh, kw] ([rank, in, 1, 1] with a mid)
    alpha: float | None  # None: scale 1
    mid: torch.Tensor | None = None  # Tucker core [rank, rank, kh, kw]
    diff: torch.Tensor | None = None  # weight (or bias) += strength * diff


@dataclass
class LoraPatches:
    """target ("unet", "clip_l", "clip_h", "clip_g") -> parameter name -> entries; plus what was not mapped."""

    targets: dict[str, dict[str, list[LoraEntry]]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


# ---- UNet names: LDM (ours) <-> diffusers ------------------------------------------------------------

_UNET_SIMPLE_NAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_BLOCK = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)(?:\.(.+))?$")


@functools.lru_cache(maxsize=8)
def _unet_blocks(config: UNetConfig) -> dict[str, tuple[str, str]]:
    """LDM block ("input_blocks.4.1") -> (diffusers block, kind), following the UNetModel construction order."""
    blocks = {"middle_block.0": ("mid_block.resnets.0", "resnet"),
              "middle_block.1": ("mid_block.attentions.0", "attention"),
              "middle_block.2": ("mid_block.resnets.1", "resnet")}
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    for level in range(levels):
        has_attention = config.transformer_depth[level] > 0
        for j in range(config.num_res_blocks):
            index = 1 + level * per_level + j
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if has_attention:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
        if level != levels - 1:
            blocks[f"input_blocks.{(level + 1) * per_level}.0"] = (f"down_blocks.{level}.downsamplers.0", "downsample")
    for up, level in enumerate(reversed(range(levels))):
        has_attention = config.transformer_depth[level] > 0
        for j in range(per_level):
            index = up * per_level + j
            blocks[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", "resnet")
            if has_attention:
                blocks[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", "attention")
        if level != 0:
            blocks[f"output_blocks.{up * per_level + per_level - 1}.{2 if has_attention else 1}"] = (
                f"up_blocks.{up}.upsamplers.0", "upsample")
    return blocks


def diffusers_unet_name(name: str, config: UNetConfig) -> str | None:
    """The diffusers module path of our (LDM) UNet module ``name``, e.g. input_blocks.1.1.proj_in ->
    down_blocks.0.attentions.0.proj_in; None for names diffusers has no counterpart for."""
    if name in _UNET_SIMPLE_NAMES:
        return _UNET_SIMPLE_NAMES[name]
    match = _UNET_BLOCK.match(name)
    block = match and _unet_blocks(config).get(match[1])
    if not block:
        return None
    prefix, kind = block
    inner = match[2]
    if inner is None:
        return prefix
    if kind == "resnet":
        inner = _RESNET_PARTS.get(inner)
    elif kind == "downsample":
        inner = "conv" if inner == "op" else None
    elif kind == "upsample":
        inner = "conv" if inner == "conv" else None
    return None if inner is None else f"{prefix}.{inner}"


# ---- alias tables: every name a LoRA may use for one of our weights ----------------------------------


class _Target(NamedTuple):
    param: str
    shape: tuple[int, ...]  # of the patched part


def _weighted_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module.weight.shape


def _unet_aliases(unet: nn.Module) -> dict[str, _Target]:
    aliases = {}
    for name, shape in _weighted_modules(unet):
        target = _Target(f"{name}.weight", tuple(shape))
        aliases[name] = target
        diffusers_name = diffusers_unet_name(name, unet.config)
        if diffusers_name:
            aliases[diffusers_name] = target
    return aliases


def _text_aliases(model: nn.Module) -> dict[str, _Target]:
    """Our (transformers) names, with and without text_model., plus OpenCLIP's for an OpenCLIP encoder's
    unfused projections (transformer.resblocks.N.mlp.c_fc, ...)."""
    aliases = {}
    for name, shape in _weighted_modules(model):
        aliases[name] = aliases[f"text_model.{name}"] = target = _Target(f"{name}.weight", tuple(shape))
        openclip_name, part = to_openclip_key(target.param)
        if model.config.layout == "openclip" and part is None:
            aliases[openclip_name.removesuffix(".weight")] = target
    return aliases


# ---- parsing ---------------------------------------------------------------------------------------

_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"), (".alpha", "alpha"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".diff", "diff"), (".diff_b", "diff_b"),
)
# Old diffusers attention processors: <attention>.processor.to_q_lora.down.weight
_PROCESSOR_KEY = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "clip_l"), ("lora_te2_", "clip_g"), ("lora_te_", None))
_DOTTED_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "clip_g"), ("text_encoder.", None),
                    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"))
_BARE_UNET_NAMES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")


def _split_key(key: str) -> tuple[str, str] | None:
    """(module path, role) of one LoRA tensor key."""
    if match := _PROCESSOR_KEY.match(key):
        module = f"{match[1]}.{match[2]}" + (".0" if match[2] == "to_out" else "")
        return module, match[3]
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _route(module: str, first_text_encoder: str) -> tuple[str, str, bool] | None:
    """(target, name inside the target, whether the name is kohya-flattened)."""
    for prefix, target in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            return target or first_text_encoder, module[len(prefix):], True
    for prefix, target in _DOTTED_PREFIXES:
        if module.startswith(prefix):
            return target or first_text_encoder, module[len(prefix):], False
    if module.startswith(_BARE_UNET_NAMES):
        return "unet", module, False
    return None


def _fits(entry: LoraEntry, target: _Target) -> bool:
    out_features, in_numel = target.shape[0], 1
    for size in target.shape[1:]:
        in_numel *= size
    up, down = entry.up.flatten(1), entry.down.flatten(1)
    if up.shape[0] != out_features or up.shape[1] != down.shape[0]:
        return False
    if entry.mid is None:
        return down.shape[1] == in_numel
    kernel = entry.mid.shape[2] * entry.mid.shape[3]
    return entry.mid.shape[:2] == (down.shape[0], down.shape[0]) and down.shape[1] * kernel == in_numel


def parse_lora(lora: Mapping[str, torch.Tensor], models: Mapping[str, nn.Module]) -> LoraPatches:
    """Map a LoRA state dict onto ``models`` (names as in LoraPatches.targets; SD1: unet + clip_l, SD2: unet +
    clip_h, SDXL: unet + clip_l + clip_g). Entries for absent models or unknown modules, or whose shapes do not
    fit, go to ``unmapped`` (ComfyUI logs these as "lora key not loaded")."""
    first_text_encoder = "clip_h" if "clip_h" in models else "clip_l"
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    result = LoraPatches()
    for key, tensor in lora.items():
        split = _split_key(key)
        if split is None:
            result.unmapped.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = (key, tensor)

    tables: dict[str, tuple[dict[str, _Target], dict[str, str]]] = {}
    for module, parts in groups.items():
        keys = [key for key, _ in parts.values()]
        route = _route(module, first_text_encoder)
        target_name = route[0] if route else None
        low_rank = "up" in parts and "down" in parts
        if target_name not in models or not (low_rank or "diff" in parts or "diff_b" in parts):
            result.unmapped.extend(keys)
            continue
        if target_name not in tables:
            model = models[target_name]
            aliases = _unet_aliases(model) if target_name == "unet" else _text_aliases(model)
            tables[target_name] = aliases, {alias.replace(".", "_"): alias for alias in aliases}
        aliases, flattened = tables[target_name]
        _, name, is_flat = route
        target = aliases.get(flattened.get(name, "") if is_flat else name)
        if target is None:
            result.unmapped.extend(keys)
            continue
        patched = result.targets.setdefault(target_name, {})
        if low_rank:
            alpha = parts.get("alpha")
            mid = parts.get("mid")
            entry = LoraEntry(up=parts["up"][1], down=parts["down"][1],
                              alpha=None if alpha is None else float(alpha[1].item()),
                              mid=None if mid is None else mid[1])
            if _fits(entry, target):
                patched.setdefault(target.param, []).append(entry)
            else:
                low_rank_roles = ("up", "down", "alpha", "mid")
                result.unmapped.extend(key for role, (key, _) in parts.items() if role in low_rank_roles)
        for role, param in (("diff", target.param), ("diff_b", target.param.removesuffix("weight") + "bias")):
            if role not in parts:
                continue
            key, tensor = parts[role]
            shape = target.shape if role == "diff" else _parameter_shape(models[target_name], param)
            if shape is None or tensor.numel() != _numel(shape):
                result.unmapped.append(key)
                continue
            patched.setdefault(param, []).append(LoraEntry(None, None, None, diff=tensor))
        if not patched:
            del result.targets[target_name]
    return result


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _parameter_shape(model: nn.Module, name: str) -> tuple[int, ...] | None:
    try:
        return tuple(model.get_parameter(name).shape)
    except AttributeError:
        return None


def load_lora(path, models: Mapping[str, nn.Module]) -> LoraPatches:
    """Open a LoRA file (see checkpoint_files.open_state_dict) and parse it; a file with no LoRA entries at
    all (a checkpoint picked by mistake) is a CheckpointError."""
    from .checkpoint_files import CheckpointError, describe_contents, open_state_dict

    state_dict = open_state_dict(path)
    if not any(_split_key(key) for key in state_dict):
        raise CheckpointError(f"{path}: not a LoRA: this file looks like {describe_contents(state_dict)}")
    return parse_lora(state_dict, models)


# ---- applying ----------------------------------------------------------------------------------------


def lora_delta(entry: LoraEntry, shape: Sequence[int]) -> torch.Tensor:
    """The float32 update (alpha / rank) * up @ [mid] @ down (or the entry's whole diff), shaped like the patched
    weight (part)."""
    if entry.diff is not None:
        return entry.diff.float().reshape(tuple(shape))
    up = entry.up.float().flatten(1)
    down = entry.down.float().flatten(1)
    rank = down.shape[0]
    scale = 1.0 if entry.alpha is None else entry.alpha / rank
    if entry.mid is None:
        # [out, in * kh * kw]: a 3x3 down kernel flattens in the order the weight does.
        delta = up @ down
    else:
        # Tucker: W[o, i, y, x] = sum_{a, b} up[o, a] * mid[a, b, y, x] * down[b, i]
        delta = torch.einsum("abyx,bi,oa->oiyx", entry.mid.float(), down, up)
    return (delta * scale).reshape(tuple(shape))


@dataclass
class AppliedLora:
    """What apply_lora changed; undo() restores the original parameters (undo stacked LoRAs last-first)."""

    module: nn.Module
    originals: dict[str, nn.Parameter] = field(default_factory=dict)
    patched: dict[str, nn.Parameter] = field(default_factory=dict)

    def undo(self) -> None:
        # Check everything first so a refused undo changes nothing.
        for name in self.originals:
            owner, leaf = _owner(self.module, name)
            if getattr(owner, leaf) is not self.patched[name]:
                raise RuntimeError(f"{name} was changed after this LoRA was applied; undo LoRAs in reverse order")
        for name, original in self.originals.items():
            owner, leaf = _owner(self.module, name)
            setattr(owner, leaf, original)
        self.originals.clear()
        self.patched.clear()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return module.get_submodule(owner_name), leaf


def apply_lora(module: nn.Module, patches: Mapping[str, Sequence[LoraEntry]], strength: float = 1.0) -> AppliedLora:
    """Patch ``module`` with one target's entries (``LoraPatches.targets["unet"]`` for the UNet ...)."""
    return apply_loras(module, [(patches, strength)])


@torch.no_grad()
def apply_loras(module: nn.Module, stack: Sequence[tuple[Mapping[str, Sequence[LoraEntry]], float]]) -> AppliedLora:
    """Patch ``module`` with several LoRAs at once: one new tensor per patched parameter, whatever the count.

    Deltas are summed in float32 on a copy of the weight, which is then cast back to the weight's dtype.
    """
    parameters = dict(module.named_parameters())
    applied = AppliedLora(module)
    names = dict.fromkeys(name for patches, strength in stack if strength for name in patches)
    for name in names:
        if name not in parameters:
            raise KeyError(f"LoRA patch for {name!r}, which {type(module).__name__} does not have")
        original = parameters[name]
        weight = original.detach().to(torch.float32, copy=True)
        for patches, strength in stack:
            for entry in patches.get(name, ()) if strength else ():
                weight += strength * lora_delta(entry, weight.shape).to(weight.device)
        patched = nn.Parameter(weight.to(original.dtype), requires_grad=False)
        owner, leaf = _owner(module, name)
        setattr(owner, leaf, patched)
        applied.originals[name] = original
        applied.patched[name] = patched
    return applied
