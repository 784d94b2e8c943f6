"""`comfy_api.input`: type names packs use in annotations (ImageInput, MaskInput, ...) and the VideoInput
interface. This server has no video decoding, so nothing here produces videos."""

from __future__ import annotations

import abc

ImageInput = object  # an IMAGE tensor [B,H,W,C]
MaskInput = object  # a MASK tensor [B,H,W]
AudioInput = dict  # {"waveform": tensor, "sample_rate": int}
LatentInput = dict  # {"samples": tensor, ...}


class VideoInput(abc.ABC):
    """A video a VIDEO socket carries (no implementation ships with comfy-serverless)."""

    @abc.abstractmethod
    def get_components(self):
        ...

    @abc.abstractmethod
    def save_to(self, path: str, format=None, codec=None, metadata=None):
        ...

    def get_dimensions(self) -> tuple[int, int]:
        raise NotImplementedError


__all__ = ["ImageInput", "MaskInput", "AudioInput", "LatentInput", "VideoInput"]
