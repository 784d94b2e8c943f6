"""CLIP: tokenizer(s) plus text encoder as they travel between nodes.

`encode(text)` follows ComfyUI's CLIPTextEncode: prompt weights, `embedding:name` textual inversions from
models/embeddings, 77-token windows concatenated, and the pooled output of the first window. Like
DiffusionModel, clones share the network and carry their own LoRA patches and last-layer choice.

SetClipHooks (models/hooks.py) gives a clone `hooks`, whose CLIP patches it encodes with too (with
`schedule_clip`, encode_from_tokens_scheduled encodes once per keyframe range), and `hooks_for_conds`, which the
conditioning it makes carries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from .embeddings import EmbeddingFinder
from .model_cache import ModelHandle
from .patching import LoraPatch, patched_module

log = logging.getLogger(__name__)

# Which textual-inversion tensor each encoder takes from a multi-encoder embedding file.
EMBEDDING_KEYS = {"sd15": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g"), "sdxl_refiner": ("clip_g",)}
# ComfyUI's key for each encoder's windows in tokenize()'s dict.
TOKEN_KEYS = {"clip_l": "l", "clip_h": "h", "clip_g": "g"}


@dataclass(frozen=True)
class TextEncoder:
    handle: ModelHandle  # loads an SD1TextEncoder, SD2TextEncoder, SDXLTextEncoder or SDXLRefinerTextEncoder
    family: str  # "sd15", "sd2", "sdxl" or "sdxl_refiner"
    layers: int  # transformer blocks of the (first) encoder, for CLIPSetLastLayer's range
    dtype: object
    last_layer: int | None = None  # None: the family's default (SD1 last, SD2/SDXL penultimate)
    patches: tuple[LoraPatch, ...] = ()
    embeddings: EmbeddingFinder | None = None
    hooks: Any = None  # HOOKS whose CLIP weights apply when encoding (ComfyUI's forced_hooks)
    hooks_for_conds: Any = None  # HOOKS put on the conditioning this CLIP makes (apply_to_conds)
    schedule_clip: bool = False

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

    # ComfyUI's CLIP weight API (CLIPMerge*, packs), in clip_patcher_api.py.

    def model_state_dict(self, filter_prefix=None) -> dict:
        from .clip_patcher_api import model_state_dict

        return model_state_dict(self, filter_prefix)

    def get_key_patches(self, filter_prefix=None) -> dict:
        from .clip_patcher_api import get_key_patches

        return get_key_patches(self, filter_prefix)

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        from .clip_patcher_api import add_patches

        return add_patches(self, patches, strength_patch, strength_model)

    def tokenize(self, text: str, return_word_ids: bool = False, **_) -> dict:
        """ComfyUI's CLIP.tokenize: weighted 77-token windows per encoder, {"l": windows} for SD1, {"h": ...}
        for SD2, {"g": ..., "l": ...} for SDXL, {"g": ...} for the SDXL refiner; a window is a list of (token,
        weight) pairs (an embedding's vectors stand where their tokens would), or (token, weight, word number) with
        return_word_ids."""
        from ..text.prompt_weights import tokenize_weighted

        return {TOKEN_KEYS[key]: tokenize_weighted(text, tokenizer, self._embedding_lookup(key), return_word_ids)
                for tokenizer, key in zip(_tokenizers(self.family), EMBEDDING_KEYS[self.family])}

    def encode_tokens(self, tokens, hook_multipliers: dict | None = None):
        """(cond [1, 77 * windows, width] float32, pooled [1, width] float32) of `tokenize`'s output (or its
        windows as a list, one entry per encoder). Hooks apply at their first keyframe's strength unless
        `hook_multipliers` ({id(hook.ref): multiplier}) says otherwise."""
        import torch

        from .hooks import clip_patches

        if isinstance(tokens, dict):
            missing = [TOKEN_KEYS[key] for key in EMBEDDING_KEYS[self.family] if TOKEN_KEYS[key] not in tokens]
            if missing:
                raise ValueError(f"tokens for this {self.family} text encoder need the keys "
                                 f"{[TOKEN_KEYS[key] for key in EMBEDDING_KEYS[self.family]]}; {missing} missing "
                                 "(were they made by another CLIP's tokenize?)")
            tokens = [tokens[TOKEN_KEYS[key]] for key in EMBEDDING_KEYS[self.family]]
        tokens = [[[entry[:2] for entry in window] for window in windows] for windows in tokens]
        from ..networks.file_pages import release_module_file_pages

        encoder = patched_module(self.handle, self.patches + clip_patches(self.hooks, self, hook_multipliers))
        with torch.no_grad():
            encoded = encoder.encode(*tokens, hidden_layer=self.last_layer)
        release_module_file_pages(encoder)
        return encoded

    def encode(self, text: str):
        return self.encode_tokens(self.tokenize(text))

    # ComfyUI's CLIP methods that packs call (CLIPTextEncode there is tokenize + encode_from_tokens_scheduled).

    def encode_from_tokens(self, tokens, return_pooled: bool = False, return_dict: bool = False):
        """cond; (cond, pooled) with return_pooled; {"cond", "pooled_output"} with return_dict; "unprojected"
        pools before the text projection (the same for CLIP-L, which has none)."""
        if return_pooled == "unprojected":
            from .clip_surface import encode_unprojected

            if self.hooks is not None:
                raise ValueError("return_pooled='unprojected' is not supported for a CLIP with hooks here")
            cond, pooled = encode_unprojected(self, tokens)
        else:
            cond, pooled = self.encode_tokens(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled, **self._hooks_dict()}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected: bool = False, add_dict: dict | None = None,
                                     show_pbar: bool = True):
        """CONDITIONING as CLIPTextEncode makes it: [[cond, {"pooled_output": pooled, **add_dict}]]."""
        if unprojected:
            raise ValueError("unprojected pooled outputs are not supported by this server's text encoders")
        add_dict = add_dict or {}
        if self.hooks is None or not self.schedule_clip:
            cond, pooled = self.encode_tokens(tokens)
            return [[cond, {"pooled_output": pooled, **add_dict, **self._hooks_dict()}]]
        from .hooks import clip_schedule

        out = []
        for (start, end), multipliers in clip_schedule(self.hooks):
            if end < add_dict.get("start_percent", 0.0) or start > add_dict.get("end_percent", 1.0):
                continue
            cond, pooled = self.encode_tokens(tokens, multipliers)
            out.append([cond, {"pooled_output": pooled, "clip_start_percent": start, "clip_end_percent": end,
                               **add_dict, **self._hooks_dict()}])
        return out

    # ComfyUI's CLIP internals that packs reach into (cond_stage_model, patcher, ...), in clip_surface.py.

    @property
    def cond_stage_model(self):
        from .clip_surface import cond_stage_model

        return cond_stage_model(self)

    @property
    def patcher(self):
        from .clip_surface import ClipPatcher

        return ClipPatcher(self)

    @property
    def layer_idx(self) -> int | None:
        return self.last_layer

    def clip_layer(self, layer_idx: int) -> None:
        """ComfyUI's CLIP.clip_layer: sets this object's last layer in place (CLIPSetLastLayer clones first)."""
        object.__setattr__(self, "last_layer", self.set_last_layer(layer_idx).last_layer)

    def load_model(self):
        """Loads the network now (it would load on first use anyway); returns clip.patcher, as ComfyUI."""
        self.handle.get()
        return self.patcher

    def get_sd(self) -> dict:
        """The unpatched weights under ComfyUI's names (clip_l.transformer.text_model.*, ...)."""
        return replace(self, patches=(), hooks=None).model_state_dict()

    def load_sd(self, sd: dict, full_model: bool = False):
        """ComfyUI's CLIP.load_sd: weights under ComfyUI's full names (full_model) or one tower's transformers
        names; they become "set" patches of this object (the shared network is not changed). Returns (missing,
        unexpected) keys."""
        from .clip_surface import load_patches

        return load_patches(self, sd) if full_model else self.cond_stage_model.load_sd(sd)

    def _hooks_dict(self) -> dict:
        return {"hooks": self.hooks_for_conds} if self.hooks_for_conds is not None else {}

    def _embedding_lookup(self, key: str):
        if self.embeddings is None:
            return None
        return lambda name: self.embeddings.find(name, key)


_tokenizer_cache: dict[int, object] = {}


def _tokenizers(family: str) -> list:
    """CLIP-L pads with the end token, OpenCLIP models (SD2's ViT-H, SDXL's and the refiner's bigG) with 0."""
    from ..text.tokenizer import PAD_WITH_END, PAD_WITH_ZERO, CLIPTokenizer

    def tokenizer(pad: int):
        if pad not in _tokenizer_cache:
            _tokenizer_cache[pad] = CLIPTokenizer(pad_token_id=pad)
        return _tokenizer_cache[pad]

    if family == "sd15":
        return [tokenizer(PAD_WITH_END)]
    if family in ("sd2", "sdxl_refiner"):
        return [tokenizer(PAD_WITH_ZERO)]
    return [tokenizer(PAD_WITH_END), tokenizer(PAD_WITH_ZERO)]
