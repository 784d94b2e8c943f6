"""A pack that patches guidance the way RescaleCFG-style packs do: clone the MODEL, set a cfg function."""


class ScaledNoisePrediction:
    """Guidance by the positive prompt alone, its noise prediction scaled by `factor`.

    ComfyUI's cfg function args hold x - prediction ("cond", "uncond") and the function returns x - result, so
    factor 1 is exactly the positive prediction (plain sampling at cfg 1) and factor 0.5 keeps half the noise.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "comfy_style"

    def patch(self, model, factor):
        patched = model.clone()
        patched.set_model_sampler_cfg_function(lambda args: args["cond"] * factor)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ScaledNoisePrediction": ScaledNoisePrediction}
