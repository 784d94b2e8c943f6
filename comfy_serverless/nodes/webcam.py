"""WebcamCapture: ComfyUI's LoadImage for its webcam widget. The browser captures a frame and uploads it like
any input image; the prompt names that file. width and height only size the capture in ComfyUI's frontend: the
server loads the file as it is (as ComfyUI does), and capture_on_queue is a frontend setting too.
"""

from __future__ import annotations

from .image_files import LoadImage


class WebcamCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("WEBCAM", {}),
            "width": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 1}),
            "height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 1}),
            "capture_on_queue": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "load_capture"
    CATEGORY = "image"

    def load_capture(self, image, width=0, height=0, capture_on_queue=True):
        return (LoadImage().load_image(image)[0],)

    @classmethod
    def IS_CHANGED(cls, image, width=0, height=0, capture_on_queue=True):
        return LoadImage.IS_CHANGED(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):  # only `image`, as LoadImage's: width and height keep their range checks
        return LoadImage.VALIDATE_INPUTS(image)


NODE_CLASS_MAPPINGS = {"WebcamCapture": WebcamCapture}
NODE_DISPLAY_NAME_MAPPINGS = {"WebcamCapture": "Webcam Capture"}
