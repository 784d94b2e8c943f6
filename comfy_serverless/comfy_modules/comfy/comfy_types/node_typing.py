"""ComfyUI's `comfy.comfy_types.node_typing`: type names and typing helpers node packs use to declare nodes."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Literal, TypedDict


class StrEnum(str, enum.Enum):
    """A string enum whose str() is its value (ComfyUI's, kept for packs that import it)."""

    def __str__(self) -> str:
        return self.value


class IO(StrEnum):
    """Socket type names. `!=` follows the server's type check: "*" matches anything and comma unions match
    when one side's types include the other's."""

    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    LORA_MODEL = "LORA_MODEL"
    LOSS_MAP = "LOSS_MAP"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    WEBCAM = "WEBCAM"
    POINT = "POINT"
    FACE_ANALYSIS = "FACE_ANALYSIS"
    BBOX = "BBOX"
    SEGS = "SEGS"
    VIDEO = "VIDEO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, str):
            return True
        if self.value == "*" or other == "*":
            return False
        mine, theirs = frozenset(self.value.split(",")), frozenset(other.split(","))
        return not (mine <= theirs or theirs <= mine)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class RemoteInputOptions(TypedDict, total=False):
    route: str
    refresh_button: bool
    control_after_refresh: Literal["first", "last"]
    timeout: int
    max_retries: int
    refresh: int


class MultiSelectOptions(TypedDict, total=False):
    placeholder: str
    chip: bool


class InputTypeOptions(TypedDict, total=False):
    """The options dict of an input (docs/comfy-api-contract.md section 2.2 says which the server enforces)."""

    default: bool | str | float | int | list | tuple
    defaultInput: bool
    forceInput: bool
    lazy: bool
    rawLink: bool
    tooltip: str
    min: float
    max: float
    step: float
    round: float
    label_on: str
    label_off: str
    multiline: bool
    placeholder: str
    dynamicPrompts: bool
    image_upload: bool
    image_folder: Literal["input", "output", "temp"]
    remote: RemoteInputOptions
    control_after_generate: bool
    options: list
    multi_select: MultiSelectOptions


class HiddenInputTypeDict(TypedDict, total=False):
    node_id: Literal["UNIQUE_ID"]
    unique_id: Literal["UNIQUE_ID"]
    prompt: Literal["PROMPT"]
    extra_pnginfo: Literal["EXTRA_PNGINFO"]
    dynprompt: Literal["DYNPROMPT"]


class InputTypeDict(TypedDict, total=False):
    """What INPUT_TYPES returns."""

    required: dict
    optional: dict
    hidden: HiddenInputTypeDict


class ComfyNodeABC(ABC):
    """Base class for V1 nodes: INPUT_TYPES is required, the class attributes are documented in
    docs/comfy-api-contract.md section 2.2."""

    DESCRIPTION: str
    CATEGORY: str
    EXPERIMENTAL: bool
    DEPRECATED: bool
    OUTPUT_NODE: bool
    INPUT_IS_LIST: bool
    OUTPUT_IS_LIST: tuple
    RETURN_TYPES: tuple
    RETURN_NAMES: tuple
    OUTPUT_TOOLTIPS: tuple
    FUNCTION: str

    @classmethod
    @abstractmethod
    def INPUT_TYPES(cls) -> InputTypeDict:
        return {"required": {}}


class CheckLazyMixin:
    """check_lazy_status that asks for every lazy input not evaluated yet (those that arrive as None)."""

    def check_lazy_status(self, **kwargs) -> list[str]:
        return [name for name, value in kwargs.items() if value is None]


class FileLocator(TypedDict, total=False):
    filename: str
    subfolder: str
    type: Literal["input", "output", "temp"]
