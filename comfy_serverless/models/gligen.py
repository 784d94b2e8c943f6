"""GLIGEN files (models/gligen) as the GLIGEN objects GLIGENLoader returns and GLIGENTextBoxApply puts into
conditioning.

The object mirrors ComfyUI's: its ``model`` is the Gligen network (networks/gligen.py), whose ``set_position`` /
``set_empty`` give the "middle_patch" the sampler adds for an entry carrying ``"gligen": ("position", GLIGEN,
params)``. :func:`gligen_patches` builds those patches for an entry's options and a UNet batch shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint_files import CheckpointError, open_state_dict


@dataclass(eq=False)
class GligenModel:
    """A loaded GLIGEN (compared by identity: entries with different GLIGENs are not batched together)."""

    model: object  # networks.gligen.Gligen
    name: str

    def __repr__(self) -> str:
        return f"GligenModel({self.name!r}, {len(self.model.module_list)} fusers)"


def load_gligen(path: str) -> GligenModel:
    from ..networks.gligen import gligen_from_state_dict

    try:
        state_dict = open_state_dict(path)
        network = gligen_from_state_dict(state_dict)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{os.path.basename(path)}: {exc}") from None
    return GligenModel(network, os.path.basename(path))


def gligen_patches(options: dict, latent_shape, device=None) -> dict | None:
    """{"middle_patch": [patch]} for a conditioning entry with a "gligen" option, else None (ComfyUI applies a
    GLIGEN per entry, boxes relative to the latent area that entry is sampled on)."""
    gligen = options.get("gligen")
    if gligen is None:
        return None
    kind, model = gligen[0], gligen[1]
    network = getattr(model, "model", model)
    if kind == "position":
        patch = network.set_position(latent_shape, gligen[2], device)
    else:
        patch = network.set_empty(latent_shape, device)
    return {"middle_patch": [patch]}
