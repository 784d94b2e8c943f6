"""ControlNet and T2I-Adapter loaders and the nodes that apply them to conditioning.

ControlNetLoader reads ControlNets (SD1.x, SD2.x, SDXL; original or diffusers layout) and T2I-Adapters from
models/controlnet; DiffControlNetLoader reads ControlNets stored as a difference to a model's UNet. The apply
nodes put a copy of the control, holding the hint image, into each conditioning entry (options["control"]),
chained to the control already there; the sampler runs it with the UNet.

Standard library only at module level (see nodes/__init__.py)."""

from __future__ import annotations

import logging

from .. import paths

log = logging.getLogger(__name__)

# Union ControlNet (ControlNet++) control types, by the index the network was trained with.
UNION_CONTROLNET_TYPES = {"openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2,
                          "canny/lineart/anime_lineart/mlsd": 3, "normal": 4, "segment": 5, "tile": 6, "repaint": 7}


def _controlnet_file(name: str) -> str:
    path = paths.current().model_path("controlnet", name)
    if path is None:
        raise FileNotFoundError(f"{name!r} not found in models/controlnet")
    return path


class ControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": (paths.current().list_models("controlnet"),)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a ControlNet (SD1.x, SD2.x, SDXL) or a T2I-Adapter from models/controlnet."

    def load_controlnet(self, control_net_name):
        from ..models.controlnets import load_controlnet

        return (load_controlnet(_controlnet_file(control_net_name)),)


class DiffControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "control_net_name": (paths.current().list_models("controlnet"),)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a ControlNet stored as a difference to the model's UNet (other ControlNets load as usual)."

    def load_controlnet(self, model, control_net_name):
        from ..models.controlnets import load_controlnet

        return (load_controlnet(_controlnet_file(control_net_name), model),)


def _check_image(image) -> None:
    if getattr(image, "ndim", 0) != 4:
        raise ValueError(f"the ControlNet hint must be an IMAGE [batch, height, width, channels], got shape "
                         f"{tuple(getattr(image, 'shape', ()))}")


class ControlNetApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "control_net": ("CONTROL_NET",),
            "image": ("IMAGE",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"
    DEPRECATED = True

    def apply_controlnet(self, conditioning, control_net, image, strength):
        if strength == 0:
            return (conditioning,)
        _check_image(image)
        hint = image.movedim(-1, 1)
        out = []
        for tensor, options in conditioning:
            options = dict(options)
            control = control_net.copy().set_cond_hint(hint, strength)
            if "control" in options:
                control.set_previous_controlnet(options["control"])
            options["control"] = control
            # The old node also guides the negative side (ComfyUI copies it to entries without a control).
            options["control_apply_to_uncond"] = True
            out.append([tensor, options])
        return (out,)


class ControlNetApplyAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            "optional": {"vae": ("VAE",)},
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"

    def apply_controlnet(self, positive, negative, control_net, image, strength, start_percent, end_percent,
                         vae=None, extra_concat=()):
        if strength == 0:
            return (positive, negative)
        _check_image(image)
        hint = image.movedim(-1, 1)
        # One control per previous control, shared by both sides: entries with the same control batch together.
        made: dict[int, object] = {}
        out = []
        for conditioning in (positive, negative):
            entries = []
            for tensor, options in conditioning:
                options = dict(options)
                previous = options.get("control")
                control = made.get(id(previous))
                if control is None:
                    control = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent), vae=vae,
                                                               extra_concat=extra_concat)
                    control.set_previous_controlnet(previous)
                    made[id(previous)] = control
                options["control"] = control
                options["control_apply_to_uncond"] = False
                entries.append([tensor, options])
            out.append(entries)
        return (out[0], out[1])


class SetUnionControlNetType:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net": ("CONTROL_NET",),
                             "type": (["auto", *UNION_CONTROLNET_TYPES],)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "set_controlnet_type"
    CATEGORY = "conditioning/controlnet"
    DESCRIPTION = "Tells a union ControlNet (ControlNet++) what kind of hint it gets; auto lets it guess."

    def set_controlnet_type(self, control_net, type):
        control_net = control_net.copy()
        config = getattr(control_net, "config", None)
        if not getattr(config, "union_types", 0):
            # ComfyUI passes the type to any ControlNet and the others ignore it; say so instead of silence.
            log.warning("SetUnionControlNetType: this is not a union ControlNet, the type has no effect")
        index = UNION_CONTROLNET_TYPES.get(type)
        control_net.set_extra_arg("control_type", [] if index is None else [index])
        return (control_net,)


NODE_CLASS_MAPPINGS = {
    "ControlNetLoader": ControlNetLoader,
    "DiffControlNetLoader": DiffControlNetLoader,
    "ControlNetApply": ControlNetApply,
    "ControlNetApplyAdvanced": ControlNetApplyAdvanced,
    "SetUnionControlNetType": SetUnionControlNetType,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ControlNetLoader": "Load ControlNet Model",
    "DiffControlNetLoader": "Load ControlNet Model (diff)",
    "ControlNetApply": "Apply ControlNet (OLD)",
    "ControlNetApplyAdvanced": "Apply ControlNet",
}
