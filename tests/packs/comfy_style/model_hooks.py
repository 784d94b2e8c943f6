"""A pack that patches guidance the way RescaleCFG-style packs do: clone the MODEL, set a cfg function."""


class ScaledGuidance:
    """Classifier-free guidance written as a cfg function, at `factor` times the sampler's scale.

    ComfyUI's cfg function args hold x - prediction ("cond", "uncond") and the function returns x - result.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "comfy_style"

    def patch(self, model, factor):
        def guidance(args):
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"] * factor

        patched = model.clone()
        patched.set_model_sampler_cfg_function(guidance)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ScaledGuidance": ScaledGuidance}
