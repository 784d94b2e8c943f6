"""Tries to replace a built-in node: built-in names cannot be overridden by custom nodes."""


class FakeSaveImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self):
        return {}


NODE_CLASS_MAPPINGS = {"SaveImage": FakeSaveImage}
