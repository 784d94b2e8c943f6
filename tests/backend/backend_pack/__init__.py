"""A node pack written against ComfyUI's own module names, loaded only by the backend (the stand-in in CI, a
real ComfyUI in the hand check): the front does not have these nodes, so prompts using them go to the backend."""

import time

import comfy.model_management
import comfy.utils
from server import PromptServer


class BackendTriple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0, "min": -1000.0, "max": 1000.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "backend test"

    def run(self, value):
        return (value * 3,)


class BackendShow:
    """Output node: its UI shows the value and the process that computed it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "backend test"

    def run(self, value):
        import os

        PromptServer.instance.send_sync("backend_pack.shown", {"value": value}, PromptServer.instance.client_id)
        return {"ui": {"values": [value], "pid": [os.getpid()]}}


class BackendSteps:
    """Progress every step, a JPEG preview with each (like a sampler), stops between steps on /interrupt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
                             "step_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0}),
                             "preview": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "backend test"

    def run(self, value, steps, step_seconds, preview):
        bar = comfy.utils.ProgressBar(steps)
        for step in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(step_seconds)
            image = None
            if preview:
                from PIL import Image

                image = ("JPEG", Image.new("RGB", (64, 32), (0, 0, 255)), 512)
            bar.update_absolute(step + 1, steps, image)
        return (value,)


class BackendFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "backend test"

    def run(self, value):
        raise ValueError(f"backend node refused {value}")


NODE_CLASS_MAPPINGS = {"BackendTriple": BackendTriple, "BackendShow": BackendShow, "BackendSteps": BackendSteps,
                       "BackendFail": BackendFail}
