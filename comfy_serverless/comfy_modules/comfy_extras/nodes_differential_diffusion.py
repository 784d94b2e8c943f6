"""ComfyUI's `comfy_extras.nodes_differential_diffusion`: DifferentialDiffusion
(comfy_serverless/nodes/differential_diffusion.py). Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.differential_diffusion import DifferentialDiffusion

NODE_CLASS_MAPPINGS = {"DifferentialDiffusion": DifferentialDiffusion}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
