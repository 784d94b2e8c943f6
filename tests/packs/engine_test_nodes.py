"""Small nodes that exercise the engine: numbers, lists, lazy inputs, expansion, blockers, async, errors.

Loaded by the tests as a custom node pack (copied into a custom_nodes folder), exactly as a user's pack would
be. Pure Python, no torch, so the engine tests stay fast.
"""

import asyncio
import time

from comfy_serverless.graph_utils import ExecutionBlocker, GraphBuilder
from comfy_serverless.progress import ProgressBar

RUN_LOG = []  # what ran, in order (read back through the Record node's UI)


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 0.0, "min": -1000.0, "max": 1000.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value):
        RUN_LOG.append("Number")
        return (value,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("FLOAT,INT",), "b": ("FLOAT,INT",)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, a, b):
        RUN_LOG.append("Add")
        return (a + b,)


class Record:
    """Output node: shows the values it received (one call per list index) in its UI."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}, "optional": {"label": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def run(self, value, label=""):
        return {"ui": {"values": [value], "labels": [label]}}


class RecordList(Record):
    INPUT_IS_LIST = True

    def run(self, value, label=None):
        # A tuple, as many ComfyUI nodes return it: merged like a list.
        return {"ui": {"values": [list(value)], "labels": (len(value),)}}


class MakeList:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 0, "max": 100})}}

    RETURN_TYPES = ("FLOAT", "INT")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, count):
        return ([float(i) for i in range(count)], count)


class LazySwitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"use_a": ("BOOLEAN", {"default": True}),
                             "a": ("FLOAT", {"lazy": True}), "b": ("FLOAT", {"lazy": True})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def check_lazy_status(self, use_a, a=None, b=None):
        return ["a"] if use_a else ["b"]

    def run(self, use_a, a=None, b=None):
        return (a if use_a else b,)


class Fail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "message": ("STRING", {"default": "boom"})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, message):
        raise ValueError(message)


class Block:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "block": ("BOOLEAN", {"default": True}),
                             "message": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, block, message):
        if block:
            return (ExecutionBlocker(message or None),)
        return (value,)


class SumTo:
    """Expands into a chain of Add nodes: 0 + 1 + ... + (n-1) via GraphBuilder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3, "min": 1, "max": 50})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, n):
        graph = GraphBuilder()
        total = graph.node("Number", value=0.0)
        for i in range(1, n):
            step = graph.node("Number", value=float(i))
            total = graph.node("Add", a=total.out(0), b=step.out(0))
        return {"result": (total.out(0),), "expand": graph.finalize()}


class SelfLoop:
    """Expands into a node that depends on itself: a dynamic cycle."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value):
        graph = GraphBuilder()
        a = graph.node("Add", a=value, b=value)
        b = graph.node("Add", a=a.out(0), b=value)
        a.set_input("b", b.out(0))
        return {"result": (b.out(0),), "expand": graph.finalize()}


class ClashingExpand:
    """Expands into a node whose id is already in the prompt: a duplicate-node error."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value):
        return {"result": (["1", 0],), "expand": {"1": {"class_type": "Number", "inputs": {"value": value}}}}


class Sleep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 60.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    async def run(self, value, seconds):
        await asyncio.sleep(seconds)
        return (value,)


class SlowSteps:
    """Reports progress every step; stops between steps on /interrupt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "steps": ("INT", {"default": 5, "min": 1, "max": 1000}),
                             "step_seconds": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, steps, step_seconds):
        bar = ProgressBar(steps)
        for _ in range(steps):
            time.sleep(step_seconds)
            bar.update(1)
        return (value,)


class PreviewSteps:
    """Sends a small JPEG preview with each progress update (like a sampler's latent preview)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "steps": ("INT", {"default": 2, "min": 1, "max": 10})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, steps):
        from PIL import Image

        bar = ProgressBar(steps)
        for step in range(steps):
            bar.update_absolute(step + 1, steps, ("JPEG", Image.new("RGB", (600, 300), (255, 0, 0)), 512))
        return (value,)


class Counter:
    """Changes every run (IS_CHANGED returns NaN) unless `stable` is set."""

    calls = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"stable": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def IS_CHANGED(cls, stable):
        return "same" if stable else float("nan")

    def run(self, stable):
        Counter.calls += 1
        return (float(Counter.calls),)


class Stateful:
    """Counts calls on its own instance: shows whether the engine reused the node object."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def IS_CHANGED(cls, tag):
        return float("nan")

    def __init__(self):
        self.calls = 0

    def run(self, tag):
        self.calls += 1
        return (self.calls,)


class EvenOnly:
    """VALIDATE_INPUTS rejects odd values (and so skips the min/max check for `value`)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        if value is None:  # linked: known only at run time
            return True
        return True if value % 2 == 0 else f"{value} is odd"

    def run(self, value):
        return (value,)


class ComboPick:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"choice": (["red", "green", "blue"], {"default": "red"})},
                "optional": {"number": ([str(i) for i in range(30)],)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, choice, number=None):
        return (choice,)


NODE_CLASS_MAPPINGS = {
    "Number": Number, "Add": Add, "Record": Record, "RecordList": RecordList, "MakeList": MakeList,
    "LazySwitch": LazySwitch, "Fail": Fail, "Block": Block, "SumTo": SumTo, "SelfLoop": SelfLoop,
    "Sleep": Sleep, "SlowSteps": SlowSteps, "Counter": Counter, "EvenOnly": EvenOnly,
    "ComboPick": ComboPick, "PreviewSteps": PreviewSteps,
    "Stateful": Stateful, "ClashingExpand": ClashingExpand,
}
NODE_DISPLAY_NAME_MAPPINGS = {"Record": "Record Value"}


class WaitForFile:
    """Blocks, with no progress reports and deaf to /interrupt, until a file exists (or `timeout` passes):
    a stalled node whose end the test controls."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",), "path": ("STRING", {"default": ""}),
                             "timeout": ("FLOAT", {"default": 60.0, "min": 0.0, "max": 600.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, path, timeout):
        import os

        deadline = time.monotonic() + timeout
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return (value,)


class RaiseBase:
    """Raises an exception that is not an Exception (SystemExit, KeyboardInterrupt, a bare BaseException)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT",),
                             "kind": (["SystemExit", "KeyboardInterrupt", "BaseException"],)}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, value, kind):
        raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt,
               "BaseException": BaseException}[kind](f"{kind} raised by a node")


NODE_CLASS_MAPPINGS.update({"WaitForFile": WaitForFile, "RaiseBase": RaiseBase})


class _DelayAfterPromptEnd:
    """Logging handler: sleeps in the worker when it logs "prompt finished", i.e. after the executor returned
    but before the worker's bookkeeping; widens that window so ordering bugs there show up every time."""

    def __init__(self, seconds):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = self._emit
        self.seconds = seconds

    def _emit(self, record):
        if record.getMessage().startswith("prompt finished"):
            time.sleep(self.seconds)


class DelayPromptEnd:
    """Output node: from now on the server pauses `seconds` between a prompt's end and its history entry."""

    installed = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 5.0})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def run(self, seconds):
        import logging

        if DelayPromptEnd.installed is None:
            DelayPromptEnd.installed = _DelayAfterPromptEnd(seconds)
            logging.getLogger("comfy_serverless").addHandler(DelayPromptEnd.installed.handler)
        DelayPromptEnd.installed.seconds = seconds
        return {"ui": {"seconds": [seconds]}}


NODE_CLASS_MAPPINGS.update({"DelayPromptEnd": DelayPromptEnd})
