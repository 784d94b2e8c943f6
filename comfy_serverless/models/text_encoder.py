"""CLIP: tokenizer(s) plus text encoder as they travel between nodes.

`encode(text)` follows ComfyUI's CLIPTextEncode: prompt weights, `embedding:name` textual inversions from
models/embeddings, 77-token windows concatenated, and the pooled output of the first window. Like
DiffusionModel, clones share the network and carry their own LoRA patches and last-layer choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from .embeddings import EmbeddingFinder
from .model_cache import ModelHandle
from .patching import LoraPatch, patched_module

log = logging.getLogger(__name__)

# Which textual-inversion tensor each encoder takes from a multi-encoder embedding file.
EMBEDDING_KEYS = {"sd15": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


@dataclass(frozen=True)
class TextEncoder:
    handle: ModelHandle  # loads an SD1TextEncoder, SD2TextEncoder or SDXLTextEncoder
    family: str  # "sd15", "sd2" or "sdxl"
    layers: int  # transformer blocks of the (first) encoder, for CLIPSetLastLayer's range
    dtype: object
    last_layer: int | None = None  # None: the family's default (SD1 last, SD2/SDXL penultimate)
    patches: tuple[LoraPatch, ...] = ()
    embeddings: EmbeddingFinder | None = None

    def clone(self) -> TextEncoder:
        return replace(self)

    def set_last_layer(self, layer: int) -> TextEncoder:
        """CLIPSetLastLayer: -1 the last block, -2 the penultimate, ... A layer beyond the encoder's depth
        means the last one, as in ComfyUI."""
        if layer >= 0 or -layer > self.layers:
            layer = -1
        return replace(self, last_layer=layer)

    def with_patch(self, patch: LoraPatch) -> TextEncoder:
        return replace(self, patches=self.patches + (patch,))

    def tokenize(self, text: str) -> list:
        """Weighted 77-token windows per encoder (one list for SD1/SD2, two for SDXL)."""
        from ..text.prompt_weights import tokenize_weighted

        return [tokenize_weighted(text, tokenizer, self._embedding_lookup(key))
                for tokenizer, key in zip(_tokenizers(self.family), EMBEDDING_KEYS[self.family])]

    def encode_tokens(self, tokens: list):
        """(cond [1, 77 * windows, width] float32, pooled [1, width] float32)."""
        import torch

        encoder = patched_module(self.handle, self.patches)
        with torch.no_grad():
            return encoder.encode(*tokens, hidden_layer=self.last_layer)

    def encode(self, text: str):
        return self.encode_tokens(self.tokenize(text))

    def _embedding_lookup(self, key: str):
        if self.embeddings is None:
            return None
        return lambda name: self.embeddings.find(name, key)


_tokenizer_cache: dict[int, object] = {}


def _tokenizers(family: str) -> list:
    """CLIP-L pads with the end token, OpenCLIP models (SD2's ViT-H, SDXL's bigG) with 0."""
    from ..text.tokenizer import PAD_WITH_END, PAD_WITH_ZERO, CLIPTokenizer

    def tokenizer(pad: int):
        if pad not in _tokenizer_cache:
            _tokenizer_cache[pad] = CLIPTokenizer(pad_token_id=pad)
        return _tokenizer_cache[pad]

    if family == "sd15":
        return [tokenizer(PAD_WITH_END)]
    if family == "sd2":
        return [tokenizer(PAD_WITH_ZERO)]
    return [tokenizer(PAD_WITH_END), tokenizer(PAD_WITH_ZERO)]
