"""GLIGEN (Li et al., 2023, "Grounded Language-to-Image Generation"), the text-box variant for SD 1.x.

A GLIGEN file adds two things to a frozen UNet:

* ``position_net``: turns up to 30 (text embedding, box) pairs into grounding tokens. Each box (x0, y0, x1, y1),
  as fractions of the latent, is Fourier-embedded (sin and cos of 8 frequencies per coordinate); unused slots take
  learned null features instead. An MLP maps [text, box features] to a token.
* one gated self-attention "fuser" per transformer block, run between the block's self- and cross-attention:
  the visual tokens attend over themselves plus the grounding tokens, and the result is added through tanh gates
  (zero-initialised in training, so the model starts as the plain UNet).

Parameter names follow the released files (``position_net.linears.0`` ..., ``...fuser.attn.to_q`` ...).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention, FeedForward

MAX_OBJECTS = 30
FOURIER_FREQUENCIES = 8
FOURIER_TEMPERATURE = 100.0
BOX_COORDINATES = 4


def fourier_box_features(boxes: torch.Tensor, frequencies: int = FOURIER_FREQUENCIES,
                         temperature: float = FOURIER_TEMPERATURE) -> torch.Tensor:
    """[..., 4] boxes -> [..., frequencies * 2 * 4]: per frequency f_i = temperature^(i/frequencies), the sines of
    the four coordinates times f_i, then their cosines."""
    bands = temperature ** (torch.arange(frequencies, dtype=torch.float32, device=boxes.device) / frequencies)
    scaled = boxes.unsqueeze(-2) * bands.to(boxes.dtype).unsqueeze(-1)  # [..., frequencies, 4]
    features = torch.stack([scaled.sin(), scaled.cos()], dim=-2)  # [..., frequencies, 2, 4]
    return features.flatten(-3)


class PositionNet(nn.Module):
    """(boxes [B, N, 4], masks [B, N], text embeddings [B, N, in_dim]) -> grounding tokens [B, N, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512):
        super().__init__()
        self.position_dim = FOURIER_FREQUENCIES * 2 * BOX_COORDINATES
        self.linears = nn.Sequential(nn.Linear(in_dim + self.position_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        masks = masks.unsqueeze(-1)
        box_features = fourier_box_features(boxes)
        embeddings = embeddings * masks + (1 - masks) * self.null_positive_feature.view(1, 1, -1)
        box_features = box_features * masks + (1 - masks) * self.null_position_feature.view(1, 1, -1)
        return self.linears(torch.cat([embeddings, box_features], dim=-1))


class GatedSelfAttention(nn.Module):
    """One block's fuser: x + tanh(alpha_attn) * SelfAttn([x, objs])[:visual], then + tanh(alpha_dense) * FF."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = CrossAttention(query_dim, heads, dim_head)
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        visual = x.shape[1]
        objects = self.linear(objects)
        attended = self.attn(self.norm1(torch.cat([x, objects], dim=1)))[:, :visual]
        x = x + torch.tanh(self.alpha_attn) * attended
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


class Gligen(nn.Module):
    """The fusers in UNet transformer order (input blocks, middle, output blocks) and the position net.

    ``set_position`` / ``set_empty`` return ComfyUI's "middle_patch" function for a latent batch shape: the patch
    picks the fuser by the transformer index the UNet reports.
    """

    def __init__(self, fusers: list[GatedSelfAttention], position_net: PositionNet, key_dim: int):
        super().__init__()
        self.module_list = nn.ModuleList(fusers)
        self.position_net = position_net
        self.key_dim = key_dim
        self.max_objs = MAX_OBJECTS

    def _patch(self, boxes: torch.Tensor, masks: torch.Tensor, embeddings: torch.Tensor):
        dtype = self.position_net.null_positive_feature.dtype
        with torch.no_grad():
            objects = self.position_net(boxes.to(dtype), masks.to(dtype), embeddings.to(dtype))

        def middle_patch(x: torch.Tensor, extra_options: dict) -> torch.Tensor:
            index = extra_options["transformer_index"]
            if index >= len(self.module_list):
                raise ValueError(f"GLIGEN has {len(self.module_list)} gated attention blocks, but the UNet asked for "
                                 f"number {index}: is the GLIGEN made for this model family?")
            fuser = self.module_list[index]
            weight_dtype = fuser.linear.weight.dtype
            with torch.no_grad():
                out = fuser(x.to(weight_dtype), objects.to(device=x.device, dtype=weight_dtype))
            return out.to(x.dtype)

        return middle_patch

    def set_position(self, latent_shape, position_params: list, device=None):
        """position_params: (text embedding [1, key_dim], height, width, y, x) in latent pixels per box."""
        if len(position_params) > self.max_objs:
            raise ValueError(f"GLIGEN takes at most {self.max_objs} boxes, got {len(position_params)}")
        batch, _, height, width = latent_shape
        boxes = torch.zeros(self.max_objs, BOX_COORDINATES)
        masks = torch.zeros(self.max_objs)
        embeddings = torch.zeros(self.max_objs, self.key_dim)
        for slot, (embedding, box_h, box_w, box_y, box_x) in enumerate(position_params):
            boxes[slot] = torch.tensor([box_x / width, box_y / height, (box_x + box_w) / width,
                                        (box_y + box_h) / height])
            masks[slot] = 1.0
            embeddings[slot] = embedding.reshape(-1).float().cpu()
        return self._batched_patch(batch, boxes, masks, embeddings, device)

    def set_empty(self, latent_shape, device=None):
        batch = latent_shape[0]
        return self._batched_patch(batch, torch.zeros(self.max_objs, BOX_COORDINATES), torch.zeros(self.max_objs),
                                   torch.zeros(self.max_objs, self.key_dim), device)

    def _batched_patch(self, batch: int, boxes, masks, embeddings, device):
        def repeat(t):
            return t.unsqueeze(0).repeat((batch,) + (1,) * t.ndim).to(device or "cpu")

        return self._patch(repeat(boxes), repeat(masks), repeat(embeddings))


def gligen_from_state_dict(state_dict: dict) -> Gligen:
    """A Gligen built and loaded from a GLIGEN file's tensors; fusers are found under "<block>.<n>. ... .fuser.",
    heads as in SD 1.x (8) when the text width is 768, 64-wide heads otherwise."""
    fusers = []
    key_dim = None
    for block in ("input_blocks", "middle_block", "output_blocks"):
        for number in range(32):
            marker = f"{block}.{number}."
            weights = {key.split(".fuser.", 1)[1]: value for key, value in state_dict.items()
                       if marker in key and ".fuser." in key}
            if not weights:
                continue
            if "linear.weight" not in weights:
                raise ValueError(f"GLIGEN fuser in {block}.{number} has no linear.weight")
            query_dim, key_dim = weights["linear.weight"].shape
            heads = 8 if key_dim == 768 else max(1, query_dim // 64)
            fuser = GatedSelfAttention(query_dim, key_dim, heads, query_dim // heads)
            missing = fuser.load_state_dict(weights, strict=False).missing_keys
            if missing:
                raise ValueError(f"GLIGEN fuser in {block}.{number} lacks {', '.join(missing)}")
            fusers.append(fuser)
    if "position_net.null_positive_feature" not in state_dict or "position_net.linears.4.weight" not in state_dict:
        raise ValueError("not a GLIGEN text-box file: position_net.null_positive_feature / linears.4 missing")
    if not fusers:
        raise ValueError("not a GLIGEN file: no gated self-attention ('.fuser.') weights")
    in_dim = state_dict["position_net.null_positive_feature"].shape[0]
    out_dim = state_dict["position_net.linears.4.weight"].shape[0]
    hidden = state_dict["position_net.linears.0.weight"].shape[0]
    position_net = PositionNet(in_dim, out_dim, hidden)
    position_net.load_state_dict({key[len("position_net."):]: value for key, value in state_dict.items()
                                  if key.startswith("position_net.")})
    gligen = Gligen(fusers, position_net, in_dim)
    return gligen.float().eval()
