"""ComfyUI's `comfy_extras.nodes_align_your_steps`: AlignYourStepsScheduler (comfy_serverless/nodes/
custom_sampling_schedulers.py), which packs call for AYS sigmas (efficiency-nodes' "AYS SD1" schedulers).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.custom_sampling_schedulers import AlignYourStepsScheduler

NODE_CLASS_MAPPINGS = {"AlignYourStepsScheduler": AlignYourStepsScheduler}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
