"""Weight patches on shared networks (LoRAs, ComfyUI's add_patches): applied lazily, for whichever clone runs next.

Clones of a MODEL or CLIP share one network (a ModelHandle) and differ only in their patch lists. Before a
clone runs, `patched_module` makes the shared weights match its list: patches of another clone are undone
first (patched parameters are new tensors; the originals are put back). Running the same clone again costs
nothing. Patches apply in the order they were added, per parameter, in float32. A ComputeCast (a clone's compute
dtype) converts the patched network last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model_cache import ModelHandle


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One LoRA file's patches for one network, at one strength.

    `targets` maps a submodule of the network ("" for the network itself; "clip_l", "clip_h", "clip_g" for
    the encoders inside a text encoder) to models.lora's {parameter name: entries}.
    """

    name: str
    targets: dict
    strength: float


@dataclass(frozen=True, eq=False)
class KeyPatch:
    """ComfyUI's ModelPatcher.add_patches: per parameter, weight = weight * strength_model + strength_patch * value.

    `targets` maps a submodule ("" = the network) to {parameter name: (kind, tensor, strength_patch, strength_model)}
    where kind is "diff" (added), "set" (replaces the weight; strengths ignored), "scale" (tensor None: only
    times strength_model) or "model_as_lora" (the tensor is another model's weight; its difference from the
    unpatched weight is added, ComfyUI's model-as-LoRA hooks) or "lora" (the tensor is a LowRankPatch).
    """

    targets: dict


@dataclass(frozen=True, eq=False)
class LowRankPatch:
    """ComfyUI's "lora" weight patch (comfy.lora.load_lora): strength * (alpha / rank) * up @ [mid] @ down, or
    with `dora_scale` the DoRA weight; `transposed` when our parameter is stored transposed to ComfyUI's
    (CLIP's text_projection), so the patch applies to the parameter's transpose."""

    entry: object  # models.lora.LoraEntry
    dora_scale: object = None  # tensor or None
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return self.entry.up.dim() if self.entry.mid is None else self.entry.mid.dim()

    def t(self) -> LowRankPatch:
        return LowRankPatch(self.entry, self.dora_scale, not self.transposed)


@dataclass(frozen=True, eq=False)
class ComputeCast:
    """ComfyUI's set_model_compute_dtype: after a clone's other patches, its floating weights and buffers are
    converted to `dtype` (the shared network keeps its load dtype; undone like the other patches)."""

    dtype: object  # torch dtype
    network_dtype: object  # the dtype the network was loaded in, which a clone set back to "default" computes in
    targets: dict = field(default_factory=dict)  # none: code walking patches' targets skips it

    def __post_init__(self):
        if self.targets:
            raise ValueError("ComputeCast converts the whole network: it takes no targets")


def _same(applied: tuple, wanted: tuple) -> bool:
    return len(applied) == len(wanted) and all(a is w for a, w in zip(applied, wanted))


def patched_module(handle: ModelHandle, patches: tuple[LoraPatch, ...]):
    """The handle's network with exactly `patches` applied (loading the network if needed). Callers may add
    per-call patches (hooks) to a clone's own: an unchanged tuple of the same objects costs nothing."""
    module = handle.get()
    if _same(handle.state.get("lora", ()), patches):
        return module
    from . import lora

    for applied in reversed(handle.state.pop("lora_applied", [])):
        applied.undo()
    handle.state["lora"] = ()
    done = []
    casts = [patch for patch in patches if isinstance(patch, ComputeCast)]
    weights = [patch for patch in patches if not isinstance(patch, ComputeCast)]
    try:
        for target in dict.fromkeys(name for patch in weights for name in patch.targets):
            submodule = module.get_submodule(target)
            if all(isinstance(patch, LoraPatch) for patch in weights):
                stack = [(patch.targets.get(target, {}), patch.strength) for patch in weights]
                done.append(lora.apply_loras(submodule, stack))  # one patched copy per weight, however many LoRAs
            else:
                done.append(_apply_mixed(submodule, [(patch, patch.targets.get(target, {})) for patch in weights]))
        if casts:  # the last one wins, as ComfyUI's object patch; applied after the weight patches
            done.append(_cast_module(module, casts[-1].dtype))
    except BaseException:
        for applied in reversed(done):
            applied.undo()
        raise
    handle.state["lora_applied"] = done
    handle.state["lora"] = tuple(patches)
    return module


def _cast_module(module, dtype):
    """Every floating parameter and buffer of `module` not already in `dtype` replaced by a converted copy."""
    import torch
    from torch import nn

    from . import lora

    applied = lora.AppliedLora(module)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            converted = tensor.detach().to(dtype)
            if isinstance(tensor, nn.Parameter):
                converted = nn.Parameter(converted, requires_grad=False)
            owner_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner_name), leaf, converted)
            applied.originals[name] = tensor
            applied.patched[name] = converted
    return applied


def _apply_mixed(module, stack: list):
    """LoRA and key patches in order on one module: one patched copy per weight."""
    import torch
    from torch import nn

    from . import lora

    parameters = dict(module.named_parameters())
    applied = lora.AppliedLora(module)
    names = dict.fromkeys(name for _, entries in stack for name in entries)
    with torch.no_grad():
        for name in names:
            if name not in parameters:
                raise KeyError(f"patch for {name!r}, which {type(module).__name__} does not have")
            original = parameters[name]
            weight = original.detach().to(torch.float32, copy=True)
            for patch, entries in stack:
                if name not in entries:
                    continue
                if isinstance(patch, LoraPatch):
                    for entry in entries[name] if patch.strength else ():
                        weight += patch.strength * lora.lora_delta(entry, weight.shape).to(weight.device)
                    continue
                kind, value, strength_patch, strength_model = entries[name]
                if kind == "scale":
                    weight *= strength_model
                    continue
                if kind == "lora":
                    if strength_model != 1.0:
                        weight *= strength_model
                    _add_low_rank(weight.t() if value.transposed else weight, value, strength_patch, name)
                    continue
                value = value.to(device=weight.device, dtype=torch.float32)
                if kind == "set":
                    weight = value.reshape(weight.shape).clone()
                    continue
                if kind == "model_as_lora":
                    value = value.reshape(weight.shape) - original.detach().to(torch.float32)
                if strength_model != 1.0:
                    weight *= strength_model
                if value.shape != weight.shape:
                    if value.numel() != weight.numel():
                        raise ValueError(f"patch for {name!r} has shape {tuple(value.shape)}, the weight "
                                         f"{tuple(weight.shape)}")
                    value = value.reshape(weight.shape)
                weight += strength_patch * value
            patched = nn.Parameter(weight.to(original.dtype), requires_grad=False)
            owner_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner_name), leaf, patched)
            applied.originals[name] = original
            applied.patched[name] = patched
    return applied


def _add_low_rank(weight, patch: LowRankPatch, strength: float, name: str) -> None:
    """Adds a LowRankPatch to `weight` (float32, changed in place). DoRA as ComfyUI computes it: the patched
    weight is rescaled so that its norm per output row (dora_scale [out, 1...]) or per input column equals
    dora_scale; the row norm is taken of the weight before the update, the column norm after it."""
    import torch

    from . import lora

    try:
        delta = lora.lora_delta(patch.entry, weight.shape).to(weight.device)
    except RuntimeError as error:
        raise ValueError(f"LoRA patch for {name!r} does not fit the weight of shape {tuple(weight.shape)}") from error
    if patch.dora_scale is None:
        weight += strength * delta
        return
    scale = patch.dora_scale.to(device=weight.device, dtype=torch.float32)
    patched = weight + delta
    ones = [1] * (weight.dim() - 1)
    if scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
    else:
        columns = patched.transpose(0, 1)
        norm = columns.reshape(columns.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(columns.shape[0], *ones).transpose(0, 1)
    patched *= scale / (norm + torch.finfo(torch.float32).eps)
    if strength != 1.0:
        weight += strength * (patched - weight)
    else:
        weight.copy_(patched)
