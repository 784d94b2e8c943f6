"""ComfyUI's `comfy_extras.nodes_compositing`: PorterDuffImageComposite, SplitImageWithAlpha and
JoinImageWithAlpha; the module's helpers (porter_duff_composite, PorterDuffMode) are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.mask_ops import JoinImageWithAlpha, PorterDuffImageComposite, SplitImageWithAlpha

NODE_CLASS_MAPPINGS = {
    "PorterDuffImageComposite": PorterDuffImageComposite,
    "SplitImageWithAlpha": SplitImageWithAlpha,
    "JoinImageWithAlpha": JoinImageWithAlpha,
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
