"""The V3 node vocabulary packs write against (`from comfy_api.latest import io`): types with their Input and
Output classes, `Schema`, `Hidden`, `ComfyNode` and `NodeOutput` (docs/comfy-api-contract.md §2.4).

Written for comfy-serverless from ComfyUI's documented and observable behaviour (the `/object_info` a V3 node
produces, the fields packs pass). The engine never sees these classes directly: catalog/v3.py reads a schema
through `inputs[i].as_dict()/.get_io_type()`, the outputs and the flags, and turns each node class into a V1
class. Nothing here imports torch, so a pack that imports `io` stays as light as the pack itself.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from comfy_serverless.catalog import v3 as _v3
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.engine.graph import ExecutionBlocker  # noqa: F401  (packs import it from here too)

HiddenHolder = _v3.HiddenHolder


def _pruned(values: dict) -> dict:
    """`values` without the entries that are None (what ComfyUI leaves out of an input's options)."""
    return {key: value for key, value in values.items() if value is not None}


def _plain(value):
    """An enum member as its value (str enums would serialise the same, but plain values read better)."""
    return value.value if isinstance(value, enum.Enum) else value


class FolderType(str, enum.Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, enum.Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(str, enum.Enum):
    number = "number"
    slider = "slider"


class ControlAfterGenerate(str, enum.Enum):
    fixed = "fixed"
    increment = "increment"
    decrement = "decrement"
    randomize = "randomize"


class RemoteOptions:
    """A combo whose options the frontend fetches from a route."""

    def __init__(self, route: str, refresh_button: bool, control_after_refresh: str = "first",
                 timeout: int | None = None, max_retries: int | None = None, refresh: int | None = None):
        self.route = route
        self.refresh_button = refresh_button
        self.control_after_refresh = control_after_refresh
        self.timeout = timeout
        self.max_retries = max_retries
        self.refresh = refresh

    def as_dict(self) -> dict:
        return _pruned({"route": self.route, "refresh_button": self.refresh_button,
                        "control_after_refresh": self.control_after_refresh, "timeout": self.timeout,
                        "max_retries": self.max_retries, "refresh": self.refresh})


# -- inputs and outputs ----------------------------------------------------------------------------------------

class _IO:
    """Common part of inputs and outputs: the type family they belong to (`Parent`) gives the io type."""

    Parent: Any = None

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    @property
    def Type(self):  # noqa: N802  (ComfyUI's name)
        return self.Parent.Type

    def validate(self) -> None:
        pass


class Input(_IO):
    """A socket input (a link from another node's output)."""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, extra_dict: dict | None = None, raw_link: bool | None = None, **ignored):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}
        self.raw_link = raw_link

    def as_dict(self) -> dict:
        return {**_pruned({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                           "lazy": self.lazy, "rawLink": self.raw_link}),
                **_pruned(self.extra_dict)}

    def get_io_type(self) -> str:
        return self.io_type

    def get_all(self) -> list:
        return [self]


class WidgetInput(Input):
    """An input the frontend can show as a widget (a literal value in API prompts)."""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, socketless: bool | None = None,
                 widget_type: str | None = None, force_input: bool | None = None, extra_dict: dict | None = None,
                 raw_link: bool | None = None, **ignored):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self) -> dict:
        return {**super().as_dict(),
                **_pruned({"default": _plain(self.default), "socketless": self.socketless,
                           "widgetType": self.widget_type, "forceInput": self.force_input})}

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else self.io_type


class Output(_IO):
    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False, **ignored):
        self.id = id
        self.display_name = display_name or id
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name or self.id, "tooltip": self.tooltip,
                        "is_output_list": self.is_output_list})

    def get_io_type(self) -> str:
        return self.io_type


class ComfyTypeI:
    """A type family with only an input (e.g. MultiCombo)."""

    io_type: str = "*"
    Type: Any = Any

    class Input(Input):
        pass


class ComfyTypeIO(ComfyTypeI):
    """A type family with an input and an output."""

    class Output(Output):
        pass


_ComfyType = ComfyTypeI  # the name ComfyUI's own modules use for the base


def comfytype(io_type: str, **kwargs):
    """Class decorator: makes `cls` the type family `io_type`, its Input/Output classes bound to it."""

    def decorate(cls):
        family = cls
        if not issubclass(cls, ComfyTypeI):
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            family = type(cls.__name__, (cls, ComfyTypeIO), body)
        family.io_type = io_type
        for role in ("Input", "Output"):
            nested = getattr(family, role, None)
            if isinstance(nested, type):
                bound = type(nested.__name__, (nested,), {"Parent": family, "__module__": family.__module__,
                                                          "__qualname__": f"{family.__qualname__}.{role}"})
                setattr(family, role, bound)
        return family

    return decorate


def Custom(io_type: str) -> type:  # noqa: N802  (ComfyUI's name)
    """A socket type of a pack's own (a string type such as "MY_PACK_DATA")."""

    @comfytype(io_type=io_type)
    class CustomType(ComfyTypeIO):
        pass

    return CustomType


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default: bool | None = None,
                     label_on: str | None = None, label_off: str | None = None, socketless: bool | None = None,
                     force_input: bool | None = None, extra_dict: dict | None = None, raw_link: bool | None = None,
                     **ignored):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self) -> dict:
            return {**super().as_dict(), **_pruned({"label_on": self.label_on, "label_off": self.label_off})}


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default: int | None = None,
                     min: int | None = None, max: int | None = None, step: int | None = None,
                     control_after_generate: bool | ControlAfterGenerate | None = None,
                     display_mode: NumberDisplay | None = None, socketless: bool | None = None,
                     force_input: bool | None = None, extra_dict: dict | None = None, raw_link: bool | None = None,
                     **ignored):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self) -> dict:
            return {**super().as_dict(),
                    **_pruned({"min": self.min, "max": self.max, "step": self.step,
                               "control_after_generate": _plain(self.control_after_generate),
                               "display": _plain(self.display_mode)})}


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default: float | None = None,
                     min: float | None = None, max: float | None = None, step: float | None = None,
                     round: float | None = None, display_mode: NumberDisplay | None = None,
                     socketless: bool | None = None, force_input: bool | None = None, extra_dict: dict | None = None,
                     raw_link: bool | None = None, **ignored):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min, self.max, self.step, self.round = min, max, step, round
            self.display_mode = display_mode

        def as_dict(self) -> dict:
            return {**super().as_dict(),
                    **_pruned({"min": self.min, "max": self.max, "step": self.step, "round": self.round,
                               "display": _plain(self.display_mode)})}


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, multiline: bool = False,
                     placeholder: str | None = None, default: str | None = None, dynamic_prompts: bool | None = None,
                     socketless: bool | None = None, force_input: bool | None = None, extra_dict: dict | None = None,
                     raw_link: bool | None = None, **ignored):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self) -> dict:
            return {**super().as_dict(),
                    **_pruned({"multiline": self.multiline, "placeholder": self.placeholder,
                               "dynamicPrompts": self.dynamic_prompts})}


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        """A dropdown. `options` is a list or an Enum class; the server does not check that a prompt's value is
        one of them (ComfyUI checks membership only for V1 list-typed combos)."""

        def __init__(self, id: str, options=None, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default=None,
                     control_after_generate: bool | ControlAfterGenerate | None = None,
                     upload: UploadType | None = None, image_folder: FolderType | None = None,
                     remote: RemoteOptions | None = None, socketless: bool | None = None,
                     extra_dict: dict | None = None, raw_link: bool | None = None, **ignored):
            if isinstance(options, type) and issubclass(options, enum.Enum):
                options = [member.value for member in options]
            super().__init__(id, display_name, optional, tooltip, lazy, _plain(default), socketless, None, None,
                             extra_dict, raw_link)
            self.multiselect = False
            self.options = options  # kept as given: a disk-backed list stays live (catalogue markers)
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self) -> dict:
            upload = {_plain(self.upload): True} if self.upload is not None else {}
            return {**super().as_dict(),
                    **_pruned({"multiselect": self.multiselect, "options": self.options,
                               "control_after_generate": _plain(self.control_after_generate)}),
                    **upload,
                    **_pruned({"image_folder": _plain(self.image_folder),
                               "remote": self.remote.as_dict() if self.remote is not None else None})}

    class Output(Output):
        def __init__(self, id: str | None = None, display_name: str | None = None, options=None,
                     tooltip: str | None = None, is_output_list: bool = False, **ignored):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = list(options) if options is not None else []


@comfytype(io_type="COMBO")
class MultiCombo(ComfyTypeI):
    """A dropdown where several options can be chosen (the value is a list)."""

    Type = list

    class Input(Combo.Input):
        def __init__(self, id: str, options, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default=None,
                     placeholder: str | None = None, chip: bool | None = None,
                     control_after_generate: bool | ControlAfterGenerate | None = None,
                     socketless: bool | None = None, extra_dict: dict | None = None, raw_link: bool | None = None,
                     **ignored):
            super().__init__(id, options, display_name, optional, tooltip, lazy, default, control_after_generate,
                             socketless=socketless, extra_dict=extra_dict, raw_link=raw_link)
            self.multiselect = True
            self.placeholder = placeholder
            self.chip = chip

        def as_dict(self) -> dict:
            return {**super().as_dict(),
                    "multi_select": _pruned({"placeholder": self.placeholder, "chip": self.chip})}


@comfytype(io_type="WEBCAM")
class Webcam(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        pass


def _socket(name: str, io_type: str) -> type:
    """A plain socket type (no widget): only a type name travels between nodes."""
    family = type(name, (ComfyTypeIO,), {"__module__": __name__, "__qualname__": name, "Type": Any})
    return comfytype(io_type=io_type)(family)


Image = _socket("Image", "IMAGE")
Mask = _socket("Mask", "MASK")
Latent = _socket("Latent", "LATENT")
Conditioning = _socket("Conditioning", "CONDITIONING")
Sampler = _socket("Sampler", "SAMPLER")
Sigmas = _socket("Sigmas", "SIGMAS")
Noise = _socket("Noise", "NOISE")
Guider = _socket("Guider", "GUIDER")
Clip = _socket("Clip", "CLIP")
ControlNet = _socket("ControlNet", "CONTROL_NET")
Vae = _socket("Vae", "VAE")
Model = _socket("Model", "MODEL")
ModelPatch = _socket("ModelPatch", "MODEL_PATCH")
ClipVision = _socket("ClipVision", "CLIP_VISION")
ClipVisionOutput = _socket("ClipVisionOutput", "CLIP_VISION_OUTPUT")
StyleModel = _socket("StyleModel", "STYLE_MODEL")
Gligen = _socket("Gligen", "GLIGEN")
UpscaleModel = _socket("UpscaleModel", "UPSCALE_MODEL")
Audio = _socket("Audio", "AUDIO")
AudioEncoder = _socket("AudioEncoder", "AUDIO_ENCODER")
AudioEncoderOutput = _socket("AudioEncoderOutput", "AUDIO_ENCODER_OUTPUT")
Video = _socket("Video", "VIDEO")
SVG = _socket("SVG", "SVG")
LoraModel = _socket("LoraModel", "LORA_MODEL")
LossMap = _socket("LossMap", "LOSS_MAP")
Voxel = _socket("Voxel", "VOXEL")
Mesh = _socket("Mesh", "MESH")
Hooks = _socket("Hooks", "HOOKS")
HookKeyframes = _socket("HookKeyframes", "HOOK_KEYFRAMES")
TimestepsRange = _socket("TimestepsRange", "TIMESTEPS_RANGE")
LatentOperation = _socket("LatentOperation", "LATENT_OPERATION")
FlowControl = _socket("FlowControl", "FLOW_CONTROL")
Accumulation = _socket("Accumulation", "ACCUMULATION")
Load3DCamera = _socket("Load3DCamera", "LOAD3D_CAMERA")
Load3D = _socket("Load3D", "LOAD_3D")
Load3DAnimation = _socket("Load3DAnimation", "LOAD_3D_ANIMATION")
Photomaker = _socket("Photomaker", "PHOTOMAKER")
Point = _socket("Point", "POINT")
FaceAnalysis = _socket("FaceAnalysis", "FACE_ANALYSIS")
BBOX = _socket("BBOX", "BBOX")
SEGS = _socket("SEGS", "SEGS")
WanCameraEmbedding = _socket("WanCameraEmbedding", "WAN_CAMERA_EMBEDDING")
AnyType = _socket("AnyType", "*")


@comfytype(io_type="COMFY_MULTITYPED_V3")
class MultiType:
    """An input that accepts any of several types (its io type is their comma union)."""

    Type = Any

    class Input(Input):
        def __init__(self, id, types: list, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, extra_dict: dict | None = None,
                     raw_link: bool | None = None, **ignored):
            self.input_override = None
            if isinstance(id, Input):  # an input whose widget and settings are kept
                self.input_override = id
                optional = True if id.optional else optional
                tooltip = id.tooltip if id.tooltip is not None else tooltip
                display_name = id.display_name if id.display_name is not None else display_name
                lazy = id.lazy if id.lazy is not None else lazy
                if isinstance(id, WidgetInput):
                    id.widget_type = id.get_io_type()
                id = id.id
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
            self.types = list(types)

        def get_io_type(self) -> str:
            names = [t.io_type if isinstance(t, type) else type(t).io_type for t in self.types]
            if self.input_override is not None:
                names.insert(0, self.input_override.get_io_type())
            return ",".join(dict.fromkeys(names))

        def as_dict(self) -> dict:
            if self.input_override is not None:
                return {**self.input_override.as_dict(), **super().as_dict()}
            return super().as_dict()


@comfytype(io_type="COMFY_MATCHTYPE_V3")
class MatchType(ComfyTypeIO):
    """Inputs and outputs whose type the frontend matches to what is connected (validation lets any type
    through, as ComfyUI does)."""

    class Template:
        def __init__(self, template_id: str, allowed_types=AnyType):
            self.template_id = template_id
            self.allowed_types = list(allowed_types) if isinstance(allowed_types, (list, tuple)) \
                else [allowed_types]

        def as_dict(self) -> dict:
            return {"template_id": self.template_id,
                    "allowed_types": ",".join(t.io_type for t in self.allowed_types)}

    class Input(Input):
        def __init__(self, id: str, template: "MatchType.Template", display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict | None = None, raw_link: bool | None = None, **ignored):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
            self.template = template

        def as_dict(self) -> dict:
            return {**super().as_dict(), "template": self.template.as_dict()}

    class Output(Output):
        def __init__(self, template: "MatchType.Template", id: str | None = None, display_name: str | None = None,
                     tooltip: str | None = None, is_output_list: bool = False, **ignored):
            super().__init__(id, display_name or (None if id else "MATCHTYPE"), tooltip, is_output_list)
            self.template = template


# -- hidden inputs, schema, node, output -----------------------------------------------------------------------

class Hidden(str, enum.Enum):
    """Values the server fills in without a socket; a node reads them as `cls.hidden.<name>`."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


@dataclasses.dataclass
class Schema:
    """What a V3 node is: its id (the class_type in prompts), menu data, inputs, outputs and behaviour flags."""

    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    hidden: list = dataclasses.field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    # accepted for packs written against later ComfyUI versions; not part of 0.3.64's /object_info
    search_aliases: list = dataclasses.field(default_factory=list)
    is_dev_only: bool = False
    accept_all_inputs: bool = False
    has_intermediate_output: bool = False
    price_badge: Any = None

    def validate(self) -> None:
        """Input ids must be unique, output ids too."""
        problems = []
        for kind, ids in (("Input", [i.id for item in self.inputs for i in item.get_all()]),
                          ("Output", [o.id for o in self.outputs])):
            repeated = sorted({i for i in ids if ids.count(i) > 1 and i is not None})
            if repeated:
                problems.append(f"{kind} ids must be unique; repeated: {repeated}")
        if problems:
            raise ValueError(f"schema of {self.node_id}: " + "; ".join(problems))
        for item in (*self.inputs, *self.outputs):
            item.validate()

    def finalize(self) -> None:
        """Adds the hidden inputs output and API nodes always get, and ids for unnamed outputs."""
        self.inputs = list(self.inputs or [])
        self.outputs = list(self.outputs or [])
        self.hidden = list(self.hidden or [])
        wanted = []
        if self.is_api_node:
            wanted += [Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org]
        if self.is_output_node:
            wanted += [Hidden.prompt, Hidden.extra_pnginfo]
        for member in wanted:
            if member not in self.hidden:
                self.hidden.append(member)
        for index, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{index}_{output.io_type}_"


class _classproperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


def _default(function):
    """Marks a ComfyNode placeholder method: a node that does not override it does not have the behaviour."""
    function._v3_default = True
    return function


class ComfyNode:
    """Base class of V3 nodes: override `define_schema` and `execute` (sync or async); optionally
    `validate_inputs`, `fingerprint_inputs` and `check_lazy_status`. All are classmethods; while a node runs,
    `cls` is a per-call subclass whose `hidden` holds the hidden values the schema asked for."""

    hidden: HiddenHolder | None = None
    RELATIVE_PYTHON_MODULE: str | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} must define define_schema()")

    @classmethod
    def execute(cls, **kwargs) -> "NodeOutput":
        raise NotImplementedError(f"{cls.__name__} must define execute()")

    @classmethod
    @_default
    def validate_inputs(cls, **kwargs) -> bool | str:
        """Like V1's VALIDATE_INPUTS: True, or a message saying what is wrong."""
        raise NotImplementedError

    @classmethod
    @_default
    def fingerprint_inputs(cls, **kwargs) -> Any:
        """Like V1's IS_CHANGED: a value that changes when the node must run again."""
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs) -> list[str]:
        """The lazy inputs to evaluate now; by default every input that is still None."""
        return [name for name, value in kwargs.items() if value is None]

    # -- V1 attributes, for packs that read them off a node class ---------------------------------------------
    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802
        return _v3.schema_of(cls)

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        return _v3.public_info(cls, "nodes")["input"]

    @_classproperty
    def RETURN_TYPES(cls):  # noqa: N802
        return tuple(_v3.public_info(cls, "nodes")["output"])

    @_classproperty
    def RETURN_NAMES(cls):  # noqa: N802
        return tuple(_v3.public_info(cls, "nodes")["output_name"])

    @_classproperty
    def OUTPUT_IS_LIST(cls):  # noqa: N802
        return tuple(_v3.public_info(cls, "nodes")["output_is_list"])

    @_classproperty
    def OUTPUT_NODE(cls):  # noqa: N802
        return _v3.public_info(cls, "nodes")["output_node"]

    @_classproperty
    def CATEGORY(cls):  # noqa: N802
        return _v3.public_info(cls, "nodes")["category"]

    @_classproperty
    def DESCRIPTION(cls):  # noqa: N802
        return _v3.public_info(cls, "nodes")["description"]


class NodeOutput:
    """What `execute` returns: the output values in order, and optionally `ui` (a dict or a `ui` helper),
    `expand` (a subgraph; the schema must set enable_expand) or `block_execution` (a message that blocks
    everything downstream)."""

    def __init__(self, *args: Any, ui=None, expand: dict | None = None, block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if self.args else None

    @classmethod
    def from_dict(cls, data: dict) -> "NodeOutput":
        result = data.get("result", ())
        if isinstance(result, ExecutionBlocker):
            return cls(block_execution=result.message)
        return cls(*(result or ()), ui=data.get("ui"), expand=data.get("expand"))

    def __getitem__(self, index):
        return self.args[index]


class _UIOutput:
    """Base of the `ui` helpers: `as_dict()` is what the node's `ui` becomes."""

    def as_dict(self) -> dict:
        raise NotImplementedError


def __getattr__(name: str):
    """A name from a later ComfyUI API: a placeholder, so the pack still loads and only what uses it fails
    (catalog/comfy_modules.py); probes such as hasattr see an AttributeError."""
    return missing_attribute(__name__, name)


__all__ = [
    "FolderType", "UploadType", "NumberDisplay", "ControlAfterGenerate", "RemoteOptions",
    "comfytype", "Custom", "Input", "WidgetInput", "Output", "ComfyTypeI", "ComfyTypeIO",
    "Boolean", "Int", "Float", "String", "Combo", "MultiCombo", "Webcam",
    "Image", "Mask", "Latent", "Conditioning", "Sampler", "Sigmas", "Noise", "Guider", "Clip", "ControlNet", "Vae",
    "Model", "ModelPatch", "ClipVision", "ClipVisionOutput", "StyleModel", "Gligen", "UpscaleModel", "Audio",
    "AudioEncoder", "AudioEncoderOutput", "Video", "SVG", "LoraModel", "LossMap", "Voxel", "Mesh", "Hooks",
    "HookKeyframes", "TimestepsRange", "LatentOperation", "FlowControl", "Accumulation", "Load3DCamera", "Load3D",
    "Load3DAnimation", "Photomaker", "Point", "FaceAnalysis", "BBOX", "SEGS", "WanCameraEmbedding", "AnyType",
    "MultiType", "MatchType", "HiddenHolder", "Hidden", "Schema", "ComfyNode", "NodeOutput",
]
