"""Cross-attention's key and value projections of the text context, computed once per sampling instead of at
every step.

A sampling passes the same context (the encoded prompt) to every UNet call, so each cross-attention layer's
to_k(context) and to_v(context) come out the same at every step: about 31 ms of a 1.64 s SD1.5 step at 256 px
(16 layers over 154 context rows; Xeon model 207 capped at AVX-512, 2026-12-02). Each layer keeps its last pair
with what it came from and returns it again while the context and value hold the same values (compared at each
call, about 20 us) and both projection layers are the same objects with unchanged weights (a LoRA, a hook keyframe
or any other patch replaces the parameters; an in-place change moves their version). Nothing is reused while
gradients are enabled, for layers with hooks, for projection layers other than a plain Linear, or for a pair over
MAX_BYTES (large batches: the memory would grow with them). Measured there, alternating 14 times in one process:
a UNet call 2.17 -> 2.09 s (medians), 0.977 per pair.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .cpu_kernels import FastLinear

MAX_BYTES = 4 << 20  # a layer's key and value together; SD1.5 and SDXL with cfg at batch 1: at most 1.6 MB
_PLAIN_LINEARS = (nn.Linear, FastLinear)

_memos: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_last_copy: list[torch.Tensor] = []  # the context the memos hold, one copy shared by every layer


class _Memo:
    __slots__ = ("sources", "versions", "context", "value", "key", "projected_value")

    def __init__(self, sources, versions, context, value, key, projected_value):
        self.sources, self.versions = sources, versions
        self.context, self.value, self.key, self.projected_value = context, value, key, projected_value

    def holds(self, sources, versions, context: torch.Tensor, value: torch.Tensor) -> bool:
        return (versions == self.versions and len(sources) == len(self.sources)
                and all(ref() is source for ref, source in zip(self.sources, sources))
                and _same(self.context, context)
                and (self.value is self.context if value is context else _same(self.value, value)))


def context_projections(attention: nn.Module, context: torch.Tensor,
                        value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attention.to_k(context), attention.to_v(value); the last pair again while nothing they depend on changed."""
    to_k, to_v = attention.to_k, attention.to_v
    state = _state(to_k, to_v)
    if state is None:
        return to_k(context), to_v(value)
    sources, versions = state
    memo = _memos.get(attention)
    if memo is not None and memo.holds(sources, versions, context, value):
        return memo.key, memo.projected_value
    key, projected_value = to_k(context), to_v(value)
    if key.numel() * key.element_size() + projected_value.numel() * projected_value.element_size() > MAX_BYTES:
        _memos.pop(attention, None)
        return key, projected_value
    kept_context = _copy(context)
    kept_value = kept_context if value is context else value.clone()
    _memos[attention] = _Memo(tuple(weakref.ref(source) for source in sources), versions, kept_context, kept_value,
                              key, projected_value)
    return key, projected_value


def _state(*layers: nn.Module) -> tuple[tuple, tuple] | None:
    """The projection layers and their parameters, and the parameters' versions; None where reuse is off."""
    if torch.is_grad_enabled():
        return None
    sources, versions = [], []
    for layer in layers:
        if type(layer) not in _PLAIN_LINEARS or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        sources.append(layer)
        for parameter in (layer.weight, layer.bias):
            if parameter is None:
                continue
            if parameter.is_inference():  # keeps no version: an in-place change could not be seen
                return None
            sources.append(parameter)
            versions.append(parameter._version)
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    return tuple(sources), tuple(versions)


def _copy(context: torch.Tensor) -> torch.Tensor:
    """A copy of `context` for a memo: the one the other layers hold where it is the same."""
    if _last_copy and _same(_last_copy[0], context):
        return _last_copy[0]
    _last_copy[:] = [context.clone()]
    return _last_copy[0]


def _same(kept: torch.Tensor, given: torch.Tensor) -> bool:
    return (kept.shape == given.shape and kept.dtype == given.dtype and kept.device == given.device
            and torch.equal(kept, given))
