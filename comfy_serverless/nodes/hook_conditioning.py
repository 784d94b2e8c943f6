"""The conditioning half of ComfyUI's hook nodes (advanced/hooks/cond single, cond pair): put hooks, a mask (with
its strength and set_cond_area), a timestep range or the "default" flag on conditioning entries, and combine
lists. Registered through hook_nodes.py. Standard library only at module level.

As in ComfyUI, `strength` applies only with a mask (as its mask_strength), and hooks already on an entry are
kept, the new ones added after them.
"""

from __future__ import annotations

_PROP_STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
_AREA = (["default", "mask bounds"],)
_PROPS_OPTIONAL = {"mask": ("MASK",), "hooks": ("HOOKS",), "timesteps": ("TIMESTEPS_RANGE",)}


def _with_values(conditioning, hooks=None, **values) -> list:
    """A copy of the entries with `values` set and `hooks` appended to theirs (one combined group per distinct
    existing group, so entries that shared hooks still share them)."""
    combined = {}
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        options.update(values)
        if hooks is not None:
            existing = options.get("hooks")
            if existing is None:
                options["hooks"] = hooks
            else:
                if id(existing) not in combined:
                    combined[id(existing)] = existing.clone_and_combine(hooks)
                options["hooks"] = combined[id(existing)]
        out.append([tensor, options])
    return out


def set_properties(conditioning, strength, set_cond_area, mask=None, hooks=None, timesteps=None) -> list:
    values = {}
    if mask is not None:
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        values.update(mask=mask, set_area_to_bounds=set_cond_area != "default", mask_strength=strength)
    if timesteps is not None:
        values.update(start_percent=timesteps[0], end_percent=timesteps[1])
    return _with_values(conditioning, hooks, **values)


def set_default(conditioning, hooks=None) -> list:
    return _with_values(conditioning, hooks, default=True)


class ConditioningSetProperties:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cond_NEW": ("CONDITIONING",), "strength": _PROP_STRENGTH, "set_cond_area": _AREA},
                "optional": dict(_PROPS_OPTIONAL)}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/hooks/cond single"
    FUNCTION = "set_properties"

    def set_properties(self, cond_NEW, strength, set_cond_area, mask=None, hooks=None, timesteps=None):
        return (set_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps),)


class ConditioningSetPropertiesAndCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cond": ("CONDITIONING",), "cond_NEW": ("CONDITIONING",), "strength": _PROP_STRENGTH,
                             "set_cond_area": _AREA},
                "optional": dict(_PROPS_OPTIONAL)}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/hooks/cond single"
    FUNCTION = "set_properties"

    def set_properties(self, cond, cond_NEW, strength, set_cond_area, mask=None, hooks=None, timesteps=None):
        return (list(cond) + set_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps),)


class ConditioningSetDefaultAndCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cond": ("CONDITIONING",), "cond_DEFAULT": ("CONDITIONING",)},
                "optional": {"hooks": ("HOOKS",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/hooks/cond single"
    FUNCTION = "set_default_and_combine"

    def set_default_and_combine(self, cond, cond_DEFAULT, hooks=None):
        return (list(cond) + set_default(cond_DEFAULT, hooks),)


class PairConditioningSetProperties:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive_NEW": ("CONDITIONING",), "negative_NEW": ("CONDITIONING",),
                             "strength": _PROP_STRENGTH, "set_cond_area": _AREA},
                "optional": dict(_PROPS_OPTIONAL)}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    CATEGORY = "advanced/hooks/cond pair"
    FUNCTION = "set_properties"

    def set_properties(self, positive_NEW, negative_NEW, strength, set_cond_area, mask=None, hooks=None,
                       timesteps=None):
        return tuple(set_properties(c, strength, set_cond_area, mask, hooks, timesteps)
                     for c in (positive_NEW, negative_NEW))


class PairConditioningSetPropertiesAndCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "positive_NEW": ("CONDITIONING",), "negative_NEW": ("CONDITIONING",),
                             "strength": _PROP_STRENGTH, "set_cond_area": _AREA},
                "optional": dict(_PROPS_OPTIONAL)}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    CATEGORY = "advanced/hooks/cond pair"
    FUNCTION = "set_properties"

    def set_properties(self, positive, negative, positive_NEW, negative_NEW, strength, set_cond_area, mask=None,
                       hooks=None, timesteps=None):
        return tuple(list(old) + set_properties(new, strength, set_cond_area, mask, hooks, timesteps)
                     for old, new in ((positive, positive_NEW), (negative, negative_NEW)))


class PairConditioningSetDefaultAndCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "positive_DEFAULT": ("CONDITIONING",), "negative_DEFAULT": ("CONDITIONING",)},
                "optional": {"hooks": ("HOOKS",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    CATEGORY = "advanced/hooks/cond pair"
    FUNCTION = "set_default_and_combine"

    def set_default_and_combine(self, positive, negative, positive_DEFAULT, negative_DEFAULT, hooks=None):
        return (list(positive) + set_default(positive_DEFAULT, hooks),
                list(negative) + set_default(negative_DEFAULT, hooks))


class PairConditioningCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive_A": ("CONDITIONING",), "negative_A": ("CONDITIONING",),
                             "positive_B": ("CONDITIONING",), "negative_B": ("CONDITIONING",)}}

    EXPERIMENTAL = True
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    CATEGORY = "advanced/hooks/cond pair"
    FUNCTION = "combine"

    def combine(self, positive_A, negative_A, positive_B, negative_B):
        return list(positive_A) + list(positive_B), list(negative_A) + list(negative_B)
