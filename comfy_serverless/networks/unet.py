"""The Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL base) in the original LDM layout.

Parameter names equal the single-file checkpoint keys with ``model.diffusion_model.``
stripped, so weights load with ``load_state_dict`` and no renaming:

    time_embed.{0,2}                     timestep MLP
    label_emb.0.{0,2}                    SDXL only: MLP over the pooled-text + size vector
    input_blocks.0.0                     conv_in
    input_blocks.N.0                     ResBlock or Downsample (``.op``)
    input_blocks.N.1                     SpatialTransformer, on levels with attention
    middle_block.{0,1,2}                 ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.0                    ResBlock over [h, skip]
    output_blocks.N.{1,2}                SpatialTransformer and/or Upsample (``.conv``)
    out.{0,2}                            GroupNorm and conv_out
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import (
    BasicTransformerBlock,
    CrossAttention,
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)
from .fast_paths import conv_input, plain_layout_block_patches


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer on each level; 0 means the level has no attention.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    # Exactly one of these is set: a fixed head count (SD 1.x) or a fixed head width (SD 2.x, SDXL).
    num_heads: int | None = 8
    num_head_channels: int | None = None
    use_linear_in_transformer: bool = False
    # Width of the extra conditioning vector ``y`` (SDXL: pooled text + embedded sizes); None = unused.
    adm_in_channels: int | None = None
    # Class-label embedding (label_emb.weight): the x4 upscaler's noise level as y; None = unused.
    num_classes: int | None = None
    # Per level: True where attn1 attends to the text context instead of itself (the x4 upscaler); () = none.
    cross_attention_only: tuple[bool, ...] = ()

    def __post_init__(self):
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        if self.cross_attention_only and len(self.cross_attention_only) != len(self.channel_mult):
            raise ValueError("cross_attention_only needs one entry per channel_mult level (or none)")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("set at most one of num_classes and adm_in_channels")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a SpatialTransformer working on ``channels`` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        """SD 2.x, both the 512 epsilon and the 768 v-prediction models."""
        return cls(context_dim=1024, num_heads=None, num_head_channels=64, use_linear_in_transformer=True)

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls(
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            context_dim=2048,
            num_heads=None,
            num_head_channels=64,
            use_linear_in_transformer=True,
            adm_in_channels=2816,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL refiner: no attention on the first and last levels; y is pooled bigG text (1280) plus height,
        width, crop top, crop left and aesthetic score embedded 256 wide each (2560)."""
        return cls(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(0, 4, 4, 0),
            transformer_depth_middle=4,
            context_dim=1280,
            num_heads=None,
            num_head_channels=64,
            use_linear_in_transformer=True,
            adm_in_channels=2560,
        )


def sdxl_adm_vector(
    pooled_text: torch.Tensor, size_conditioning: torch.Tensor, size_embed_dim: int = 256
) -> torch.Tensor:
    """Build SDXL's ``y``: pooled text embedding followed by the embedded size conditioning.

    ``size_conditioning`` is [B, 6]: original height, original width, crop top, crop left,
    target height, target width (in pixels). Each number gets a sinusoidal embedding of
    ``size_embed_dim`` (256 for SDXL base, giving 1280 + 6 * 256 = 2816 channels).
    """
    batch = size_conditioning.shape[0]
    sizes = timestep_embedding(size_conditioning.reshape(-1), size_embed_dim).reshape(batch, -1)
    return torch.cat([pooled_text, sizes.to(pooled_text.dtype)], dim=1)


class UNetBlock(nn.ModuleList):
    """A list of layers run in order, each given the inputs it needs (emb, context or output size)."""

    def forward(self, x, emb, context, output_size=None, transformer_options=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                if transformer_options is not None:
                    transformer_options["transformer_index"] = transformer_options.get("transformer_index", 0) + 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    CALLED_PER_STEP = True  # cpu_kernels packs its weights at the first call

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        cfg = config
        emb_dim = cfg.time_embed_dim

        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            # Nested Sequential because checkpoints name these label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        elif cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def transformer(channels: int, depth: int, level: int | None = None) -> SpatialTransformer:
            heads, dim_head = cfg.attention_heads(channels)
            block = SpatialTransformer(channels, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)
            if level is not None and cfg.cross_attention_only and cfg.cross_attention_only[level]:
                block.transformer_blocks = nn.ModuleList(
                    CrossOnlyTransformerBlock(heads * dim_head, heads, dim_head, cfg.context_dim) for _ in range(depth))
            return block

        channels = cfg.model_channels
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(cfg.in_channels, channels, 3, padding=1)])])
        skip_channels = [channels]
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            depth = cfg.transformer_depth[level]
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(channels, emb_dim, cfg.model_channels * mult)]
                channels = cfg.model_channels * mult
                if depth > 0:
                    layers.append(transformer(channels, depth, level))
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(channels)
            if level != last_level:
                self.input_blocks.append(UNetBlock([Downsample(channels)]))
                skip_channels.append(channels)

        self.middle_block = UNetBlock([
            ResBlock(channels, emb_dim, channels),
            transformer(channels, cfg.transformer_depth_middle),
            ResBlock(channels, emb_dim, channels),
        ])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            depth = cfg.transformer_depth[level]
            for index in range(cfg.num_res_blocks + 1):
                out_channels = cfg.model_channels * cfg.channel_mult[level]
                layers = [ResBlock(channels + skip_channels.pop(), emb_dim, out_channels)]
                channels = out_channels
                if depth > 0:
                    layers.append(transformer(channels, depth, level))
                if level != 0 and index == cfg.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control: dict | None = None,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for latents ``x`` [B, C, H, W] at ``timesteps`` [B] (or a scalar).

        ``context`` is the text encoder output [B, tokens, context_dim]; ``y`` the SDXL
        conditioning vector [B, adm_in_channels] (see ``sdxl_adm_vector``). Inputs are cast
        to the model's dtype; the output has that dtype too.

        ``control`` (ControlNet residuals, ComfyUI's form) adds ``control["input"].pop()`` after each input
        block, ``control["middle"].pop()`` after the middle block and ``control["output"].pop()`` to each skip
        before it is concatenated. ``transformer_options`` carries ComfyUI's model patches: its "patches"
        "input_block_patch", "input_block_patch_after_skip" (fn(h, options) -> h) and "output_block_patch"
        (fn(h, skip, options) -> (h, skip)) run here, attention patches in the transformer blocks
        (attention_patches.py); "block" tells them where they are.
        """
        dtype = self.dtype
        x = x.to(dtype)
        context = context.to(dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])

        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet needs the conditioning vector y")
            emb = emb + self.label_emb(y.to(dtype))
        elif self.config.num_classes is not None:
            if y is None:
                raise ValueError("this UNet needs class labels y (the x4 upscaler: its noise level)")
            emb = emb + self.label_emb(y.reshape(-1).round().long().to(x.device)).to(dtype)

        options = None if transformer_options is None else dict(transformer_options)
        patches = plain_layout_block_patches((options or {}).get("patches") or {})
        if options is not None:
            options["original_shape"] = list(x.shape)
            options["transformer_index"] = 0
        skips = []
        h = conv_input(x)  # channels_last activations (fast_paths.py)
        for index, block in enumerate(self.input_blocks):
            if options is not None:
                options["block"] = ("input", index)
            h = _add_control(block(h, emb, context, transformer_options=options), control, "input")
            for patch in patches.get("input_block_patch", ()):
                h = patch(h, options)
            skips.append(h)
            for patch in patches.get("input_block_patch_after_skip", ()):
                h = patch(h, options)
        if options is not None:
            options["block"] = ("middle", 0)
        h = _add_control(self.middle_block(h, emb, context, transformer_options=options), control, "middle")
        for index, block in enumerate(self.output_blocks):
            if options is not None:
                options["block"] = ("output", index)
            skip = _add_control(skips.pop(), control, "output")
            for patch in patches.get("output_block_patch", ()):
                h, skip = patch(h, skip, options)
            h = torch.cat([h, skip], dim=1)
            # An upsample must land exactly on the next skip's size (odd latent sizes).
            next_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, output_size=next_size, transformer_options=options)
        return self.out(h).contiguous()  # back to NCHW for callers that .view() (fast_paths.py)


class CrossOnlyTransformerBlock(BasicTransformerBlock):
    """A transformer block whose first attention also attends to the text context (ComfyUI's
    disable_self_attn, diffusers' only_cross_attention): the x4 upscaler's outer levels."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__(dim, heads, dim_head, context_dim)
        self.attn1 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)

    attn1_attends_to_context = True  # read by attention_patches.patched_transformer_block

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        if transformer_options and (transformer_options.get("patches") or transformer_options.get("patches_replace")):
            from .attention_patches import patched_transformer_block

            return patched_transformer_block(self, x, context, transformer_options)
        x = x + self.attn1(self.norm1(x), context)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _add_control(h: torch.Tensor, control: dict | None, name: str) -> torch.Tensor:
    """Add the next ControlNet residual for this place (popped from the end of its list), if any."""
    if not control or not control.get(name):
        return h
    residual = control[name].pop()
    if residual is None:
        return h
    if residual.shape != h.shape:
        raise ValueError(f"ControlNet {name} residual of shape {tuple(residual.shape)} does not fit the UNet's "
                         f"{tuple(h.shape)}: is the ControlNet made for this model family?")
    return h + residual.to(h.dtype)
