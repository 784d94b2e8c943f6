"""ComfyUI's `comfy.controlnet` for custom node packs: the CONTROL_NET classes and load_controlnet.

`ControlNet`, `ControlLora` and `T2IAdapter` are this server's control objects (models/control_objects.py,
models/control_lora.py, models/t2i_adapters.py) with ComfyUI's methods: copy, set_cond_hint,
set_previous_controlnet, pre_run, get_control, control_merge, cleanup, get_models, set_extra_arg. Building one from
a raw network the ComfyUI way is not provided; load files with `load_controlnet` (ControlNets of SD1.x/SD2.x/SDXL
incl. diff and union ones, control-LoRAs, T2I-Adapters).
"""

from __future__ import annotations

from comfy_serverless.catalog.comfy_modules import missing_attribute, stand_in_type
from comfy_serverless.models.control_objects import ControlBase, broadcast_image_to  # noqa: F401  (ComfyUI names)
from comfy_serverless.models.control_objects import ControlNet as _OurControlNet

ControlNet = stand_in_type("comfy.controlnet.ControlNet", _OurControlNet)


_lazy_types: dict = {}


def _lazy_type(name: str):
    """The T2IAdapter / ControlLora stand-ins, made on first use (their modules import torch)."""
    if name not in _lazy_types:
        if name == "T2IAdapter":
            from comfy_serverless.models.t2i_adapters import T2IAdapterControl as ours
        else:
            from comfy_serverless.models.control_lora import ControlLora as ours
        _lazy_types[name] = stand_in_type(f"comfy.controlnet.{name}", ours)
    return _lazy_types[name]


def load_controlnet(ckpt_path, model=None, model_options=None):
    """The control object of a ControlNet or T2I-Adapter file; `model` (a MODEL) for diff ControlNets."""
    from comfy_serverless.models.controlnets import load_controlnet as load

    return load(str(ckpt_path), model)


def __getattr__(name: str):
    if name in ("T2IAdapter", "ControlLora"):
        return _lazy_type(name)
    return missing_attribute(__name__, name)
