"""Faster CPU kernels for every Conv2d and Linear of a built network: pre-packed oneDNN weights, Winograd
(NNPACK) for large 3x3 fp32 convolutions, and Winograd with a transformed weight (winograd.py) for medium ones
where oneDNN has only AVX2. All are torch operations; nothing is compiled.

Why (measured on the project's AMD EPYC, 2 threads, torch 2.13.0, 2026-12-01; "AVX2" = the same CPU with torch
and oneDNN capped at AVX2 by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, standing in for an AVX2-only CPU):
- F.conv2d / F.linear hand oneDNN a plain weight, which it reorders into its blocked layout on every call.
  For the UNet's deep levels (1280 channels at 8x8) the reorder costs more than the arithmetic: conv 3x3
  118 -> 257 GFLOP/s (AVX2), 145 -> 451 (AVX-512 fp32), 505 -> 1021 (bf16) with the weight packed once;
  linears 155-235 -> 246-278 (AVX2), 200-236 -> 443-542 (AVX-512 fp32), ~1.1x in bf16. A UNet step spends 65 %
  of its time in convolutions and 26 % in linears.
- A 3x3 convolution over a large image does 2.25-4x fewer multiplications as a Winograd transform. torch's
  NNPACK (AVX2 code) runs the VAE decoder's convolutions at 520-750 effective GFLOP/s where oneDNN fp32 gets
  200-270 (AVX2) or 320-500 (AVX-512); over small images (<= 32x32) it is slower than oneDNN, hence the size
  floor. Its results differ from a direct convolution by ~1e-5 relative (fp32 rounding; bf16 is ~4e-3).

Packing is lazy and follows the weight: it happens at the first call of a network run every sampling step
(UNet, ControlNet; see use_fast_kernels), and later calls reuse it while the weight object and its version stay
the same; a LoRA or any patch replaces the parameter (models/patching.py), so the packed copy is dropped with it.
A packed copy would double the weights' memory, so only weights that are a file mapping and never written
(prepared weights, or a file already in the compute dtype) are packed, and their pages are dropped after
packing: the kernel no longer reads them, and anything that does (a LoRA, a state dict) reads them back from the
page cache. Weights in process memory (converted at load, patched) run unpacked unless COMFY_CPU_KERNELS=all,
which packs them too and keeps both.

`comfy-serverless prepare` writes what a UNet's layers packed at one step (packed_weights_of) and the loader
hands the mapped bytes back to the layers (adopt_packed_weights, models/prepared_packs.py): the first step then
packs nothing, except layers whose layout oneDNN picks by input shape, called at a shape the prepared one does
not fit (they pack at that first call, as without the file).

Where the network computes in fp32 from an fp16 checkpoint (AVX2-only CPUs, --force-fp32), every packed value is
an fp16 value: the packed file then holds the oneDNN bytes, and a Winograd layer's 3x3 taps instead of its 16/9
larger transform, as fp16, and each call first expands its layer's into one fp32 buffer the network's layers
share (_HeldAsHalf; the largest layer's size, 120 MB for SD1.5): the same bytes, so the same results bit for bit
(except Winograd layers over images from 32x32, whose taps expand into F(4x4)'s weight where the buffer has room:
the same to fp32 rounding), at half the resident memory. Measured under the AVX2 cap (SD1.5, 256 px, 2026-12-01,
side by side with ComfyUI): peak RSS 4.65 -> 2.91 GB (packed file 3.7 -> 1.7 GB), for about 0.1 s per UNet step
(expanding 1.6 GB of oneDNN bytes 0.06 s, the Winograd transforms 0.03 s). `prepare` keeps the largest oneDNN
weights fp32 within a share of that memory (prepared_packs.FP32_KEPT_SHARE).

On AVX2, and with AVX-512 where a timing says so (winograd_choice.py), the every-step networks' 3x3 fp32
convolutions over 16x16 to 32x32 images keep a Winograd-transformed weight instead of the packed one (winograd.py:
1.3-1.5x faster on AVX2). It is 16/9 of the weight's size, so those of one network may add at most
WINOGRAD_EXTRA_MEMORY of its weights' bytes (SD1.5 at 256 px: all of them, +230 MB, 7 % of the fp32 UNet; at
512 px the first ones called); past that a layer packs as above.

Where a timing says so (winograd_choice.large_tiles_sizes: with AVX-512, and at 32x32 with MKL at AVX2), fp32
3x3 convolutions over images from 32x32 that do not pack (the VAE; a UNet at 512 px and up) take F(4x4) Winograd
(winograd.convolve_large) before NNPACK: on the Xeon capped at AVX-512 a 256 px VAE decode took 1.46 instead of
2.07 s (medians of 5, alternating in one process, 2026-12-02), its image within 8.5e-6 relative of NNPACK's; with
the weight transformed from its view (winograd.transform) 0.64x of NNPACK's time, and 0.90x with MKL capped at
AVX2, where only the 32x32 level gains (medians of 8 alternating rounds, 2026-12-02).

Gradients, torch.compile (TorchCompileModel: inductor packs weights itself), other devices and dtypes, and
string/reflect padding take the stock path.
COMFY_CPU_KERNELS: auto (default), all (also pack weights in process memory), packed (no Winograd), 0 (off).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref

import torch
from torch import nn

from . import onednn_blobs, winograd, winograd_choice
from .file_pages import in_unwritten_file_mapping, release_file_pages

log = logging.getLogger(__name__)

ENV = "COMFY_CPU_KERNELS"
_DTYPES = (torch.float32, torch.bfloat16)
# NNPACK Winograd from this many output pixels on: 64x64 where oneDNN has only AVX2 or its AVX-512 direct
# convolution is no faster (winograd_choice.py), else 128x128.
WINOGRAD_MIN_PIXELS_AVX2 = 64 * 64
WINOGRAD_MIN_PIXELS_AVX512 = 128 * 128
# Packed convolutions up to this many input pixels (batch x height x width); over it the weight reorder is a
# small part of the call and oneDNN's own choice of layout was as fast or faster (bf16 at 2x64x64: 1067 stock
# vs 871 GFLOP/s packed; VAE decode 256 px 0.64 s stock vs 0.71 s all packed).
PACK_MAX_PIXELS = 4096
# Transformed Winograd weights (AVX2) from this many pixels per image on (up to NNPACK's floor); the memory they
# may add, as a fraction of the network's weight bytes.
WINOGRAD_WEIGHTS_MIN_PIXELS = 16 * 16
# fp16-held Winograd taps expand into F(4x4)'s weight instead of F(2x2)'s from this many pixels per image: with
# fp16-held taps (transformed at each call) 2x320->320 at 32x32 took 12.3 instead of 18.0 ms, 2x640->640 44.3
# instead of 64.6 (Xeon capped at AVX2, MKL too), 7.7 / 10.2 and 41.7 / 47.2 ms capped at AVX-512; at 16x16 a tie.
WINOGRAD_LARGE_TILE_MIN_PIXELS = 32 * 32
WINOGRAD_EXTRA_MEMORY = 0.10


@functools.cache
def _mode() -> str:
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("0", "false", "no", "off", "none"):
        return "off"
    return setting if setting in ("packed", "all") else "auto"


@functools.cache
def _winograd_min_pixels() -> int | None:
    """None where Winograd is off or NNPACK is missing; else the size floor: AVX2's where oneDNN's direct
    convolution is no faster than Winograd products (AVX2, and AVX-512 CPUs where the timing says so)."""
    if _mode() not in ("auto", "all") or not torch._nnpack_available():  # the call also initialises NNPACK
        return None
    return WINOGRAD_MIN_PIXELS_AVX2 if transformed_winograd() else WINOGRAD_MIN_PIXELS_AVX512


@functools.cache
def large_tiles_sizes() -> frozenset[int]:
    """Pixels per image (winograd_choice.LARGE_TIMED_SIZES) where unpacked fp32 3x3 convolutions take F(4x4)
    Winograd (winograd.convolve_large) instead of NNPACK or oneDNN, each from that size to the next one timed;
    none where kernels are off or `packed`."""
    return winograd_choice.large_tiles_sizes() if _mode() in ("auto", "all") else frozenset()


def large_tiles_at(pixels: int) -> bool:
    """Whether an image of `pixels` per channel falls in a size band where F(4x4) won (large_tiles_sizes)."""
    timed = [size * size for size in winograd_choice.LARGE_TIMED_SIZES if size * size <= pixels]
    return bool(timed) and max(timed) in large_tiles_sizes()


@functools.cache
def transformed_winograd() -> bool:
    """Where torch runs AVX2 code, and with AVX-512 where a timing says so (winograd_choice.py)."""
    return _mode() in ("auto", "all") and winograd_choice.transformed_weights_pay()


class _MemoryBudget:
    """Bytes the transformed Winograd weights of one network may add over its weights."""

    def __init__(self, nbytes: float):
        self.left = nbytes

    def take(self, nbytes: float) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class _Packed:
    """A weight packed for oneDNN (or Winograd-transformed), valid while the parameter object and its version are
    unchanged."""

    __slots__ = ("source", "version", "packed", "uses", "eligible", "charge", "backing", "shape", "fits", "held")

    def __init__(self, weight: torch.Tensor):
        self.source = weakref.ref(weight)
        self.version = weight._version
        self.packed: torch.Tensor | winograd.WinogradWeight | None = None
        self.uses = 0
        self.eligible: bool | None = None  # decided once, at the call that would pack
        self.charge: tuple[_MemoryBudget, float] | None = None  # what a transformed weight took from the budget
        self.backing: torch.Tensor | None = None  # the mapped bytes a prepared packed weight lies in
        self.shape: tuple[int, ...] | None = None  # the input shape (rows for a linear) it was packed for
        self.fits: frozenset[tuple[int, ...]] | None = None  # a prepared one: input shapes its layout is right for
        self.held: _HeldAsHalf | None = None  # a prepared fp32 one held as fp16, expanded at each call

    def drop(self) -> None:
        if self.charge is not None:
            budget, nbytes = self.charge
            budget.left += nbytes
            self.charge = None
        self.packed = None
        self.backing = None
        self.shape = None
        self.fits = None
        self.held = None

    def matches(self, weight: torch.Tensor) -> bool:
        return self.source() is weight and self.version == weight._version


class _HeldAsHalf:
    """A prepared fp32 weight that the packed file holds as fp16 (exactly: the values of an fp16 checkpoint), expanded
    before each call into a buffer shared by the network's layers: oneDNN-packed bytes as they are, Winograd taps
    [9, out * in] through winograd.transform; for large images (WINOGRAD_LARGE_TILE_MIN_PIXELS) into F(4x4)'s
    36 rows where the shared buffer has room (`room`, the whole buffer; the taps lie at its end)."""

    __slots__ = ("half", "room", "channels", "into", "taps")

    def __init__(self, half: torch.Tensor, room: torch.Tensor, channels: tuple[int, int] | None = None):
        """`channels` (out, in) for Winograd taps [9, out * in]; None for oneDNN-packed bytes."""
        self.half, self.room, self.channels = half, room, channels
        if channels is None:
            self.into, self.taps = room[:half.numel()], None
        else:
            count = channels[0] * channels[1]
            self.into = room[:winograd.TRANSFORMED_ROWS * count].view(winograd.TRANSFORMED_ROWS, count)
            self.taps = room[room.numel() - 9 * count:].view(9, count)

    def expand(self, large_tiles: bool = False) -> winograd.WinogradWeight | None:
        """Expands the weight; for Winograd taps at large_tiles, returns the F(4x4) weight where there is room."""
        if self.taps is None:
            self.into.copy_(self.half)
            return None
        self.taps.copy_(self.half)
        count = self.taps.shape[1]
        rows = winograd.LARGE_TRANSFORMED_ROWS
        if large_tiles and self.room.numel() >= (rows + 9) * count:
            large = self.room[:rows * count].view(rows, count)
            winograd.transform(self.taps, out=large, tile=winograd.LARGE_TILE)
            return winograd.WinogradWeight.from_transformed(large.view(rows, *self.channels))  # type: ignore[misc]
        winograd.transform(self.taps, out=self.into)
        return None


# Kept beside the layers, not in them: a deep copy or pickle of a network (packs do both) must not meet oneDNN's
# opaque tensors, and a copy packs its own weights anyway.
_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_weight(layer: nn.Module) -> torch.Tensor | winograd.WinogradWeight | None:
    """The packed (or Winograd-transformed) weight `layer` computes with now; None while it takes the stock path."""
    state = _packs.get(layer)
    return state.packed if state is not None and state.matches(layer.weight) else None


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_mode() != "off" and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in _DTYPES and weight.dtype == x.dtype
            and not weight.requires_grad and not (torch.is_grad_enabled() and x.requires_grad)
            and not weight.is_meta)


def _packed_weight(layer: nn.Module, pack, shape: tuple[int, ...], large_tiles: bool = False):
    """The packed weight from the layer's packing call on (its _cpu_pack_after-th with this weight); None before,
    for weights that stay unpacked (see module doc), and for weights made under inference_mode (they keep no
    version counter, so an in-place change could not be seen). `shape` is the input's (rows for a linear): a
    prepared weight packed for another one, in a layout that depends on it, is packed again at its first call."""
    if layer.weight.is_inference():
        return None
    state = _packs.get(layer)
    if state is None or not state.matches(layer.weight):
        if state is not None:
            state.drop()
        state = _packs[layer] = _Packed(layer.weight)
    state.uses += 1
    if state.uses == 1 and state.fits is not None and shape not in state.fits:
        state.drop()
    after = layer.__dict__.get("_cpu_pack_after")
    if state.packed is None and after is not None and state.uses >= after:
        if state.eligible is None:
            state.eligible = _mode() == "all" or in_unwritten_file_mapping(layer.weight)
        if state.eligible:
            try:
                state.packed = pack(state)
                state.shape = shape
            except RuntimeError as error:  # e.g. bf16 forced on a CPU without AVX-512 (oneDNN has no packing)
                log.debug("%s stays unpacked: %s", type(layer).__name__, error)
                state.eligible = False
                return None
            release_file_pages(layer.weight)
    if state.held is not None:
        return state.held.expand(large_tiles) or state.packed
    return state.packed


class FastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or isinstance(self.padding, str) or self.padding_mode != "zeros"
                or not _usable(x, self.weight) or (self.bias is not None and self.bias.dtype != x.dtype)):
            return super().forward(x)
        bias = self.bias
        if self._large_tiles(x):
            return winograd.convolve_large(x, self.weight, bias)
        if self._nnpack_winograd(x):
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, bias, list(self.padding))
        if x.shape[0] * x.shape[2] * x.shape[3] > PACK_MAX_PIXELS:
            return super().forward(x)
        packed = _packed_weight(self, lambda state: self._pack(x, state), tuple(x.shape),
                                x.shape[2] * x.shape[3] >= WINOGRAD_LARGE_TILE_MIN_PIXELS)
        if packed is None:
            return super().forward(x)
        if isinstance(packed, winograd.WinogradWeight):
            return winograd.convolve(x, packed, bias)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, "none", [], "")

    def _pack(self, x: torch.Tensor, state: _Packed):
        budget = self.__dict__.get("_winograd_budget")
        if budget is not None and self._winograd_weights(x):
            extra = (winograd.SIZE_FACTOR - 1) * self.weight.numel() * self.weight.element_size()
            if budget.take(extra):
                state.charge = (budget, extra)
                return winograd.WinogradWeight(self.weight)
        return _pack_convolution(self, tuple(x.shape))

    def _plain_3x3(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.float32 and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1)

    def _large_tiles(self, x: torch.Tensor) -> bool:
        """F(4x4) Winograd for large images where nothing packs (see large_tiles_sizes)."""
        if not self._plain_3x3(x) or tuple(self.padding) != (1, 1):  # first: bf16 networks never time it
            return False
        if (self.__dict__.get("_cpu_pack_after") is not None
                and x.shape[0] * x.shape[2] * x.shape[3] <= PACK_MAX_PIXELS):
            return False  # packs (or keeps a Winograd weight) instead
        return large_tiles_at(x.shape[2] * x.shape[3])

    def _nnpack_winograd(self, x: torch.Tensor) -> bool:
        if not self._plain_3x3(x):  # first: bf16 networks never ask for the floor (nor time its choice)
            return False
        floor = _winograd_min_pixels()
        return floor is not None and x.shape[2] * x.shape[3] >= floor

    def _winograd_weights(self, x: torch.Tensor) -> bool:
        """Whether this layer at x's size keeps a Winograd-transformed weight (winograd.py) if the budget allows."""
        return (transformed_winograd() and self._plain_3x3(x) and tuple(self.padding) == (1, 1)
                and x.shape[2] * x.shape[3] >= WINOGRAD_WEIGHTS_MIN_PIXELS)


class FastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or not _usable(x, self.weight) or (self.bias is not None and self.bias.dtype != x.dtype):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        packed = _packed_weight(self, lambda _state: _pack_linear(self.weight, rows), (rows,))
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def _pack_convolution(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_convolution_weight(layer.weight, list(layer.padding), list(layer.stride),
                                                        list(layer.dilation), layer.groups, list(shape))


def _pack_linear(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


_FAST = {nn.Conv2d: FastConv2d, nn.Linear: FastLinear}


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Makes every plain nn.Conv2d / nn.Linear in `model` one of the classes above (same parameters, state
    dict and isinstance; only forward differs). Subclasses with their own forward are left alone. Only networks
    run once per sampling step (class attribute CALLED_PER_STEP: UNet, ControlNet) pack, at their first call;
    the others (text encoders, VAE, adapters) run once per prompt or image, where a reorder per call is cheap
    next to a packed copy held in process memory (their Winograd convolutions still apply)."""
    if _mode() == "off":
        return model
    every_step = getattr(model, "CALLED_PER_STEP", False)
    pack_after = 1 if every_step else None
    budget = None
    if every_step:
        budget = _MemoryBudget(WINOGRAD_EXTRA_MEMORY * sum(p.numel() * p.element_size() for p in model.parameters()))
    for module in model.modules():
        fast = _FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
            module.__dict__["_cpu_pack_after"] = pack_after
            if fast is FastConv2d:
                module.__dict__["_winograd_budget"] = budget
    return model




def packed_weights_of(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What `model`'s layers compute with now (views of their packed weights, valid while `model` lives), for
    `prepare` to write (models/prepared_packs.py): {weight's
    parameter name: {"winograd": transformed weight} or {"onednn": bytes, "descriptor": bytes[, "fits": the input
    shapes this layout is right for, where oneDNN packs the weight differently for some other batch size or
    resolution]}}. Run once per image build: each packed weight is packed again at nearby input shapes (batch 1,
    2, 4 at half, the same and twice the resolution) to find those."""
    found = {}
    for name, layer in model.named_modules():
        state = _packs.get(layer)
        packed = packed_weight(layer)
        if isinstance(packed, winograd.WinogradWeight):
            found[f"{name}.weight"] = {"winograd": packed.transformed, "taps": winograd.taps(layer.weight)}
        elif packed is not None and state is not None and state.shape is not None:
            data, descriptor = onednn_blobs.to_bytes(packed)
            parts = {"onednn": data, "descriptor": descriptor}
            others = _other_shapes(state.shape)
            fits = [state.shape] + [other for other in others if _packs_the_same(layer, other, data)]
            release_file_pages(layer.weight)  # read again by the packing: not kept (SD1.5 fp32: 2.8 GB)
            if len(fits) <= len(others):
                parts["fits"] = torch.tensor(fits, dtype=torch.int64)
            found[f"{name}.weight"] = parts
    return found


def _other_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Batch 1, 2 and 4 at half, the same and twice the resolution; for a linear a quarter, half, twice and 4x the
    rows (and 1 to 4 rows for one that sees a row per image: oneDNN packs for a single row differently)."""
    if len(shape) == 1:
        rows = shape[0]
        others = {max(2, rows // 4), max(2, rows // 2), rows * 2, rows * 4} | ({1, 2, 3, 4} if rows <= 4 else set())
        return sorted((other,) for other in others - {rows})
    _, channels, height, width = shape
    shapes = {(batch, channels, max(1, int(height * scale)), max(1, int(width * scale)))
              for batch in (1, 2, 4) for scale in (0.5, 1, 2)}
    return sorted(shapes - {tuple(shape)})


def _packs_the_same(layer: nn.Module, shape: tuple[int, ...], data: torch.Tensor) -> bool:
    """Whether the layer's weight packed now for input `shape` is byte for byte `data`."""
    if isinstance(layer, FastLinear):
        packed = _pack_linear(layer.weight, shape[0])
    else:
        packed = _pack_convolution(layer, shape)
    return torch.equal(onednn_blobs.to_bytes(packed)[0], data)  # while `packed` lives


def layout_probe(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The smallest oneDNN-packed weight of `packed` whose layout holds for any input shape (it is packed again at
    load to tell whether this CPU packs like the one `prepare` ran on; adopt_packed_weights)."""
    layers = dict(model.named_modules())
    candidates = sorted((parts["onednn"].numel(), name) for name, parts in packed.items()
                        if "onednn" in parts and "fits" not in parts)
    for _, name in candidates:
        layer = layers.get(name.removesuffix(".weight"))
        same = layer is not None and _packs_the_same(layer, _probe_shape(layer), packed[name]["onednn"])
        if layer is not None:
            release_file_pages(layer.weight)
        if same:
            return name
    return None


def _probe_shape(layer: nn.Module) -> tuple[int, ...]:
    return (2,) if isinstance(layer, FastLinear) else (2, layer.weight.shape[1] * layer.groups, 8, 8)


def adopt_packed_weights(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]], probe: str) -> int:
    """Gives `model`'s every-step layers the packed weights of packed_weights_of, mapped from a file and not copied,
    so that their first call packs nothing; returns how many layers took one. Only layers whose weight is still
    the unwritten file mapping take one (a patched weight is another tensor and drops it, like a lazily packed
    one). `probe` (layout_probe) is packed again now and compared byte for byte: oneDNN's layout follows the CPU
    (8-wide blocks with AVX2, 16 with AVX-512), and weights packed on another CPU class would be reordered at
    every call; then nothing is adopted (0) and the layers pack at their first call as without the file."""
    if _mode() == "off" or not onednn_blobs.available():
        return 0
    layers = {f"{name}.weight": layer for name, layer in model.named_modules()
              if isinstance(layer, (FastConv2d, FastLinear)) and layer.__dict__.get("_cpu_pack_after") is not None}
    probe_layer = layers.get(probe)
    if probe_layer is None or "onednn" not in packed.get(probe, {}):
        return 0
    same = _packs_the_same(probe_layer, _probe_shape(probe_layer), _fp32_bytes(packed[probe]["onednn"]))
    release_file_pages(probe_layer.weight)
    if not same:
        log.warning("prepared packed weights were made on another CPU class (oneDNN packs them differently "
                    "here): packing at the first call instead; run `comfy-serverless prepare` on this CPU class")
        return 0
    shared = _shared_buffer(packed)
    adopted = 0
    for name, parts in packed.items():
        layer = layers.get(name)
        if layer is None or layer.weight.is_inference() or not in_unwritten_file_mapping(layer.weight):
            continue
        state = _Packed(layer.weight)
        state.eligible = True
        if "winograd" in parts or "taps" in parts:
            if not _adopt_winograd(layer, parts, state, shared):
                continue
        else:
            data = parts["onednn"]
            if data.dtype == torch.float16:
                if shared is None or layer.weight.dtype != torch.float32:
                    continue
                state.held = _HeldAsHalf(data, shared)
                data = state.held.into.view(torch.uint8)
            state.packed = onednn_blobs.from_bytes(data, parts["descriptor"], layer.weight.shape, layer.weight.dtype)
            state.backing = data
            if "fits" in parts:
                state.fits = frozenset(tuple(shape) for shape in parts["fits"].tolist())
        _packs[layer] = state
        adopted += 1
    return adopted


def release_packed_file_pages() -> None:
    """Drops the resident pages of every packed weight that lies in a file (prepared packs: oneDNN bytes, fp16-held
    weights and taps, transformed Winograd weights). Called before a VAE pass, the prompt's memory peak, while the
    networks run every step are idle: their next call reads the pages back from the page cache (see
    models/vae_model.py for what it bought). Heap memory (weights packed at a call) is kept."""
    for state in list(_packs.values()):
        if state.held is not None:
            release_file_pages(state.held.half)
        elif isinstance(state.packed, winograd.WinogradWeight):
            release_file_pages(state.packed.transformed)
        elif state.backing is not None:
            release_file_pages(state.backing)


def exact_in_half(values: torch.Tensor) -> bool:
    """Whether fp32 values are all fp16 values (an fp16 checkpoint's weights, and their packed bytes, are), so that
    fp16 holds them exactly."""
    return values.dtype == torch.float32 and torch.equal(values.to(torch.float16).to(torch.float32), values)


def _shared_buffer(packed: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """One fp32 buffer for the network's fp16-held weights to expand into, the size of the largest (a Winograd one
    needs its taps and its transform); its pages are taken at the first call."""
    sizes = [parts["onednn"].numel() for parts in packed.values()
             if "onednn" in parts and parts["onednn"].dtype == torch.float16]
    sizes += [parts["taps"].shape[1] * (winograd.TRANSFORMED_ROWS + 9) for parts in packed.values() if "taps" in parts]
    return torch.empty(max(sizes), dtype=torch.float32) if sizes else None


def _fp32_bytes(data: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float32).view(torch.uint8) if data.dtype == torch.float16 else data


def _adopt_winograd(layer: nn.Module, parts: dict[str, torch.Tensor], state: _Packed,
                    shared: torch.Tensor | None) -> bool:
    """A prepared Winograd weight, where this server would transform one (AVX2, not `packed`): fp16 taps (adding
    no memory but a share of the buffer they expand into) or, where the network's memory bound still allows it,
    the transformed weight."""
    budget = layer.__dict__.get("_winograd_budget")
    out_channels, in_channels = layer.weight.shape[:2]
    if not transformed_winograd() or budget is None or layer.weight.dtype != torch.float32:
        return False
    if "taps" in parts:
        taps, count = parts["taps"], out_channels * in_channels
        if shared is None or taps.dtype != torch.float16 or tuple(taps.shape) != (9, count):
            return False
        state.held = _HeldAsHalf(taps, shared, (out_channels, in_channels))
        state.packed = winograd.WinogradWeight.from_transformed(state.held.into.view(-1, out_channels, in_channels))
        return True
    transformed = parts["winograd"]
    if transformed.dtype != torch.float32 or tuple(transformed.shape) != (winograd.TRANSFORMED_ROWS, out_channels,
                                                                           in_channels):
        return False
    extra = (winograd.SIZE_FACTOR - 1) * layer.weight.numel() * layer.weight.element_size()
    if not budget.take(extra):
        return False
    state.charge = (budget, extra)
    state.packed = winograd.WinogradWeight.from_transformed(transformed)
    return True
