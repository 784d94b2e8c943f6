"""A V3 node pack (comfy_api.latest) loaded through `comfy_entrypoint`, written the way ComfyUI 0.3.64's V3
packs are: widgets, an image node, output nodes with `ui`, validate_inputs, fingerprint_inputs, a lazy input,
hidden values, an async node and a blocker. Used by tests/test_pack_server_and_v3.py."""

import asyncio
import time

from comfy_api.latest import ComfyAPI, ComfyExtension, io, ui
from typing_extensions import override

RUN_LOG = []


class V3Widgets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3Widgets",
            display_name="V3 Widgets",
            category="test/v3",
            description="Passes its widget values through.",
            inputs=[
                io.Int.Input("count", default=3, min=0, max=100, step=1),
                io.Float.Input("scale", default=0.5, min=0.0, max=1.0, step=0.01, round=0.001),
                io.String.Input("text", default="hello", multiline=False),
                io.Combo.Input("mode", options=["first", "second"], default="first"),
                io.Boolean.Input("flag", default=True, label_on="yes", label_off="no", optional=True),
            ],
            outputs=[io.Int.Output(display_name="count"), io.Float.Output(),
                     io.String.Output(tooltip="the text, upper-cased"), io.Combo.Output(display_name="mode")],
        )

    @classmethod
    def execute(cls, count, scale, text, mode, flag=False) -> io.NodeOutput:
        RUN_LOG.append(f"widgets:{mode}")
        return io.NodeOutput(count, scale, text.upper() if flag else text, mode)


class V3Show(io.ComfyNode):
    """Output node: shows a value, its hidden unique id and the ids of the prompt it ran in."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Show", category="test/v3", is_output_node=True,
                         inputs=[io.AnyType.Input("value"), io.String.Input("label", default="", optional=True)],
                         hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, value, label="") -> io.NodeOutput:
        return io.NodeOutput(ui={"values": [value], "label": [label], "unique_id": [cls.hidden.unique_id],
                                 "prompt_nodes": [sorted(cls.hidden.prompt)],
                                 "pnginfo": [cls.hidden.extra_pnginfo]})


class V3Even(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Even", category="test/v3", inputs=[io.Int.Input("value", default=0)],
                         outputs=[io.Int.Output()])

    @classmethod
    def validate_inputs(cls, value):
        if value % 2:
            return f"{value} is odd"
        return True

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        return io.NodeOutput(value)


class V3Counter(io.ComfyNode):
    """Counts its runs; fingerprint_inputs decides whether a repeated prompt runs it again."""

    runs = 0

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Counter", category="test/v3",
                         inputs=[io.Combo.Input("policy", options=["cache", "always"])], outputs=[io.Int.Output()])

    @classmethod
    def fingerprint_inputs(cls, policy):
        return time.monotonic() if policy == "always" else "same"

    @classmethod
    def execute(cls, policy) -> io.NodeOutput:
        V3Counter.runs += 1  # on the pack's class: `cls` is a per-call copy
        return io.NodeOutput(V3Counter.runs)


class V3Source(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Source", category="test/v3", inputs=[io.String.Input("tag")],
                         outputs=[io.String.Output()])

    @classmethod
    def fingerprint_inputs(cls, tag):
        return float("nan")

    @classmethod
    def execute(cls, tag) -> io.NodeOutput:
        RUN_LOG.append(f"source:{tag}")
        return io.NodeOutput(tag)


class V3Switch(io.ComfyNode):
    """Evaluates only the lazy input it needs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Switch", category="test/v3",
                         inputs=[io.Boolean.Input("use_a"), io.String.Input("a", lazy=True, force_input=True),
                                 io.String.Input("b", lazy=True, force_input=True)],
                         outputs=[io.String.Output()])

    @classmethod
    def check_lazy_status(cls, use_a, a=None, b=None):
        wanted = "a" if use_a else "b"
        return [wanted] if (a if use_a else b) is None else []

    @classmethod
    def execute(cls, use_a, a=None, b=None) -> io.NodeOutput:
        return io.NodeOutput(a if use_a else b)


class V3RunLog(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3RunLog", category="test/v3", is_output_node=True,
                         inputs=[io.AnyType.Input("after")])

    @classmethod
    def fingerprint_inputs(cls, after=None):
        return float("nan")

    @classmethod
    def execute(cls, after) -> io.NodeOutput:
        log = list(RUN_LOG)
        RUN_LOG.clear()
        return io.NodeOutput(ui={"log": log, "after": [after]})


class V3Preview(io.ComfyNode):
    """Image output node: previews its images through ui.PreviewImage and passes them on."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Preview", category="test/v3", is_output_node=True,
                         inputs=[io.Image.Input("images")], outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, images) -> io.NodeOutput:
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))


class V3Text(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Text", category="test/v3", is_output_node=True,
                         inputs=[io.String.Input("text", force_input=True)])

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        return io.NodeOutput(ui=ui.PreviewText(text))


class V3AsyncDouble(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3AsyncDouble", category="test/v3", inputs=[io.Int.Input("value")],
                         outputs=[io.Int.Output()])

    @classmethod
    async def execute(cls, value) -> io.NodeOutput:
        await ComfyAPI().execution.set_progress(1, 2)
        await asyncio.sleep(0.01)
        return io.NodeOutput(value * 2)


class V3Fancy(io.ComfyNode):
    """Multi-select combo, multi-typed and matched-type inputs."""

    @classmethod
    def define_schema(cls):
        thing = io.MatchType.Template("thing")
        return io.Schema(node_id="V3Fancy", category="test/v3",
                         inputs=[io.MultiCombo.Input("tags", options=["a", "b", "c"], placeholder="pick"),
                                 io.MultiType.Input(io.Int.Input("num", default=1, min=0), types=[io.Float]),
                                 io.MatchType.Input("thing", template=thing)],
                         outputs=[io.MatchType.Output(template=thing, display_name="same")])

    @classmethod
    def execute(cls, tags, num, thing) -> io.NodeOutput:
        return io.NodeOutput([thing, sorted(tags), num])


class V3Gate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Gate", category="test/v3",
                         inputs=[io.AnyType.Input("value"), io.Boolean.Input("open")], outputs=[io.AnyType.Output()])

    @classmethod
    def execute(cls, value, open) -> io.NodeOutput:
        return io.NodeOutput(value) if open else io.NodeOutput(block_execution="the gate is closed")


class V3FromTheFuture(io.ComfyNode):
    """Uses an io type of a later ComfyUI: this node is left out, the pack's others load."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3FromTheFuture", inputs=[io.Autogrow.Input("many", template=io.Int.Input("n"))])

    @classmethod
    def execute(cls, many) -> io.NodeOutput:
        return io.NodeOutput()


class V3TestExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [V3Widgets, V3Show, V3Even, V3Counter, V3Source, V3Switch, V3RunLog, V3Preview, V3Text,
                V3AsyncDouble, V3Gate, V3Fancy, V3FromTheFuture]


async def comfy_entrypoint() -> V3TestExtension:
    return V3TestExtension()
