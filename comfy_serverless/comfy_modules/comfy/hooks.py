"""ComfyUI's `comfy.hooks` as far as this server has it (comfy_serverless/models/hooks.py): HookGroup,
HookKeyframe, HookKeyframeGroup, WeightHook and the conditioning helpers. Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.models.hooks import HookGroup, HookKeyframe, HookKeyframeGroup, WeightHook
from comfy_serverless.nodes.hook_conditioning import set_default, set_properties


def set_hooks_for_conditioning(cond, hooks, append_hooks=True, cache=None):
    """Entries with `hooks` added after theirs (append_hooks) or instead of them."""
    if hooks is None:
        return cond
    if not append_hooks:
        return [[tensor, {**options, "hooks": hooks}] for tensor, options in cond]
    return set_properties(cond, 1.0, "default", hooks=hooks)


def set_conds_props(conds, strength, set_cond_area, mask=None, hooks=None, timesteps_range=None,
                    append_hooks=True):
    return [set_properties(c, strength, set_cond_area, mask, hooks, timesteps_range) for c in conds]


def set_conds_props_and_combine(conds, new_conds, strength=1.0, set_cond_area="default", mask=None, hooks=None,
                                timesteps_range=None, append_hooks=True):
    return [list(c) + set_properties(n, strength, set_cond_area, mask, hooks, timesteps_range)
            for c, n in zip(conds, new_conds)]


def set_default_conds_and_combine(conds, new_conds, hooks=None, timesteps_range=None, append_hooks=True):
    out = []
    for c, n in zip(conds, new_conds):
        n = set_default(n, hooks)
        if timesteps_range is not None:
            n = set_properties(n, 1.0, "default", timesteps=timesteps_range)
        out.append(list(c) + n)
    return out


__all__ = ["HookGroup", "HookKeyframe", "HookKeyframeGroup", "WeightHook", "set_hooks_for_conditioning",
           "set_conds_props", "set_conds_props_and_combine", "set_default_conds_and_combine"]


def __getattr__(name: str):
    return missing_attribute(__name__, name)
