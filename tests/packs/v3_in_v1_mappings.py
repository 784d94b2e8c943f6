"""V3 classes listed in a V1 NODE_CLASS_MAPPINGS (next to a V1 class), imported through the pinned name
comfy_api.v0_0_2. The V3 schemas mirror a few of ComfyUI 0.3.64's own V3 nodes as its /object_info shows them
(tests/fixtures/comfyui_0.3.64_v3_object_info.json), so the test can compare the two entries."""

from comfy_api.v0_0_2 import io


class CaseConverterReplica(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3CaseConverter",
            display_name="Case Converter",
            category="utils/string",
            inputs=[io.String.Input("string", multiline=True),
                    io.Combo.Input("mode", options=["UPPERCASE", "lowercase", "Capitalize", "Title Case"])],
            outputs=[io.String.Output()],
        )

    @classmethod
    def execute(cls, string, mode) -> io.NodeOutput:
        converted = {"UPPERCASE": string.upper(), "lowercase": string.lower(), "Capitalize": string.capitalize(),
                     "Title Case": string.title()}.get(mode, string)
        return io.NodeOutput(converted)


class SaveVideoReplica(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveVideo",
            display_name="Save Video",
            category="image/video",
            inputs=[io.Video.Input("video"),
                    io.String.Input("filename_prefix", default="video/ComfyUI"),
                    io.Combo.Input("format", options=["auto", "mp4"], default="auto"),
                    io.Combo.Input("codec", options=["auto", "h264"], default="auto")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, video, filename_prefix, format, codec) -> io.NodeOutput:
        return io.NodeOutput()


class ImageEditReplica(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ByteDanceImageEditNode",
            display_name="ByteDance Image Edit",
            category="api node/image/ByteDance",
            inputs=[
                io.Combo.Input("model", options=["seededit-3-0-i2i-250628"], default="seededit-3-0-i2i-250628"),
                io.Image.Input("image"),
                io.String.Input("prompt", multiline=True, default=""),
                io.Int.Input("seed", default=0, min=0, max=2147483647, step=1,
                             display_mode=io.NumberDisplay.number, control_after_generate=True, optional=True),
                io.Float.Input("guidance_scale", default=5.5, min=1.0, max=10.0, step=0.01,
                               display_mode=io.NumberDisplay.number, optional=True),
                io.Boolean.Input("watermark", default=True, optional=True),
            ],
            outputs=[io.Image.Output()],
            hidden=[io.Hidden.auth_token_comfy_org, io.Hidden.api_key_comfy_org, io.Hidden.unique_id],
            is_api_node=True,
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        raise RuntimeError("no API access in tests")


class CFGNormReplica(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3CFGNorm",
            category="advanced/guidance",
            inputs=[io.Model.Input("model"), io.Float.Input("strength", default=1.0, min=0.0, max=100.0, step=0.01)],
            outputs=[io.Model.Output(display_name="patched_model")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, strength) -> io.NodeOutput:
        return io.NodeOutput(model)


class LoadVideoReplica(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadVideo",
            display_name="Load Video",
            category="image/video",
            inputs=[io.Combo.Input("file", options=[], upload=io.UploadType.video)],
            outputs=[io.Video.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        raise RuntimeError("no video decoding in tests")


class OldStyleJoin:
    """A V1 node in the same mapping."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("STRING", {"forceInput": True}), "b": ("STRING", {"default": "!"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "join"
    CATEGORY = "test"

    def join(self, a, b):
        return (a + b,)


NODE_CLASS_MAPPINGS = {
    "V3CaseConverter": CaseConverterReplica,
    "SaveVideo": SaveVideoReplica,
    "ByteDanceImageEditNode": ImageEditReplica,
    "V3CFGNorm": CFGNormReplica,
    "LoadVideo": LoadVideoReplica,
    "OldStyleJoin": OldStyleJoin,
}
NODE_DISPLAY_NAME_MAPPINGS = {"V3CaseConverter": "ignored for V3 nodes", "OldStyleJoin": "Old Style Join"}
