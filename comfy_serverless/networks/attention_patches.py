"""A transformer block run with ComfyUI's attention patches (the MODEL's transformer_options).

ComfyUI packs and core nodes (HyperTile, PerturbedAttentionGuidance, SelfAttentionGuidance, ...) register these
through ModelPatcher methods; the UNet carries them in ``transformer_options`` and a block with any patch takes this
path instead of its plain forward:

* "attn1_patch" / "attn2_patch": fn(n, context, value, extra_options) -> (n, context, value) before attention;
* "patches_replace"["attn1" / "attn2"][(block, number, block_index) or (block, number)]:
  fn(q, k, v, extra_options) -> attention output before to_out, replacing the attention itself;
* "attn1_output_patch" / "attn2_output_patch": fn(n, extra_options) -> n after attention;
* "middle_patch": fn(x, extra_options) -> x between self- and cross-attention.

``extra_options`` is transformer_options without the patches, plus "n_heads" and "dim_head".
"""

from __future__ import annotations

import torch


def _extra_options(block, transformer_options: dict) -> dict:
    extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra["n_heads"] = block.attn1.heads
    extra["dim_head"] = block.attn1.dim_head
    return extra


def _replacement(replacements: dict, transformer_options: dict):
    block = transformer_options.get("block")
    if block is None:
        return None
    exact = (block[0], block[1], transformer_options.get("block_index", 0))
    return replacements.get(exact, replacements.get(tuple(block)))


def _attention(attention, n, context, value, patches: dict, replacements: dict, name: str, extra: dict,
               transformer_options: dict):
    for patch in patches.get(f"{name}_patch", ()):
        if context is None:
            context = n
        if value is None:
            value = context
        n, context, value = patch(n, context, value, extra)
    replace = _replacement(replacements.get(name, {}), transformer_options)
    if replace is not None:
        context = n if context is None else context
        value = context if value is None else value
        n = attention.to_out(replace(attention.to_q(n), attention.to_k(context), attention.to_v(value), extra))
    else:
        n = attention(n, context, value)
    for patch in patches.get(f"{name}_output_patch", ()):
        n = patch(n, extra)
    return n


def patched_transformer_block(block, x: torch.Tensor, context: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    patches = transformer_options.get("patches") or {}
    replacements = transformer_options.get("patches_replace") or {}
    extra = _extra_options(block, transformer_options)
    # The x4 upscaler's outer blocks attend to the text in attn1 too (ComfyUI's disable_self_attn).
    attn1_context = context if getattr(block, "attn1_attends_to_context", False) else None
    x = x + _attention(block.attn1, block.norm1(x), attn1_context, None, patches, replacements, "attn1", extra,
                       transformer_options)
    for patch in patches.get("middle_patch", ()):
        x = patch(x, extra)
    x = x + _attention(block.attn2, block.norm2(x), context, None, patches, replacements, "attn2", extra,
                       transformer_options)
    return x + block.ff(block.norm3(x))
