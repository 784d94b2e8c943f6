"""CLIP text encoders of Stable Diffusion 1.x, 2.x and XL, plus ComfyUI-style prompt encoding.

One transformer with transformers' parameter names; the text-encoder part of an original single-file
checkpoint loads into it with `load_state_dict(strict=True, assign=True)` once its prefix is stripped, in
either checkpoint layout (config.layout):

  layout "hf"        SD1 `cond_stage_model.transformer.text_model.*`,
                     SDXL `conditioner.embedders.0.transformer.text_model.*`
                     (embeddings.token_embedding, encoder.layers.N.self_attn.q_proj, final_layer_norm, ...):
                     our own names
  layout "openclip"  SD2 `cond_stage_model.model.*`, SDXL `conditioner.embedders.1.model.*`, SDXL refiner
                     `conditioner.embedders.0.model.*`
                     (token_embedding, positional_embedding, transformer.resblocks.N.attn.in_proj_weight, ln_final,
                     text_projection, ...): renamed on loading by from_openclip_key, the fused q/k/v split into
                     views; to_openclip_layout writes it back

Both are pre-norm transformers with a causal mask; CLIP-L uses quick_gelu, the OpenCLIP models gelu.

The family encoders (SD1TextEncoder, SD2TextEncoder, SDXLTextEncoder, SDXLRefinerTextEncoder) take the windows
produced by prompt_weights.tokenize_weighted and return (cond [1, 77 * windows, dim], pooled [1, dim]) the way ComfyUI
does: weighted tokens are pushed away from the empty prompt's encoding, z_empty + (z - z_empty) * weight,
textual-inversion vectors replace token embeddings, and windows are concatenated along the sequence.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..text.prompt_weights import EmbeddingVector, WeightedToken

log = logging.getLogger(__name__)

START_TOKEN_ID = 49406
END_TOKEN_ID = 49407

SD1_CLIP_L_PREFIX = "cond_stage_model.transformer.text_model."
SD2_CLIP_H_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

# Present in many checkpoints but not needed: HF's position-id buffer (corrupted in some merged models,
# so never trusted) and OpenCLIP's contrastive temperature.
UNUSED_CHECKPOINT_KEYS = ("embeddings.position_ids", "logit_scale")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class CLIPTextConfig:
    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str = "quick_gelu"
    layout: str = "hf"  # "hf" or "openclip": the checkpoint's parameter names, see the module docstring
    projection_dim: int | None = None  # width of OpenCLIP's text_projection; None: no projection
    vocab_size: int = 49408
    context_length: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = END_TOKEN_ID

    def __post_init__(self) -> None:
        if self.layout not in ("hf", "openclip"):
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.projection_dim is not None and self.layout != "openclip":
            raise ValueError("a text projection exists only in the openclip layout")

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text tower: SD1.x and SDXL's first encoder."""
        return cls(width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu", layout="hf")

    @classmethod
    def open_clip_h(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14 text tower: SD2.x."""
        return cls(
            width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", layout="openclip", projection_dim=1024
        )

    @classmethod
    def open_clip_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 text tower: SDXL's second encoder."""
        return cls(
            width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", layout="openclip", projection_dim=1280
        )


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """[B, T, width] projections in, [B, T, width] attention output out; causal: token i sees tokens <= i (text),
    else every token sees every token (image patches)."""
    batch, tokens, width = q.shape
    q, k, v = (t.view(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, tokens, width)


# ---- the model -----------------------------------------------------------------------------------


def _embedding(count: int, width: int) -> nn.Embedding:
    """An nn.Embedding without its random init: the weights always come from a checkpoint, and normal_ on the
    meta device makes torch import its Python meta kernels (about 1 s, once per process)."""
    return nn.Embedding(count, width, _weight=torch.empty(count, width))


class _Embeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.context_length, config.width)


# The transformer layers are shared with the CLIP vision tower (networks/clip_vision.py): same names and maths,
# full instead of causal attention. `config` needs width, heads, mlp_width, activation, layer_norm_eps, layers.

class SelfAttention(nn.Module):
    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.heads = config.heads
        self.causal = causal
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.causal))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation]
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, causal) for _ in range(config.layers))


# ---- OpenCLIP checkpoint names -------------------------------------------------------------------

# OpenCLIP name -> ours: whole keys, then (under transformer.resblocks.N. -> encoder.layers.N.) key prefixes.
_OPENCLIP_KEYS = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPENCLIP_BLOCK_PREFIXES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                            "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_OPENCLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OUR_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_OUR_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def from_openclip_key(key: str) -> list[str]:
    """Our name(s) for an OpenCLIP key: one, or the q, k and v parts of a fused attn.in_proj_weight / _bias.
    Any other key comes back unchanged (ours already, or one that strict loading reports)."""
    if key in _OPENCLIP_KEYS:
        return [_OPENCLIP_KEYS[key]]
    if match := _OPENCLIP_BLOCK.match(key):
        block, rest = f"encoder.layers.{match[1]}.", match[2]
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            return [f"{block}self_attn.{part}_proj.{rest[len('attn.in_proj_'):]}" for part in "qkv"]
        for theirs, ours in _OPENCLIP_BLOCK_PREFIXES.items():
            if rest.startswith(theirs):
                return [block + ours + rest[len(theirs) :]]
    return [key]


def to_openclip_key(key: str) -> tuple[str, int | None]:
    """The OpenCLIP key holding our parameter `key`, and which third of a fused in_proj it is (0 q, 1 k, 2 v;
    None: all of it). The inverse of from_openclip_key."""
    for theirs, ours in _OPENCLIP_KEYS.items():
        if key == ours:
            return theirs, None
    if match := _OUR_BLOCK.match(key):
        block, rest = f"transformer.resblocks.{match[1]}.", match[2]
        if qkv := _OUR_QKV.match(rest):
            return f"{block}attn.in_proj_{qkv[2]}", "qkv".index(qkv[1])
        for theirs, ours in _OPENCLIP_BLOCK_PREFIXES.items():
            if rest.startswith(ours):
                return block + theirs + rest[len(ours) :], None
    return key, None


def to_openclip_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights in OpenCLIP's names, q/k/v fused (copied) into in_proj_weight / in_proj_bias."""
    weights: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, part = to_openclip_key(key)
        if part is None:
            weights[name] = value
        else:
            weights.setdefault(name, [value] * 3)[part] = value
    return {key: torch.cat(value) if isinstance(value, list) else value for key, value in weights.items()}


def _load_hook(module: CLIPTextModel, state_dict, prefix, *_) -> None:
    """Drop UNUSED_CHECKPOINT_KEYS and, for the openclip layout, rename (and split: views, no copy) its keys."""
    for key in UNUSED_CHECKPOINT_KEYS:
        state_dict.pop(prefix + key, None)
    if module.config.layout != "openclip":
        return
    for key in [key for key in state_dict if key.startswith(prefix)]:
        names = from_openclip_key(key[len(prefix) :])
        if names != [key[len(prefix) :]]:
            value = state_dict.pop(key)
            state_dict.update(zip((prefix + name for name in names), value.chunk(3) if len(names) == 3 else [value]))


class CLIPTextModel(nn.Module):
    """CLIP text transformer with transformers' parameter names (plus OpenCLIP's text_projection, [width, P]).

    load_state_dict also takes config.layout's checkpoint names (see the module docstring). Construct under
    `torch.device("meta")` and load with assign=True to skip random initialisation (load_text_model does).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.zeros(config.width, config.projection_dim))
        self.register_load_state_dict_pre_hook(_load_hook)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (before positions are added): [B, T] -> [B, T, width]."""
        return self.embeddings.token_embedding(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        hidden_layer: int = -1,
        normalize_hidden: bool = False,
        token_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [B, T, width], pooled [B, projection_dim or width]).

        hidden_layer picks the block whose output is returned, ComfyUI's CLIPSetLastLayer convention:
        -1 the last, -2 the penultimate, ...; non-negative values count from the first block.
        normalize_hidden applies the final layer norm to it (SD1 and SD2 do, SDXL does not).
        token_embeddings, when given, replace the embedding lookup of input_ids (textual inversion);
        input_ids still locate the end token. pooled is the final-normed state at the first end token,
        times text_projection when the model has one.
        """
        blocks = self.encoder.layers
        layer_index = hidden_layer if hidden_layer >= 0 else len(blocks) + hidden_layer
        if not 0 <= layer_index < len(blocks):
            raise ValueError(f"hidden_layer {hidden_layer} out of range for {len(blocks)} layers")
        x = self.embed_tokens(input_ids) if token_embeddings is None else token_embeddings
        x = x + self.embeddings.position_embedding.weight[: input_ids.shape[1]].to(x.dtype)
        hidden = x
        for index, block in enumerate(blocks):
            x = block(x)
            if index == layer_index:
                hidden = x
        normed = self.final_layer_norm(x)
        if normalize_hidden:
            hidden = normed if layer_index == len(blocks) - 1 else self.final_layer_norm(hidden)
        # argmax returns the first maximum: the first end token even when padding repeats it.
        end_positions = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = normed[torch.arange(normed.shape[0], device=normed.device), end_positions]
        if self.config.projection_dim is not None:
            pooled = pooled @ self.text_projection.to(pooled.dtype)
        return hidden, pooled


def load_text_model(
    state_dict: Mapping[str, torch.Tensor],
    config: CLIPTextConfig,
    prefix: str = "",
    dtype: torch.dtype | None = None,
) -> CLIPTextModel:
    """Build a CLIPTextModel from the `prefix`-ed keys of a checkpoint, without random initialisation.

    Every model key must be present and no other key may start with the prefix (strict loading), apart
    from UNUSED_CHECKPOINT_KEYS. Tensors are used as they are (no copy) unless dtype asks for a cast.
    """
    weights = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if dtype is not None:
        weights = {key: value.to(dtype) if value.is_floating_point() else value for key, value in weights.items()}
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---- ComfyUI-style prompt encoding ---------------------------------------------------------------


def empty_window(length: int, pad_token_id: int) -> list[int]:
    """Token ids of the empty prompt, the reference point weights are applied against."""
    return [START_TOKEN_ID, END_TOKEN_ID] + [pad_token_id] * (length - 2)


def _window_ids_and_vectors(
    window: list[WeightedToken], width: int, pad_token_id: int
) -> tuple[list[int], list[float], dict[int, torch.Tensor]]:
    """Ids and weights of one window, with the position -> vector map of its textual-inversion tokens.

    A vector of the wrong width (an embedding made for another model) is dropped and the window is
    refilled with padding at its end, as ComfyUI does.
    """
    ids: list[int] = []
    weights: list[float] = []
    vectors: dict[int, torch.Tensor] = {}
    for token, weight in window:
        if isinstance(token, EmbeddingVector):
            if token.vector.shape[-1] != width:
                log.warning("embedding %r has width %d, not %d; ignoring it", token.name, token.vector.shape[-1], width)
                continue
            vectors[len(ids)] = token.vector
            token = 0  # any id but the end token; its embedding is replaced below
        ids.append(int(token))
        weights.append(float(weight))
    missing = len(window) - len(ids)
    return ids + [pad_token_id] * missing, weights + [1.0] * missing, vectors


@torch.no_grad()
def encode_weighted_windows(
    model: CLIPTextModel,
    windows: list[list[WeightedToken]],
    *,
    pad_token_id: int,
    hidden_layer: int,
    normalize_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's encode of weighted windows with one model -> (cond [1, sum(T), width], pooled [1, P]).

    All windows (and the empty prompt, when any weight differs from 1) run as one batch. pooled comes
    from the first window. Outputs are float32, whatever the model dtype.
    """
    width = model.config.width
    rows = [_window_ids_and_vectors(window, width, pad_token_id) for window in windows]
    ids = [row_ids for row_ids, _, _ in rows]
    weighted = any(weight != 1.0 for _, row_weights, _ in rows for weight in row_weights)
    if weighted or not ids:
        ids.append(empty_window(max((len(row) for row in ids), default=model.config.context_length), pad_token_id))
    if len({len(row) for row in ids}) != 1:
        raise ValueError("all windows must have the same length")

    device = next(model.parameters()).device
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    token_embeddings = None
    if any(vectors for _, _, vectors in rows):
        token_embeddings = model.embed_tokens(input_ids).clone()
        for window_index, (_, _, vectors) in enumerate(rows):
            for position, vector in vectors.items():
                token_embeddings[window_index, position] = vector.to(token_embeddings)

    hidden, pooled = model(
        input_ids, hidden_layer=hidden_layer, normalize_hidden=normalize_hidden, token_embeddings=token_embeddings
    )
    hidden, pooled = hidden.float(), pooled.float()
    if not rows:
        return hidden, pooled
    cond = hidden[: len(rows)]
    if weighted:
        empty = hidden[-1]
        weights = torch.tensor([row_weights for _, row_weights, _ in rows], dtype=torch.float32, device=device)
        weights = weights.unsqueeze(-1)
        cond = torch.where(weights != 1.0, (cond - empty) * weights + empty, cond)
    return cond.reshape(1, -1, width), pooled[:1]


class _SingleTextEncoder(nn.Module):
    """A family's text encoder made of one CLIP model, stored as the attribute `encoder_name` (its checkpoint
    and LoRA target name)."""

    encoder_name = ""
    pad_token_id = 0
    default_layer = -2
    normalize_hidden = True

    def __init__(self, model: CLIPTextModel):
        super().__init__()
        setattr(self, self.encoder_name, model)

    def encode(
        self, windows: list[list[WeightedToken]], hidden_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_weighted_windows(
            getattr(self, self.encoder_name),
            windows,
            pad_token_id=self.pad_token_id,
            hidden_layer=self.default_layer if hidden_layer is None else hidden_layer,
            normalize_hidden=self.normalize_hidden,
        )


class SD1TextEncoder(_SingleTextEncoder):
    """SD1.x: CLIP-L, last layer with the final layer norm (CLIPSetLastLayer may pick an earlier one)."""

    encoder_name = "clip_l"
    pad_token_id = END_TOKEN_ID
    default_layer = -1

    @classmethod
    def from_checkpoint(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        config: CLIPTextConfig | None = None,
    ) -> SD1TextEncoder:
        return cls(load_text_model(state_dict, config or CLIPTextConfig.clip_l(), SD1_CLIP_L_PREFIX, dtype))


class SD2TextEncoder(_SingleTextEncoder):
    """SD2.x: OpenCLIP ViT-H, penultimate layer with the final layer norm; pooled is projected."""

    encoder_name = "clip_h"

    @classmethod
    def from_checkpoint(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        config: CLIPTextConfig | None = None,
    ) -> SD2TextEncoder:
        return cls(load_text_model(state_dict, config or CLIPTextConfig.open_clip_h(), SD2_CLIP_H_PREFIX, dtype))


class SDXLTextEncoder(nn.Module):
    """SDXL: CLIP-L and OpenCLIP bigG, both penultimate without the final norm, features concatenated
    (768 + 1280 = 2048); pooled is bigG's projected pooled output.

    Each model gets its own windows (CLIP-L pads with the end token, bigG with 0, and textual-inversion
    files carry a vector per model). If the window counts differ, the longer sequence is cut.
    """

    pad_token_id_l = END_TOKEN_ID
    pad_token_id_g = 0
    default_layer = -2

    def __init__(self, clip_l: CLIPTextModel, clip_g: CLIPTextModel):
        super().__init__()
        self.clip_l = clip_l
        self.clip_g = clip_g

    @classmethod
    def from_checkpoint(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        config_l: CLIPTextConfig | None = None,
        config_g: CLIPTextConfig | None = None,
    ) -> SDXLTextEncoder:
        return cls(
            load_text_model(state_dict, config_l or CLIPTextConfig.clip_l(), SDXL_CLIP_L_PREFIX, dtype),
            load_text_model(state_dict, config_g or CLIPTextConfig.open_clip_bigg(), SDXL_CLIP_G_PREFIX, dtype),
        )

    def encode(
        self,
        windows_l: list[list[WeightedToken]],
        windows_g: list[list[WeightedToken]],
        hidden_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.default_layer if hidden_layer is None else hidden_layer
        cond_l, _ = encode_weighted_windows(
            self.clip_l, windows_l, pad_token_id=self.pad_token_id_l, hidden_layer=layer, normalize_hidden=False
        )
        cond_g, pooled_g = encode_weighted_windows(
            self.clip_g, windows_g, pad_token_id=self.pad_token_id_g, hidden_layer=layer, normalize_hidden=False
        )
        length = min(cond_l.shape[1], cond_g.shape[1])
        return torch.cat([cond_l[:, :length], cond_g[:, :length]], dim=-1), pooled_g


class SDXLRefinerTextEncoder(_SingleTextEncoder):
    """SDXL refiner: OpenCLIP bigG alone, penultimate layer without the final norm (1280 wide); pooled is its
    projected pooled output."""

    encoder_name = "clip_g"
    normalize_hidden = False
