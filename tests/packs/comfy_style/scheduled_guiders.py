"""Guiders the way Inspire-Pack's ScheduledCFGGuider / ScheduledPerpNegCFGGuider write them: subclasses of
comfy.samplers.CFGGuider and comfy_extras.nodes_perpneg.Guider_PerpNeg that override predict_noise to set
self.cfg per step from a table keyed by the step's sigma, then call super().predict_noise."""

import comfy.samplers
from comfy_extras.nodes_perpneg import Guider_PerpNeg


def _cfg_table(sigmas, from_cfg, to_cfg):
    steps = len(sigmas) - 1
    return {float(s): from_cfg + (to_cfg - from_cfg) * i / steps for i, s in enumerate(sigmas)}


class _Scheduled:
    def setup_schedule(self, sigmas, from_cfg, to_cfg):
        self.table = _cfg_table(sigmas, from_cfg, to_cfg)
        self.seen = []  # (sigma, cfg) per call, read back by ScheduledGuiderLog

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep[0])
        self.cfg = self.table.get(sigma, self.cfg)
        self.seen.append((round(sigma, 4), round(self.cfg, 4), seed))
        return super().predict_noise(x, timestep, model_options, seed)


class ScheduledCFG(_Scheduled, comfy.samplers.CFGGuider):
    def __init__(self, model, sigmas, from_cfg, to_cfg):
        super().__init__(model)
        self.setup_schedule(sigmas, from_cfg, to_cfg)


class ScheduledPerpNeg(_Scheduled, Guider_PerpNeg):
    def __init__(self, model, sigmas, from_cfg, to_cfg, neg_scale):
        super().__init__(model)
        self.neg_scale = neg_scale  # Inspire sets it directly, set_cfg is never called
        self.setup_schedule(sigmas, from_cfg, to_cfg)


_CFG = ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1})


class ScheduledCFGGuiderTrial:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "sigmas": ("SIGMAS",), "from_cfg": _CFG, "to_cfg": _CFG},
                "optional": {"empty": ("CONDITIONING",),
                             "neg_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "comfy_style"

    def get_guider(self, model, positive, negative, sigmas, from_cfg, to_cfg, empty=None, neg_scale=1.0):
        if empty is None:
            guider = ScheduledCFG(model, sigmas, from_cfg, to_cfg)
            guider.set_conds(positive, negative)
        else:
            guider = ScheduledPerpNeg(model, sigmas, from_cfg, to_cfg, neg_scale)
            guider.set_conds(positive, negative, empty)
        return (guider,)


class ScheduledGuiderLog:
    """What the guider saw, after sampling (the LATENT input orders it after the sampler); and whether a core
    guider is a comfy.samplers.CFGGuider / Guider_PerpNeg, as packs test with isinstance."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"guider": ("GUIDER",), "after": ("LATENT",)},
                "optional": {"core_guider": ("GUIDER",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "log"
    CATEGORY = "comfy_style"
    OUTPUT_NODE = True

    def log(self, guider, after, core_guider=None):
        text = ";".join(f"{sigma}:{cfg}:{seed}" for sigma, cfg, seed in guider.seen)
        if core_guider is not None:
            text += f"|cfg_guider={isinstance(core_guider, comfy.samplers.CFGGuider)}"
            text += f"|perp_neg={isinstance(core_guider, Guider_PerpNeg)}"
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"ScheduledCFGGuiderTrial": ScheduledCFGGuiderTrial, "ScheduledGuiderLog": ScheduledGuiderLog}


class _AnySlot(tuple):
    """Impact's / Inspire's ByPassTypeTuple: a node with a variable number of outputs answers item 0 for any slot."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)


class SplitNumbers:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 1, "max": 8})}}

    RETURN_TYPES = _AnySlot(("INT",))
    FUNCTION = "split"
    CATEGORY = "comfy_style"

    def split(self, count):
        return tuple(range(10, 10 + count))


NODE_CLASS_MAPPINGS["SplitNumbers"] = SplitNumbers
