"""ControlNet and T2I-Adapter files: recognise the layout, map keys to ours, read the config from shapes, load.

Layouts read (safetensors or .pth):

    original     control_model.input_hint_block.0.weight, control_model.zero_convs.0.0.weight, ... (the prefix
                 may be absent); a "difference" key marks a diff ControlNet (weights stored minus the UNet's)
    diffusers    controlnet_cond_embedding.conv_in.weight, down_blocks.0.resnets.0.conv1.weight,
                 controlnet_down_blocks.0.weight, controlnet_mid_block.weight, ...
    union        either layout plus task_embedding, control_add_embedding.*, transformer_layes.0.*,
                 spatial_ch_projs.* (ControlNet++; networks/controlnet.py)
    T2I-Adapter  see models/t2i_adapters.py
    control-LoRA see models/control_lora.py

load_controlnet(path, model=None) returns a control object (models/control_objects.py); the network itself is
built on first use through the loaded-model cache, in the UNet's compute dtype.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch

from ..networks.controlnet import ControlNetConfig, ControlNetModel
from ..networks.unet import UNetConfig
from .checkpoint_files import CheckpointError, describe_contents, open_state_dict
from .model_cache import file_stamp, loaded_models
from .precision import dtype_name, unet_dtype

log = logging.getLogger(__name__)

ORIGINAL_PREFIX = "control_model."
DIFF_MARKER = "difference"
CONTROL_LORA_MARKER = "lora_controlnet"
SUPPORTED = ("supported: ControlNets for SD1.x, SD2.x and SDXL (original or diffusers layout, diff, control-LoRA, "
             "union), "
             "T2I-Adapters")

# ---- diffusers names -> ours -------------------------------------------------------------------------

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SIMPLE = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
           "controlnet_mid_block": "middle_block_out.0"}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_HINT = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)$")
_ZERO = re.compile(r"^controlnet_down_blocks\.(\d+)\.(weight|bias)$")


def _resnet_part(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_RESNET_PARTS.get(module, module)}.{param}"


# Union ControlNets' own parts keep their names in both layouts, except the fused attention projection.
UNION_PREFIXES = ("control_add_embedding.", "task_embedding", "transformer_layes.", "spatial_ch_projs.")
_DIFFUSERS_IN_PROJ = (".attn.in_proj_weight", ".attn.in_proj_bias")
_OUR_IN_PROJ = (".attn.in_proj.weight", ".attn.in_proj.bias")


def _union_name(key: str, to_ours: bool) -> str:
    for theirs, ours in zip(_DIFFUSERS_IN_PROJ, _OUR_IN_PROJ):
        if key.endswith(theirs if to_ours else ours):
            return key[: -len(theirs if to_ours else ours)] + (ours if to_ours else theirs)
    return key


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout ControlNet's tensors under our (original, prefix-less) names; unknown keys raise."""
    res_blocks = len({key.split(".")[3] for key in state_dict if key.startswith("down_blocks.0.resnets.")})
    hint_blocks = len({key.split(".")[2] for key in state_dict if key.startswith("controlnet_cond_embedding.blocks.")})
    if res_blocks == 0:
        raise CheckpointError("a diffusers-layout ControlNet without down_blocks.0.resnets; " + SUPPORTED)
    per_level = res_blocks + 1
    mapped = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if key.startswith(UNION_PREFIXES):
            name = _union_name(key, to_ours=True)
        elif module in _SIMPLE:
            name = f"{_SIMPLE[module]}.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            name = f"input_hint_block.{2 + 2 * hint_blocks}.{param}"
        elif match := _HINT.match(key):
            name = f"input_hint_block.{2 + 2 * int(match[1])}.{match[2]}"
        elif match := _ZERO.match(key):
            name = f"zero_convs.{match[1]}.0.{match[2]}"
        elif match := _DOWN.match(key):
            level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            block = 1 + level * per_level + index
            if kind == "resnets":
                name = f"input_blocks.{block}.0.{_resnet_part(rest)}"
            elif kind == "attentions":
                name = f"input_blocks.{block}.1.{rest}"
            else:
                name = f"input_blocks.{(level + 1) * per_level}.0.{rest.replace('conv.', 'op.', 1)}"
        elif match := _MID.match(key):
            kind, index, rest = match[1], int(match[2]), match[3]
            if kind == "resnets":
                name = f"middle_block.{2 * index}.{_resnet_part(rest)}"
            else:
                name = f"middle_block.1.{rest}"
        else:
            raise CheckpointError(f"unexpected key {key!r} in a diffusers-layout ControlNet; {SUPPORTED}")
        mapped[name] = tensor
    return mapped


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The reverse of diffusers_to_original (for writing diffusers-layout files and for tests)."""
    from .lora import diffusers_unet_name

    last_hint = 4 * len(config.hint_block_channels) - 2  # 2n convs at even indices
    out = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if key.startswith(UNION_PREFIXES):
            out[_union_name(key, to_ours=False)] = tensor
            continue
        if parts[0] == "input_hint_block":
            index = int(parts[1])
            name = ("controlnet_cond_embedding.conv_in" if index == 0 else "controlnet_cond_embedding.conv_out"
                    if index == last_hint else f"controlnet_cond_embedding.blocks.{(index - 2) // 2}")
        elif parts[0] == "zero_convs":
            name = f"controlnet_down_blocks.{parts[1]}"
        elif module == "middle_block_out.0":
            name = "controlnet_mid_block"
        else:
            name = diffusers_unet_name(module, config.unet)
            if name is None:
                raise ValueError(f"no diffusers name for {key}")
        out[f"{name}.{param}"] = tensor
    return out


# ---- config from shapes ------------------------------------------------------------------------------

_TRANSFORMER = re.compile(r"^(input_blocks\.\d+|middle_block)\.1\.transformer_blocks\.(\d+)\.")
_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")
_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)\.weight$")


def _need(weights: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in weights:
        raise CheckpointError(f"ControlNet weight {key!r} is missing: the file is incomplete or not a ControlNet "
                              f"for SD1.x/SD2.x/SDXL; {SUPPORTED}")
    return weights[key]


def controlnet_config(weights: Mapping[str, torch.Tensor]) -> tuple[ControlNetConfig, str]:
    """(config, family) of a ControlNet in our names. Head counts follow the family rule (as for UNets): SD1 8
    heads, SD2 and SDXL 64-wide heads."""
    model_channels, in_channels = _need(weights, "input_blocks.0.0.weight").shape[:2]
    depths: dict[str, int] = {}
    block_count = 0
    for key in weights:
        if match := _TRANSFORMER.match(key):
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
        if match := _INPUT_BLOCK.match(key):
            block_count = max(block_count, int(match[1]) + 1)
    levels: list[list[tuple[int, int]]] = [[]]
    for index in range(1, block_count):
        if f"input_blocks.{index}.0.op.weight" in weights:
            levels.append([])
            continue
        width = _need(weights, f"input_blocks.{index}.0.in_layers.2.weight").shape[0]
        levels[-1].append((width // model_channels, depths.get(f"input_blocks.{index}", 0)))
    res_blocks = len(levels[0])
    if res_blocks == 0 or any(len(level) != res_blocks or len(set(level)) != 1 for level in levels):
        raise CheckpointError(f"the ControlNet's input blocks are laid out unlike SD1.x/SD2.x/SDXL; {SUPPORTED}")
    context_key = next((k for k in weights if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    proj_in_key = next((k for k in weights if k.endswith(".1.proj_in.weight")), None)
    if context_key is None or proj_in_key is None:
        raise CheckpointError(f"a ControlNet without cross-attention; {SUPPORTED}")
    label_emb = weights.get("label_emb.0.0.weight")
    linear = weights[proj_in_key].ndim == 2
    family = "sdxl" if label_emb is not None else "sd2" if linear else "sd15"
    unet = UNetConfig(
        in_channels=in_channels, model_channels=model_channels, channel_mult=tuple(lv[0][0] for lv in levels),
        num_res_blocks=res_blocks, transformer_depth=tuple(lv[0][1] for lv in levels),
        transformer_depth_middle=depths.get("middle_block", 0), context_dim=weights[context_key].shape[1],
        num_heads=8 if family == "sd15" else None, num_head_channels=None if family == "sd15" else 64,
        use_linear_in_transformer=linear, adm_in_channels=None if label_emb is None else label_emb.shape[1])
    hint_convs = sorted(int(m[1]) for k in weights if (m := _HINT_CONV.match(k)))
    if not hint_convs or hint_convs != list(range(0, 2 * len(hint_convs), 2)) or len(hint_convs) % 2:
        raise CheckpointError(f"the ControlNet's hint encoder (input_hint_block) is incomplete; {SUPPORTED}")
    widths = tuple(weights[f"input_hint_block.{i}.weight"].shape[0] for i in hint_convs[:-1:2])
    hint_channels = weights["input_hint_block.0.weight"].shape[1]
    union = weights.get("task_embedding")
    union_types = 0 if union is None else union.shape[0]
    return ControlNetConfig(unet, hint_channels=hint_channels, hint_block_channels=widths,
                            union_types=union_types), family


# ---- files -------------------------------------------------------------------------------------------


def read_controlnet_weights(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(weights in our names, is_diff) of a ControlNet file's tensors; raises CheckpointError for anything else."""
    if "controlnet_cond_embedding.conv_in.weight" in state_dict:
        return diffusers_to_original(state_dict), False
    if ORIGINAL_PREFIX + "zero_convs.0.0.weight" in state_dict:
        weights = {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
        return weights, DIFF_MARKER in state_dict
    if "zero_convs.0.0.weight" in state_dict:
        known = ("input_blocks.", "middle_block", "zero_convs.", "input_hint_block.", "time_embed.", "label_emb.",
                 *UNION_PREFIXES)
        return {k: v for k, v in state_dict.items() if k.startswith(known)}, False
    raise CheckpointError(f"not a ControlNet or T2I-Adapter: it looks like {describe_contents(state_dict)}; "
                          + SUPPORTED)


def _check_keys(weights: Mapping[str, torch.Tensor], config: ControlNetConfig) -> None:
    from ..networks.build import build_on_meta

    expected = build_on_meta(lambda: ControlNetModel(config)).state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k, v in expected.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[:3]}")
        raise CheckpointError(f"the ControlNet's weights do not fit its detected layout ({detail}); {SUPPORTED}")


def _size(weights: Mapping[str, torch.Tensor], dtype) -> int:
    item = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * item for t in weights.values())


def _build(weights: Mapping[str, torch.Tensor], config: ControlNetConfig, dtype) -> ControlNetModel:
    from ..networks.build import build_from_state_dict

    return build_from_state_dict(lambda: ControlNetModel(config), weights, dtype)


def load_controlnet(path: str, model=None):
    """ControlNetLoader / DiffControlNetLoader: the control object of a file (a diff ControlNet needs `model`,
    whose UNet weights are added to the file's)."""
    from .control_objects import ControlNet
    from .t2i_adapters import is_t2i_adapter, load_t2i_adapter

    name = os.path.basename(path)
    try:
        state_dict = open_state_dict(path)
        if CONTROL_LORA_MARKER in state_dict:
            from .control_lora import ControlLora, read_control_lora

            read_control_lora(state_dict)  # a damaged file fails here, not when sampling
            return ControlLora(path, global_average_pooling=_shuffle_name(path))
        if is_t2i_adapter(state_dict):
            return load_t2i_adapter(path, state_dict)
        weights, is_diff = read_controlnet_weights(state_dict)
        config, family = controlnet_config(weights)
        _check_keys(weights, config)
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(path) else f"{path}: {message}") from None
    if is_diff and model is None:
        raise CheckpointError(f"{path}: a diff ControlNet (stored as a difference to a UNet): load it with "
                              f"DiffControlNetLoader and the model it was made for")
    stamp = file_stamp(path)
    dtype = unet_dtype()
    cache = loaded_models()
    if is_diff:
        description = f"{name} diff ControlNet ({dtype_name(dtype)})"
        key = (stamp, "diff-controlnet", str(dtype), model.handle.key, tuple(id(p) for p in model.patches))
        handle = cache.handle(key, description, lambda: _build_diff(path, model, dtype), _size(weights, dtype))
    else:
        description = f"{name} ControlNet ({dtype_name(dtype)})"
        handle = cache.handle((stamp, "controlnet", str(dtype)), description,
                              lambda: _build_from_file(path, dtype), _size(weights, dtype),
                              family=(stamp[0], "controlnet"))
    log.info("%s: %s ControlNet%s", name, family, " (diff)" if is_diff else "")
    return ControlNet(handle, config, family, dtype, global_average_pooling=_shuffle_name(path))


def _shuffle_name(path: str) -> bool:
    # ComfyUI's rule: the "shuffle" ControlNet averages its residuals over the image; only its file name tells.
    stem = os.path.splitext(path)[0]
    return stem.endswith(("_shuffle", "_shuffle_fp16"))


def _read(path: str) -> tuple[dict[str, torch.Tensor], ControlNetConfig]:
    weights, _ = read_controlnet_weights(open_state_dict(path))
    return weights, controlnet_config(weights)[0]


def _build_from_file(path: str, dtype) -> ControlNetModel:
    weights, config = _read(path)
    return _build(weights, config, dtype)


def _build_diff(path: str, model, dtype) -> ControlNetModel:
    weights, config = _read(path)
    unet = model.network().state_dict()
    summed = {}
    for key, tensor in weights.items():
        base = unet.get(key)
        if base is not None and base.shape == tensor.shape:
            summed[key] = (tensor.float() + base.float()).to(dtype)
        else:
            summed[key] = tensor
    return _build(summed, config, dtype)
