"""A pack added after the catalogue snapshot was built (tests the fingerprint and background rebuild)."""


class NewNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hello"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, text):
        return (text,)


NODE_CLASS_MAPPINGS = {"NewNode": NewNode}
