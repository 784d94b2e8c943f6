"""ComfyUI's `comfy_extras.nodes_webcam`: WebcamCapture (comfy_serverless/nodes/webcam.py).
Other names are placeholders."""

from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.nodes.webcam import WebcamCapture

NODE_CLASS_MAPPINGS = {
    "WebcamCapture": WebcamCapture,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WebcamCapture": "Webcam Capture",
}


def __getattr__(name: str):
    return missing_attribute(__name__, name)
