"""ComfyUI's `comfy.lora` for custom node packs (LoRA managers, LoRA stacks, block-weight loaders).

Packs call it in three steps: `model_lora_keys_unet(model.model, {})` / `model_lora_keys_clip(clip.cond_stage_model,
{})` map every name a LoRA file may use for a module onto a weight key under ComfyUI's names; `load_lora(sd, key_map)`
turns the file's tensors into patches {weight key: ("lora", (up, down, alpha, mid, dora_scale, reshape)) |
("diff", (tensor,)) | ("set", (tensor,))}; `model.add_patches(patches, strength)` (or `clip.add_patches`) applies them
(models/patcher_api.py, models/patching.py). The names come from models/lora.py's alias tables, so a file maps here
exactly as LoraLoader maps it. LoHa, LoKr, GLoRA and OFT entries are not read: their keys are logged as not loaded.
"""

from __future__ import annotations

import logging

from comfy_serverless.catalog.comfy_modules import missing_attribute

UNET_PREFIX = "diffusion_model."
ENCODERS = ("clip_l", "clip_h", "clip_g")
TEXT_MODEL = ".transformer.text_model."
# The LoRA-able projections of a CLIP layer, as transformers names them, and their kohya (flattened) names.
CLIP_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "mlp.fc1", "mlp.fc2")
LORA_CLIP_MAP = {part: part.replace(".", "_") for part in CLIP_LAYER_PARTS}

# (up, down) key suffixes of the low-rank layouts a module name may carry (kohya, old diffusers, PEFT, ...).
_LOW_RANK_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"), (".lora_B", ".lora_A"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _unet_network(model):
    """Our UNet behind what a pack passes: ComfyUI's BaseModel face (`model.model`), the MODEL itself, or the UNet."""
    from torch import nn

    patcher = getattr(model, "patcher", None) or model
    if hasattr(patcher, "handle") and hasattr(patcher, "network"):
        return patcher.handle.get()
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    raise TypeError(f"model_lora_keys_unet takes a MODEL's .model (ComfyUI's BaseModel), not {type(model).__name__}")


def model_lora_keys_unet(model, key_map=None) -> dict:
    """{LoRA module name: "diffusion_model.<weight>"}: kohya names (lora_unet_ + LDM or diffusers names, flattened),
    plain "diffusion_model.<module>", diffusers names with and without "unet." (also the old
    ".processor.to_q" attention names) and SimpleTuner's "lycoris_" names. Adds to and returns `key_map`."""
    from comfy_serverless.models.lora import diffusers_unet_name

    key_map = {} if key_map is None else key_map
    unet = _unet_network(model)
    for name in unet.state_dict():
        key = UNET_PREFIX + name
        if not name.endswith(".weight"):
            key_map[key] = key
            continue
        module = name[: -len(".weight")]
        key_map["lora_unet_" + _flat(module)] = key
        key_map[UNET_PREFIX + module] = key
        diffusers = diffusers_unet_name(module, unet.config)
        if diffusers is None:
            continue
        key_map["lora_unet_" + _flat(diffusers)] = key
        key_map["lycoris_" + _flat(diffusers)] = key
        processor = diffusers.replace(".to_", ".processor.to_")
        if processor.endswith(".to_out.0"):
            processor = processor[:-2]
        for prefix in ("", "unet."):
            key_map[prefix + processor] = key
            key_map[prefix + diffusers] = key  # PEFT names, which LoraLoader also reads
    return key_map


def _clip_keys(model) -> list[str]:
    state_dict = getattr(model, "state_dict", None)
    if state_dict is None:
        raise TypeError("model_lora_keys_clip takes a CLIP's cond_stage_model (or anything with ComfyUI's CLIP "
                        f"state_dict), not {type(model).__name__}")
    return list(state_dict())


def model_lora_keys_clip(model, key_map=None) -> dict:
    """{LoRA module name: "<encoder>.transformer.text_model.<weight>"} for `clip.cond_stage_model`: "text_encoders."
    + any weight; per layer projection lora_te_ / lora_te1_ / text_encoder. (CLIP-L, or OpenCLIP-H), and for
    bigG lora_te2_ / text_encoder_2. beside a CLIP-L, else (refiner) lora_te_ / text_encoder. / lora_prior_te_.
    Adds to and returns `key_map`."""
    key_map = {} if key_map is None else key_map
    keys = _clip_keys(model)
    present = set(keys)
    for key in keys:
        if key.endswith(".weight"):
            key_map["text_encoders." + key[: -len(".weight")]] = key
    has_clip_l = any(key.startswith("clip_l" + TEXT_MODEL) for key in keys)
    if has_clip_l:
        g_prefixes = (("lora_te2_", True), ("text_encoder_2.", False))
    else:
        g_prefixes = (("lora_te_", True), ("text_encoder.", False), ("lora_prior_te_", True))
    prefixes = {"clip_l": (("lora_te_", True), ("lora_te1_", True), ("text_encoder.", False)),
                "clip_h": (("lora_te_", True), ("lora_te1_", True), ("text_encoder.", False)),
                "clip_g": g_prefixes}
    for key in keys:
        encoder, _, rest = key.partition(".")
        if encoder not in prefixes or not ("." + rest).startswith(TEXT_MODEL) or not key.endswith(".weight"):
            continue
        module = "text_model." + rest[len(TEXT_MODEL) - 1: -len(".weight")]
        if not module.startswith("text_model.encoder.layers.") or not module.endswith(CLIP_LAYER_PARTS):
            continue
        for prefix, flattened in prefixes[encoder]:
            key_map[prefix + (_flat(module) if flattened else module)] = key
    projections = {"clip_g": ("lora_prior_te_text_projection", "lora_te2_text_projection"),
                   "clip_l": ("lora_te1_text_projection",)}
    for encoder, names in projections.items():
        key = encoder + ".transformer.text_projection.weight"
        if key in present:
            for name in names:
                key_map[name] = key
    return key_map


def _scalar(tensor) -> float:
    return float(tensor.item())


def load_lora(lora: dict, to_load: dict, log_missing: bool = True) -> dict:
    """Patches {weight key: value} from the LoRA state dict `lora`, for every module name of `to_load` (a key map
    from model_lora_keys_unet / _clip) the file has entries for; every tensor of the file that no patch took is
    logged as "lora key not loaded" (unless log_missing is false)."""
    patches = {}
    loaded = set()
    for module, target in to_load.items():
        if not isinstance(target, str):
            raise NotImplementedError(f"lora key map entry {module!r}: only plain weight keys are supported here, "
                                      f"not {target!r}")
        extras = {}
        for role, suffix in (("alpha", ".alpha"), ("dora_scale", ".dora_scale"), ("reshape", ".reshape_weight")):
            if module + suffix in lora:
                extras[role] = lora[module + suffix]
                loaded.add(module + suffix)
        for up_suffix, down_suffix in _LOW_RANK_SUFFIXES:
            up_key, down_key = module + up_suffix, module + down_suffix
            if up_key in lora and down_key in lora:
                mid_key = module + ".lora_mid.weight"
                mid = lora.get(mid_key)
                loaded.update(k for k in (up_key, down_key, mid_key) if k in lora)
                alpha = extras.get("alpha")
                reshape = extras.get("reshape")
                patches[target] = ("lora", (lora[up_key], lora[down_key], None if alpha is None else _scalar(alpha),
                                            mid, extras.get("dora_scale"),
                                            None if reshape is None else reshape.tolist()))
                break
        bias = target[: -len(".weight")] + ".bias" if target.endswith(".weight") else None
        whole = ((".diff", "diff", target), (".set_weight", "set", target), (".w_norm", "diff", target),
                 (".diff_b", "diff", bias), (".b_norm", "diff", bias))
        for suffix, kind, key in whole:
            if module + suffix in lora and key is not None:
                patches[key] = (kind, (lora[module + suffix],))
                loaded.add(module + suffix)
    if log_missing:
        for key in lora:
            if key not in loaded:
                logging.warning("lora key not loaded: %s", key)
    return patches


def calculate_weight(patches, weight, key, intermediate_dtype=None, original_weights=None):
    """ComfyUI's weight arithmetic, as packs that patch weights themselves (GGUF loaders) call it: `patches` is
    ModelPatcher's list of (strength_patch, value, strength_model[, offset[, function]]) for `key`; `weight` is
    changed in place and returned. Values: diff, set and lora (as load_lora makes them)."""
    import torch

    from comfy_serverless.models.patcher_api import _patch_value
    from comfy_serverless.models.patching import _add_low_rank

    for patch in patches:
        strength, value, strength_model = patch[0], patch[1], patch[2]
        offset = patch[3] if len(patch) > 3 else None
        function = patch[4] if len(patch) > 4 else None
        if offset is not None:
            raise NotImplementedError(f"weight patch for {key} with an offset (part of a fused weight)")
        if strength_model != 1.0:
            weight *= strength_model
        kind, payload = _patch_value(key, value)
        if kind == "set":
            weight.copy_(payload.reshape(weight.shape))
        elif kind == "diff":
            if payload.numel() != weight.numel():
                raise ValueError(f"patch for {key} has shape {tuple(payload.shape)}, the weight {tuple(weight.shape)}")
            diff = strength * payload.to(device=weight.device, dtype=torch.float32).reshape(weight.shape)
            weight += (diff if function is None else function(diff)).to(weight.dtype)
        elif kind == "lora" and function is None:
            _add_low_rank(weight.t() if payload.transposed else weight, payload, strength, key)
        elif kind == "lora" and payload.dora_scale is None:
            from comfy_serverless.models.lora import lora_delta

            weight += function(strength * lora_delta(payload.entry, weight.shape).to(weight.device)).to(weight.dtype)
        elif kind != "scale":
            raise NotImplementedError(f"weight patch {kind!r} for {key} with a function (DoRA) is not supported here")
    return weight


def __getattr__(name: str):
    return missing_attribute(__name__, name)
