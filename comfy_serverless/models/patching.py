"""LoRA patches on shared networks: applied lazily, for whichever clone runs next.

Clones of a MODEL or CLIP share one network (a ModelHandle) and differ only in their patch lists. Before a
clone runs, `patched_module` makes the shared weights match its list: patches of another clone are undone
first (models.lora patches by replacing parameters with patched copies and can put the originals back).
Running the same clone again costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_cache import ModelHandle


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One LoRA file's patches for one network, at one strength.

    `targets` maps a submodule of the network ("" for the network itself; "clip_l", "clip_h", "clip_g" for
    the encoders inside a text encoder) to models.lora's {parameter name: entries}.
    """

    name: str
    targets: dict
    strength: float


def _same(applied: tuple, wanted: tuple) -> bool:
    return len(applied) == len(wanted) and all(a is w for a, w in zip(applied, wanted))


def patched_module(handle: ModelHandle, patches: tuple[LoraPatch, ...]):
    """The handle's network with exactly `patches` applied (loading the network if needed)."""
    module = handle.get()
    if _same(handle.state.get("lora", ()), patches):
        return module
    from . import lora

    for applied in reversed(handle.state.pop("lora_applied", [])):
        applied.undo()
    handle.state["lora"] = ()
    done = []
    try:
        for target in dict.fromkeys(name for patch in patches for name in patch.targets):
            submodule = module.get_submodule(target)
            stack = [(patch.targets.get(target, {}), patch.strength) for patch in patches]
            done.append(lora.apply_loras(submodule, stack))  # one patched copy per weight, however many LoRAs
    except BaseException:
        for applied in reversed(done):
            applied.undo()
        raise
    handle.state["lora_applied"] = done
    handle.state["lora"] = tuple(patches)
    return module
