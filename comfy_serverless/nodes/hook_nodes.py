"""ComfyUI's hook nodes (comfy_extras.nodes_hooks, advanced/hooks): LoRAs and model-as-LoRA weights carried by
conditioning entries or a CLIP, with strength keyframes over the sampling progress (models/hooks.py).

Standard library only at module level.
"""

from __future__ import annotations

import logging

from .. import paths
from .loaders import model_file

log = logging.getLogger(__name__)

_STRENGTH = {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.001}


def _group(prev_hooks):
    from ..models.hooks import HookGroup

    return prev_hooks.clone() if prev_hooks is not None else HookGroup()


class CreateHookLora:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (paths.current().list_models("loras"),),
                             "strength_model": ("FLOAT", dict(_STRENGTH)),
                             "strength_clip": ("FLOAT", dict(_STRENGTH))},
                "optional": {"prev_hooks": ("HOOKS",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOKS",)
    CATEGORY = "advanced/hooks/create"
    FUNCTION = "create_hook"

    def create_hook(self, lora_name, strength_model, strength_clip, prev_hooks=None):
        from ..models.hooks import LoraSource, WeightHook

        group = _group(prev_hooks)
        if strength_model == 0 and strength_clip == 0:
            return (group,)
        group.add(WeightHook(LoraSource(model_file("loras", lora_name)), strength_model, strength_clip))
        return (group,)


class CreateHookLoraModelOnly(CreateHookLora):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (paths.current().list_models("loras"),),
                             "strength_model": ("FLOAT", dict(_STRENGTH))},
                "optional": {"prev_hooks": ("HOOKS",)}}

    FUNCTION = "create_hook_model_only"

    def create_hook_model_only(self, lora_name, strength_model, prev_hooks=None):
        return self.create_hook(lora_name, strength_model, 0.0, prev_hooks)


class CreateHookModelAsLora:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (paths.current().list_models("checkpoints"),),
                             "strength_model": ("FLOAT", dict(_STRENGTH)),
                             "strength_clip": ("FLOAT", dict(_STRENGTH))},
                "optional": {"prev_hooks": ("HOOKS",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOKS",)
    CATEGORY = "advanced/hooks/create"
    FUNCTION = "create_hook"

    def create_hook(self, ckpt_name, strength_model, strength_clip, prev_hooks=None, with_clip=True):
        from ..models.hooks import ModelSource, WeightHook
        from ..models.loading import load_checkpoint

        group = _group(prev_hooks)
        model, clip = load_checkpoint(model_file("checkpoints", ckpt_name), want_clip=with_clip, want_vae=False)[:2]
        group.add(WeightHook(ModelSource(ckpt_name, model, clip), strength_model, strength_clip))
        return (group,)


class CreateHookModelAsLoraModelOnly(CreateHookModelAsLora):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (paths.current().list_models("checkpoints"),),
                             "strength_model": ("FLOAT", dict(_STRENGTH))},
                "optional": {"prev_hooks": ("HOOKS",)}}

    FUNCTION = "create_hook_model_only"

    def create_hook_model_only(self, ckpt_name, strength_model, prev_hooks=None):
        return self.create_hook(ckpt_name, strength_model, 0.0, prev_hooks, with_clip=False)


class SetHookKeyframes:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hooks": ("HOOKS",)}, "optional": {"hook_kf": ("HOOK_KEYFRAMES",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOKS",)
    CATEGORY = "advanced/hooks/scheduling"
    FUNCTION = "set_hook_keyframes"

    def set_hook_keyframes(self, hooks, hook_kf=None):
        if hook_kf is not None:
            hooks = hooks.clone()
            hooks.set_keyframes_on_hooks(hook_kf)
        return (hooks,)


def _keyframes(prev_hook_kf):
    from ..models.hooks import HookKeyframeGroup

    return prev_hook_kf.clone() if prev_hook_kf is not None else HookKeyframeGroup()


class CreateHookKeyframe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"strength_mult": ("FLOAT", dict(_STRENGTH)),
                             "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT})},
                "optional": {"prev_hook_kf": ("HOOK_KEYFRAMES",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOK_KEYFRAMES",)
    RETURN_NAMES = ("HOOK_KF",)
    CATEGORY = "advanced/hooks/scheduling"
    FUNCTION = "create_hook_keyframe"

    def create_hook_keyframe(self, strength_mult, start_percent, prev_hook_kf=None):
        from ..models.hooks import HookKeyframe

        group = _keyframes(prev_hook_kf)
        group.add(HookKeyframe(float(strength_mult), float(start_percent)))
        return (group,)


def _add_series(group, percents, strengths, print_keyframes: bool):
    """Keyframes at `percents`; only the first guarantees a step (ComfyUI's interpolated series)."""
    from ..models.hooks import HookKeyframe

    for index, (percent, strength) in enumerate(zip(percents, strengths)):
        group.add(HookKeyframe(float(strength), float(percent), 1 if index == 0 else 0))
        if print_keyframes:
            log.info("Hook Keyframe - start_percent:%s = %s", percent, strength)
    return group


class CreateHookKeyframesInterpolated:
    @classmethod
    def INPUT_TYPES(cls):
        from_zero = {"min": 0.0, "max": 10.0, "step": 0.001}
        return {"required": {"strength_start": ("FLOAT", {"default": 1.0, **from_zero}),
                             "strength_end": ("FLOAT", {"default": 1.0, **from_zero}),
                             "interpolation": (["linear", "ease_in", "ease_out", "ease_in_out"],),
                             "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT}),
                             "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT}),
                             "keyframes_count": ("INT", {"default": 5, "min": 2, "max": 100, "step": 1}),
                             "print_keyframes": ("BOOLEAN", {"default": False})},
                "optional": {"prev_hook_kf": ("HOOK_KEYFRAMES",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOK_KEYFRAMES",)
    RETURN_NAMES = ("HOOK_KF",)
    CATEGORY = "advanced/hooks/scheduling"
    FUNCTION = "create_hook_keyframes"

    def create_hook_keyframes(self, strength_start, strength_end, interpolation, start_percent, end_percent,
                              keyframes_count, print_keyframes=False, prev_hook_kf=None):
        from ..models.hooks import interpolated

        percents = interpolated(start_percent, end_percent, keyframes_count, "linear")
        strengths = interpolated(strength_start, strength_end, keyframes_count, interpolation)
        return (_add_series(_keyframes(prev_hook_kf), percents, strengths, print_keyframes),)


class CreateHookKeyframesFromFloats:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"floats_strength": ("FLOATS", {"default": -1, "min": -1, "step": 0.001,
                                                            "forceInput": True}),
                             "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT}),
                             "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT}),
                             "print_keyframes": ("BOOLEAN", {"default": False})},
                "optional": {"prev_hook_kf": ("HOOK_KEYFRAMES",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOK_KEYFRAMES",)
    RETURN_NAMES = ("HOOK_KF",)
    CATEGORY = "advanced/hooks/scheduling"
    FUNCTION = "create_hook_keyframes"

    def create_hook_keyframes(self, floats_strength, start_percent, end_percent, prev_hook_kf=None,
                              print_keyframes=False):
        from ..models.hooks import interpolated

        if isinstance(floats_strength, (int, float)):
            floats_strength = [float(floats_strength)]
        elif hasattr(floats_strength, "tolist"):
            floats_strength = floats_strength.reshape(-1).tolist() if hasattr(floats_strength, "reshape") \
                else list(floats_strength.tolist())
        try:
            floats = [float(v) for v in floats_strength]
        except (TypeError, ValueError) as error:
            raise TypeError(f"floats_strength must be a float or a list of floats, got "
                            f"{type(floats_strength).__name__}") from error
        if not floats:
            raise ValueError("floats_strength is empty: give at least one strength")
        percents = interpolated(start_percent, end_percent, len(floats), "linear")
        return (_add_series(_keyframes(prev_hook_kf), percents, floats, print_keyframes),)


def _combine(*groups):
    from ..models.hooks import HookGroup

    return (HookGroup.combine_all_hooks(groups),)


class CombineHooks:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {f"hooks_{letter}": ("HOOKS",) for letter in "AB"}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("HOOKS",)
    CATEGORY = "advanced/hooks/combine"
    FUNCTION = "combine_hooks"

    def combine_hooks(self, **hooks):
        return _combine(*(hooks.get(f"hooks_{letter}") for letter in "ABCDEFGH"))


class CombineHooksFour(CombineHooks):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {f"hooks_{letter}": ("HOOKS",) for letter in "ABCD"}}


class CombineHooksEight(CombineHooks):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {f"hooks_{letter}": ("HOOKS",) for letter in "ABCDEFGH"}}


class SetClipHooks:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "apply_to_conds": ("BOOLEAN", {"default": True}),
                             "schedule_clip": ("BOOLEAN", {"default": False})},
                "optional": {"hooks": ("HOOKS",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CLIP",)
    CATEGORY = "advanced/hooks/clip"
    FUNCTION = "apply_hooks"

    def apply_hooks(self, clip, apply_to_conds, schedule_clip, hooks=None):
        from dataclasses import replace

        if hooks is None:
            return (clip,)
        forced = hooks.clone()
        if not schedule_clip:
            forced.set_keyframes_on_hooks(None)
        for_conds = hooks if apply_to_conds else clip.hooks_for_conds
        return (replace(clip, hooks=forced, hooks_for_conds=for_conds, schedule_clip=bool(schedule_clip)),)


class ConditioningTimestepsRange:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"start_percent": ("FLOAT", {"default": 0.0, **_PERCENT}),
                             "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT})}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("TIMESTEPS_RANGE", "TIMESTEPS_RANGE", "TIMESTEPS_RANGE")
    RETURN_NAMES = ("TIMESTEPS_RANGE", "BEFORE_RANGE", "AFTER_RANGE")
    CATEGORY = "advanced/hooks"
    FUNCTION = "create_range"

    def create_range(self, start_percent, end_percent):
        return ((start_percent, end_percent), (0.0, start_percent), (end_percent, 1.0))


from .hook_conditioning import (  # noqa: E402  (the conditioning nodes live next door)
    ConditioningSetDefaultAndCombine,
    ConditioningSetProperties,
    ConditioningSetPropertiesAndCombine,
    PairConditioningCombine,
    PairConditioningSetDefaultAndCombine,
    PairConditioningSetProperties,
    PairConditioningSetPropertiesAndCombine,
)

NODE_CLASS_MAPPINGS = {
    "CreateHookLora": CreateHookLora,
    "CreateHookLoraModelOnly": CreateHookLoraModelOnly,
    "CreateHookModelAsLora": CreateHookModelAsLora,
    "CreateHookModelAsLoraModelOnly": CreateHookModelAsLoraModelOnly,
    "SetHookKeyframes": SetHookKeyframes,
    "CreateHookKeyframe": CreateHookKeyframe,
    "CreateHookKeyframesInterpolated": CreateHookKeyframesInterpolated,
    "CreateHookKeyframesFromFloats": CreateHookKeyframesFromFloats,
    "CombineHooks2": CombineHooks,
    "CombineHooks4": CombineHooksFour,
    "CombineHooks8": CombineHooksEight,
    "SetClipHooks": SetClipHooks,
    "ConditioningSetProperties": ConditioningSetProperties,
    "ConditioningSetPropertiesAndCombine": ConditioningSetPropertiesAndCombine,
    "ConditioningSetDefaultCombine": ConditioningSetDefaultAndCombine,
    "PairConditioningSetProperties": PairConditioningSetProperties,
    "PairConditioningSetPropertiesAndCombine": PairConditioningSetPropertiesAndCombine,
    "PairConditioningSetDefaultCombine": PairConditioningSetDefaultAndCombine,
    "PairConditioningCombine": PairConditioningCombine,
    "ConditioningTimestepsRange": ConditioningTimestepsRange,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CreateHookLora": "Create Hook LoRA",
    "CreateHookLoraModelOnly": "Create Hook LoRA (MO)",
    "CreateHookModelAsLora": "Create Hook Model as LoRA",
    "CreateHookModelAsLoraModelOnly": "Create Hook Model as LoRA (MO)",
    "SetHookKeyframes": "Set Hook Keyframes",
    "CreateHookKeyframe": "Create Hook Keyframe",
    "CreateHookKeyframesInterpolated": "Create Hook Keyframes Interp.",
    "CreateHookKeyframesFromFloats": "Create Hook Keyframes From Floats",
    "CombineHooks2": "Combine Hooks [2]",
    "CombineHooks4": "Combine Hooks [4]",
    "CombineHooks8": "Combine Hooks [8]",
    "SetClipHooks": "Set CLIP Hooks",
    "ConditioningSetProperties": "Cond Set Props",
    "ConditioningSetPropertiesAndCombine": "Cond Set Props Combine",
    "ConditioningSetDefaultCombine": "Cond Set Default Combine",
    "PairConditioningSetProperties": "Cond Pair Set Props",
    "PairConditioningSetPropertiesAndCombine": "Cond Pair Set Props Combine",
    "PairConditioningSetDefaultCombine": "Cond Pair Set Default Combine",
    "PairConditioningCombine": "Cond Pair Combine",
    "ConditioningTimestepsRange": "Timesteps Range",
}
