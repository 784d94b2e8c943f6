"""ComfyUI's `comfy.comfy_types`: the typing helpers of node_typing, re-exported as ComfyUI does."""

from typing import Any, Callable

from comfy_serverless.catalog.comfy_modules import missing_attribute

from .node_typing import (  # noqa: F401
    IO,
    CheckLazyMixin,
    ComfyNodeABC,
    FileLocator,
    HiddenInputTypeDict,
    InputTypeDict,
    InputTypeOptions,
    StrEnum,
)

UnetApplyFunction = Callable[..., Any]
UnetApplyConds = dict
UnetParams = dict
UnetWrapperFunction = Callable[[UnetApplyFunction, UnetParams], Any]

__all__ = ["UnetWrapperFunction", "UnetApplyConds", "UnetParams", "UnetApplyFunction", "IO", "InputTypeDict",
           "ComfyNodeABC", "CheckLazyMixin", "FileLocator"]


def __getattr__(name: str):
    return missing_attribute(__name__, name)
