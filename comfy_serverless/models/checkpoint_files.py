"""Single-file checkpoints in the original layout: open, recognise, split.

    open_state_dict(path)          .safetensors/.sft memory-mapped (no copy, nothing read until used);
                                   .ckpt/.pt/.pth/.bin with torch.load(weights_only=True, mmap=True)
    detect_architecture(sd, meta)  SD1.x / SD2.x (eps or v) / SDXL base / SDXL refiner, and their inpainting
                                   (9-channel) and InstructPix2Pix (8-channel) UNets, SD 2.1 unCLIP (an SD2 UNet
                                   with a y input for image embeddings), the SD x4 upscaler (7-channel UNet
                                   with a noise-level class label), every config read from the shapes
    noise_augmentor_state(sd)      an unCLIP file's noise_augmentor.* buffers, prefix stripped
    split_checkpoint(sd, arch)     UNet, text encoder and VAE weights with their prefixes stripped (same tensors)
    split_vae(sd)                  a VAELoader file (or the VAE inside a checkpoint) and its config
    open_checkpoint(path)          all of the above in one call

Every problem with a file is a CheckpointError whose message says what was found and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..networks.build import UNET_PREFIX, VAE_PREFIX, strip_prefix
from ..networks.clip import (
    SD1_CLIP_L_PREFIX,
    SD2_CLIP_H_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    UNUSED_CHECKPOINT_KEYS,
    CLIPTextConfig,
)
from ..networks.unet import UNetConfig
from ..networks.vae import VAEConfig

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = ("supported: SD1.x, SD2.x, SDXL base and refiner (also their inpainting and instruct-pix2pix UNets), "
             "SD 2.1 unCLIP, the SD x4 upscaler")
FAMILY_NAMES = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
# UNet inputs besides the 4 latent channels: ComfyUI's concat keys, by total input channels.
CONCAT_KINDS = {9: "inpaint", 8: "ip2p"}
CONCAT_NAMES = {"inpaint": "inpainting", "ip2p": "instruct-pix2pix"}
# The SD x4 upscaler: 4 latent + 3 low-res image channels, the noise level as a class label (label_emb.weight),
# 8 heads everywhere, attn1 attending to the text on the outer levels; always v-prediction; its own latent scale.
X4_UPSCALER_IN_CHANNELS = 7
X4_UPSCALER_LATENT_SCALE = 0.08333
X4_UPSCALER_UNET = UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                              transformer_depth=(0, 1, 1, 1), transformer_depth_middle=1, context_dim=1024,
                              num_heads=8, num_head_channels=None, use_linear_in_transformer=True, num_classes=1000,
                              cross_attention_only=(False, True, True, False))
# unCLIP files: y is [noise-augmented image embedding, noise level embedding]; the augmentation schedule's buffers
# and the image encoder (OpenCLIP layout) live under these prefixes. Real files: y 1536 (unclip-l), 2048 (-h).
NOISE_AUGMENTOR_PREFIX = "noise_augmentor."
UNCLIP_VISION_PREFIX = "embedder.model.visual."
UNCLIP_ADM_CHANNELS = (1536, 2048)
# Embedded numbers after the pooled text in y: SDXL base (sizes, crop, target size), refiner (sizes, crop, score).
ADM_NUMBERS = {"sdxl": 6, "sdxl_refiner": 5}
# Keys that mark a v-prediction model, and metadata written by trainers (modelspec) and make-test-checkpoint.
V_PRED_KEY = "v_pred"
PREDICTION_METADATA_KEY = "modelspec.prediction_type"
TEST_CHECKPOINT_METADATA_KEY = "comfy_serverless.test_checkpoint"
# ComfyUI's SD2 rule: a v model's last output transformer has norm1.bias with std above this.
SD2_V_BIAS_STD_THRESHOLD = 0.09
# The safetensors dtype names, by torch dtype.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
_SAFETENSORS_NAMES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# safetensors headers of real files are well under a few MB; anything huge means garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """A model file that cannot be used, with a message meant for the person who chose it."""


# ---- reading files ---------------------------------------------------------------------------------


def open_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model file, keyed by name; safetensors tensors are views of a private memory map."""
    return _open(path)[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (header only, milliseconds); {} for other formats."""
    path = _existing_file(path)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return {}
    return _safetensors_header(path)[1]


def _open(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = _existing_file(path)
    lowered = path.lower()
    if lowered.endswith(SAFETENSORS_SUFFIXES):
        return _open_safetensors(path)
    if lowered.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path), {}
    raise CheckpointError(f"{path}: unknown model file type; expected one of "
                          f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


def tensor_spans(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{tensor name: (first byte, end byte)} of a safetensors file's data, as offsets in the file."""
    path = _existing_file(path)
    entries, _, start = _safetensors_header(path)
    return {name: (start + int(entry["data_offsets"][0]), start + int(entry["data_offsets"][1]))
            for name, entry in entries.items()}


def _existing_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); download it again")
    return path


def _sniff(head: bytes) -> str | None:
    """What a file's first bytes say it is, when it is something well known."""
    signatures = [
        (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
        (b"PK\x03\x04", "a zip archive (a PyTorch .ckpt/.pt file?)"), (b"GGUF", "a GGUF file"),
        (b"\x1f\x8b", "a gzip archive"), (b"version https://git-lfs", "a Git LFS pointer, not the file itself"),
    ]
    for signature, description in signatures:
        if head.startswith(signature):
            return description
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (a PyTorch .ckpt/.pt file?)"
    if head.lstrip()[:1] == b"<":
        return "an HTML or XML page (a failed download?)"
    return None


def _not_safetensors(path: str, head: bytes, problem: str) -> CheckpointError:
    found = _sniff(head)
    if found:
        return CheckpointError(f"{path}: not a safetensors file: it looks like {found}")
    return CheckpointError(f"{path}: {problem}: truncated, corrupt or not a safetensors file")


def _safetensors_header(path: str) -> tuple[dict, dict[str, str], int]:
    """Validate the header against the file size and return (tensor entries, metadata, where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, head, f"only {size} bytes")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise _not_safetensors(path, head + file.read(56),
                                   f"header length {header_size} exceeds the file size {size}")
        raw = file.read(header_size)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:
        raise _not_safetensors(path, head + raw[:56], "header is not valid JSON") from None
    metadata = header.pop("__metadata__", None) or {}
    if not header:
        raise CheckpointError(f"{path}: the file holds no tensors")
    try:
        data_end = max(int(entry["data_offsets"][1]) for entry in header.values())
    except (KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header (a tensor entry without data_offsets)") from None
    needed = 8 + header_size + data_end
    if needed > size:
        raise CheckpointError(f"{path}: truncated: the tensors need {needed} bytes but the file has {size} "
                              f"({100 * size // needed}%); the download or copy was probably cut short")
    return header, {str(key): str(value) for key, value in metadata.items()}, 8 + header_size


def _open_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    entries, metadata, data_start = _safetensors_header(path)
    mapped = _mapped_views(path, entries, data_start)
    if mapped is not None:
        return mapped, metadata
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path), metadata
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from None


# safetensors' load_file reads the start of every tensor as it opens a file. Where the page cache holds the file in
# large folios (ext4 on Linux 6.18 here: 2 MB), each such read maps a whole folio into the process, so opening
# SD1.5's 2.1 GB checkpoint left 0.60 GB of it resident, and its 4.3 GB fp32 prepared copy 0.74 GB, before any
# weight was used. torch.frombuffer over one private map of the file reads nothing (10 instead of 32-125 ms to open
# the checkpoint, 0 MB resident); torch.asarray over a storage reads like load_file, and set_() counts as a write
# (file_pages.py). load_file stays for what the views cannot express (other dtypes, unaligned offsets).
def _mapped_views(path: str, entries: dict, data_start: int) -> dict[str, torch.Tensor] | None:
    """Each tensor of a safetensors file as a view of one copy-on-write map of it; None where one cannot be."""
    import mmap

    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return None
    views = {}
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for name, entry in entries.items():
        try:
            dtype = _SAFETENSORS_NAMES[entry["dtype"]]
            shape = [int(extent) for extent in entry["shape"]]
            begin, end = (data_start + int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        count = 1
        for extent in shape:
            count *= extent
        if (begin < data_start or begin % dtype.itemsize or end - begin != count * dtype.itemsize
                or min(shape, default=0) < 0):
            return None
        # a storage of its own per tensor, as load_file gives (torch.save refuses one storage of mixed dtypes)
        views[name] = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=begin).view(shape) if count
                       else torch.empty(shape, dtype=dtype))
    return views


def _open_pickle(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as file:
        head = file.read(64)
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not is_zip and not is_pickle:
        found = _sniff(head)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint" + (f": it looks like {found}" if found else
                              " (unrecognised content); truncated or corrupt?"))
    try:
        # mmap needs the zip format of torch >= 1.6; older pickles are read into memory.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", message):
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds Python objects besides tensors (it contains "
                f"{found.group(1)}), and loading those could run code; use a .safetensors version of this model "
                f"instead") from None
        # Anything else the safe unpickler stops at is damage, e.g. "Unsupported operand 180".
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        detail = detail.group(1) if detail else message.splitlines()[0]
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {detail}") from None
    except Exception as exc:  # a damaged pickle can fail in any way (IndexError, KeyError, ... seen)
        first_line = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {first_line}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    tensors = {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return tensors


# ---- architecture ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str  # key prefix in the checkpoint, stripped by split_checkpoint
    config: CLIPTextConfig


@dataclass(frozen=True)
class Architecture:
    family: str  # "sd15", "sd2", "sdxl" or "sdxl_refiner"
    prediction: str  # "eps" or "v_prediction"
    prediction_reason: str  # how prediction was decided, for logs
    unet_config: UNetConfig
    vae_config: VAEConfig | None  # None: the checkpoint carries no VAE
    text_encoders: dict[str, TextEncoderSpec]  # "clip_l" (SD1, SDXL), "clip_h" (SD2), "clip_g" (SDXL, refiner)
    # "full": the UNet is the released config; "custom": another size, read from the shapes with the family's
    # head rule (SD1 8 heads, SD2/SDXL 64-wide heads).
    size: str
    # Extra UNet input channels concatenated to the latent: "inpaint" (mask + masked image), "ip2p" (image).
    concat_kind: str | None = None
    # SD 2.1 unCLIP: an SD2 UNet whose y is a noise-augmented CLIP image embedding (models/unclip.py).
    unclip: bool = False
    # The SD x4 upscaler (family sd2 for its text encoder): c_concat is the low-res image, y its noise level.
    x4_upscaler: bool = False

    @property
    def description(self) -> str:
        prediction = "v-prediction" if self.prediction == "v_prediction" else "eps"
        kind = f" {CONCAT_NAMES[self.concat_kind]}" if self.concat_kind else ""
        kind += " unCLIP" if self.unclip else ""
        kind += " x4 upscaler" if self.x4_upscaler else ""
        return f"{FAMILY_NAMES[self.family]}{kind} ({prediction}, {self.size} size)"


_IN_CHANNELS = {5: "a depth-conditioned model", 7: "an upscaler model without a noise-level embedding"}


def detect_architecture(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                        ) -> Architecture:
    """Recognise SD1.x, SD2.x (eps or v), SDXL base and refiner from tensor names and shapes.

    Reads only shapes, except one small bias tensor for SD2 files that state no prediction type.
    """
    arch = detect_unet(strip_prefix(state_dict, UNET_PREFIX), metadata, state_dict)
    text_encoders = _text_encoders(state_dict, arch.family)
    _check_text_widths(arch.unet_config, text_encoders, arch.family, state_dict)
    vae_config = _vae_config(strip_prefix(state_dict, VAE_PREFIX), arch.family)
    if vae_config is not None and arch.x4_upscaler:
        vae_config = dataclasses.replace(vae_config, scaling_factor=X4_UPSCALER_LATENT_SCALE)
    return dataclasses.replace(arch, text_encoders=text_encoders, vae_config=vae_config)


def detect_unet(unet: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> Architecture:
    """The Architecture of a UNet alone (LDM keys, prefix stripped): no text encoders, no VAE. ``state_dict`` is
    the whole file, when there is one, for its markers (v_pred, EDM) and error messages."""
    metadata = metadata or {}
    state_dict = unet if state_dict is None else state_dict
    if "input_blocks.0.0.weight" not in unet or "out.2.weight" not in unet:
        raise CheckpointError(_not_supported(state_dict))
    if any(".time_stack." in key or ".time_mixer." in key for key in unet):
        raise CheckpointError(_not_supported(state_dict, "a video model (Stable Video Diffusion?)"))
    shape_config = _unet_shape_config(unet)
    in_channels = shape_config["in_channels"]
    has_label_emb = shape_config["adm_in_channels"] is not None
    unclip = has_label_emb and _is_unclip(shape_config, state_dict)
    if in_channels == X4_UPSCALER_IN_CHANNELS and shape_config["num_classes"] is not None:
        return _x4_upscaler(shape_config, state_dict)
    if (in_channels != 4 and in_channels not in CONCAT_KINDS) or shape_config["out_channels"] != 4:
        found = _IN_CHANNELS.get(in_channels, "a modified UNet")
        raise CheckpointError(_not_supported(
            state_dict, f"{found} ({in_channels} UNet input, {shape_config['out_channels']} output channels)"))
    if shape_config["num_classes"] is not None or shape_config["cross_attention_only"]:
        raise CheckpointError(_not_supported(state_dict, "a class-conditioned or modified UNet"))
    if has_label_emb and ("edm_mean" in state_dict or "edm_vpred.sigma_max" in state_dict):
        raise CheckpointError(_not_supported(state_dict, "an SDXL model with EDM sampling (Playground v2.5, CosXL)"))
    family = "sd2" if unclip else _family(shape_config)

    full = dataclasses.replace(_FULL_UNET[family](), in_channels=in_channels)
    if unclip:  # the released unCLIP UNets are SD2's plus label_emb
        full = dataclasses.replace(full, adm_in_channels=shape_config["adm_in_channels"])
    unet_config, size = _with_family_heads(shape_config, full)
    prediction, reason = _prediction(family, state_dict, metadata, unet)
    return Architecture(
        family=family, prediction=prediction, prediction_reason=reason, unet_config=unet_config,
        vae_config=None, text_encoders={}, size=size, concat_kind=CONCAT_KINDS.get(in_channels), unclip=unclip,
    )


def _x4_upscaler(shape_config: dict, state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    config = UNetConfig(**shape_config, num_heads=8, num_head_channels=None)
    if shape_config["out_channels"] != 4 or not shape_config["use_linear_in_transformer"]:
        raise CheckpointError(_not_supported(state_dict, "a 7-channel class-conditioned UNet unlike the x4 upscaler"))
    widths = {config.model_channels * mult for mult, depth in zip(config.channel_mult, config.transformer_depth)
              if depth}
    if any(width % 8 for width in widths):
        raise _unusual(f"attention {sorted(widths)} channels wide, which does not split into the x4 upscaler's 8 heads")
    return Architecture(family="sd2", prediction="v_prediction", prediction_reason="the x4 upscaler is a v model",
                        unet_config=config, vae_config=None, text_encoders={},
                        size="full" if config == X4_UPSCALER_UNET else "custom", x4_upscaler=True)


def _is_unclip(shape_config: dict, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A y input with SD2's text width (1024) as ComfyUI tells unCLIP from SDXL (2048) and the refiner (1280);
    other sizes (test files) by the unCLIP parts the file carries next to its UNet."""
    if not shape_config["use_linear_in_transformer"]:
        return False
    if shape_config["context_dim"] == 1024 and shape_config["adm_in_channels"] in UNCLIP_ADM_CHANNELS:
        return True
    return any(key.startswith((NOISE_AUGMENTOR_PREFIX, UNCLIP_VISION_PREFIX)) for key in state_dict)


def noise_augmentor_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unCLIP file's noise augmentation buffers (alphas_cumprod, data_mean, ...) without their prefix; {} when
    the file has none (the schedule is then computed: models/unclip.py)."""
    return {key[len(NOISE_AUGMENTOR_PREFIX):]: value for key, value in state_dict.items()
            if key.startswith(NOISE_AUGMENTOR_PREFIX)}


def _family(shape_config: dict) -> str:
    """A y input means SDXL; the refiner has no attention on its last level (the base has its deepest there).
    Without y, linear transformer projections mean SD2."""
    if shape_config["adm_in_channels"] is not None:
        return "sdxl_refiner" if shape_config["transformer_depth"][-1] == 0 else "sdxl"
    return "sd2" if shape_config["use_linear_in_transformer"] else "sd15"


_FULL_UNET = {"sd15": UNetConfig.sd15, "sd2": UNetConfig.sd2, "sdxl": UNetConfig.sdxl,
              "sdxl_refiner": UNetConfig.sdxl_refiner}
_TRANSFORMER_KEY = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")
_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def _require(weights: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in weights:
        raise CheckpointError(f"UNet weight {key!r} is missing: the file is incomplete or its UNet is not laid out "
                              f"like SD1.x/SD2.x/SDXL; {SUPPORTED}")
    return weights[key]


def _unusual(detail: str) -> CheckpointError:
    return CheckpointError(f"the UNet's blocks are laid out unlike SD1.x/SD2.x/SDXL ({detail}); a distilled or "
                           f"modified model? {SUPPORTED}")


def _unet_shape_config(unet: Mapping[str, torch.Tensor]) -> dict:
    """UNetConfig fields read from the shapes (all but the head split, which shapes do not show)."""
    model_channels, in_channels = _require(unet, "input_blocks.0.0.weight").shape[:2]
    depths: dict[str, int] = {}
    block_counts = {"input_blocks": 0, "output_blocks": 0}
    for key in unet:
        if match := _TRANSFORMER_KEY.match(key):
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
        if match := _BLOCK_KEY.match(key):
            block_counts[match[1]] = max(block_counts[match[1]], int(match[2]) + 1)

    # Input blocks: per level its res blocks (width multiplier, transformer depth), then a downsample.
    levels: list[list[tuple[int, int]]] = [[]]
    cross_only: list[bool] = [False]  # per level: attn1 attends to the text (its to_k is context_dim wide)
    for index in range(1, block_counts["input_blocks"]):
        if f"input_blocks.{index}.0.op.weight" in unet:
            levels.append([])
            cross_only.append(False)
            continue
        to_k = unet.get(f"input_blocks.{index}.1.transformer_blocks.0.attn1.to_k.weight")
        cross_only[-1] |= to_k is not None and to_k.shape[0] != to_k.shape[1]
        width = _require(unet, f"input_blocks.{index}.0.in_layers.2.weight").shape[0]
        if width % model_channels:
            raise _unusual(f"input block {index} is {width} wide, not a multiple of {model_channels}")
        levels[-1].append((width // model_channels, depths.get(f"input_blocks.{index}", 0)))
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise _unusual(f"res blocks per level {[len(level) for level in levels]}")
    if any(len(set(level)) != 1 for level in levels):
        raise _unusual("blocks of one level differ in width or transformer depth")
    channel_mult = tuple(level[0][0] for level in levels)
    transformer_depth = tuple(level[0][1] for level in levels)

    expected_outputs = len(levels) * (num_res_blocks + 1)
    if block_counts["output_blocks"] != expected_outputs:
        raise _unusual(f"{block_counts['output_blocks']} output blocks, expected {expected_outputs}")
    for up_index, level in enumerate(reversed(range(len(levels)))):
        for index in range(up_index * (num_res_blocks + 1), (up_index + 1) * (num_res_blocks + 1)):
            if depths.get(f"output_blocks.{index}", 0) != transformer_depth[level]:
                raise _unusual(f"output block {index} has transformer depth {depths.get(f'output_blocks.{index}', 0)}"
                               f", its input blocks {transformer_depth[level]}")
    if not depths.get("middle_block"):
        raise _unusual("no transformer in the middle block")

    context_key = next((key for key in unet if key.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    proj_in_key = next((key for key in unet if key.endswith(".1.proj_in.weight")), None)
    if context_key is None or proj_in_key is None:
        raise _unusual("transformers without cross-attention or input projection")
    label_emb = unet.get("label_emb.0.0.weight")
    return dict(
        in_channels=in_channels, out_channels=_require(unet, "out.2.weight").shape[0], model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
        transformer_depth_middle=depths["middle_block"], context_dim=unet[context_key].shape[1],
        use_linear_in_transformer=unet[proj_in_key].ndim == 2,
        adm_in_channels=None if label_emb is None else label_emb.shape[1],
        num_classes=unet["label_emb.weight"].shape[0] if "label_emb.weight" in unet else None,
        cross_attention_only=tuple(cross_only) if any(cross_only) else (),
    )


def _with_family_heads(shape_config: dict, full: UNetConfig) -> tuple[UNetConfig, str]:
    """Shapes cannot tell 8 heads of 40 from 5 of 64: use the family's rule, as ComfyUI does (SD1 8 heads,
    SD2/SDXL 64-wide heads). "full" when the result is the released config, else "custom"."""
    config = UNetConfig(**shape_config, num_heads=full.num_heads, num_head_channels=full.num_head_channels)
    widths = sorted({config.model_channels * mult
                     for mult, depth in zip(config.channel_mult, config.transformer_depth) if depth})
    unit = config.num_head_channels or config.num_heads or 1
    if any(width % unit for width in widths):
        rule = f"{config.num_heads} heads" if config.num_heads else f"{config.num_head_channels}-wide heads"
        raise _unusual(f"attention {widths} channels wide, which does not split into the family's {rule}")
    return config, "full" if config == full else "custom"


def _check_text_widths(unet_config: UNetConfig, text_encoders: dict[str, TextEncoderSpec], family: str,
                       state_dict: Mapping[str, torch.Tensor]) -> None:
    """A text width other than the released one is a custom size, as long as the file's text encoders give it."""
    if set(text_encoders) != set(_TEXT_ENCODER_PREFIXES[family]):
        return  # a missing encoder was logged; its CLIP comes from elsewhere
    width = sum(spec.config.width for spec in text_encoders.values())
    if width != unet_config.context_dim:
        widths = " + ".join(f"{name} {spec.config.width}" for name, spec in text_encoders.items())
        raise CheckpointError(_not_supported(
            state_dict, f"a {FAMILY_NAMES[family]}-like UNet with text width {unet_config.context_dim} and text "
                        f"encoders of width {widths}"))
    if family in ADM_NUMBERS and unet_config.adm_in_channels is not None:
        clip_g = text_encoders["clip_g"].config
        pooled = clip_g.projection_dim or clip_g.width
        numbers = ADM_NUMBERS[family]
        size_width, rest = divmod(unet_config.adm_in_channels - pooled, numbers)
        if size_width <= 0 or rest:
            raise CheckpointError(_not_supported(
                state_dict, f"an {FAMILY_NAMES[family]}-like UNet whose conditioning vector "
                            f"({unet_config.adm_in_channels} wide) is not the pooled text ({pooled}) plus {numbers} "
                            f"embedded numbers"))


def _prediction(family: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                unet: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """eps or v_prediction: a v_pred key, then metadata, then (SD2 only) ComfyUI's bias statistic."""
    if V_PRED_KEY in state_dict:
        return "v_prediction", "v_pred key"
    stated = metadata.get(PREDICTION_METADATA_KEY, "").strip().lower()
    if stated in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", f"metadata {PREDICTION_METADATA_KEY}"
    if stated in ("epsilon", "eps"):
        return "eps", f"metadata {PREDICTION_METADATA_KEY}"
    if metadata.get(TEST_CHECKPOINT_METADATA_KEY) == "sd2-v":
        return "v_prediction", f"metadata {TEST_CHECKPOINT_METADATA_KEY}"
    if family != "sd2":
        return "eps", "default"
    # SD2 768-v and 512-base have identical shapes. ComfyUI looks at the std of one LayerNorm bias of the last
    # output transformer (output_blocks.11.1 in the full model), above 0.09 in v models. One small tensor read.
    last = max((int(key.split(".")[1]) for key in unet
                if key.startswith("output_blocks.") and ".1.transformer_blocks.0.norm1.bias" in key), default=None)
    if last is None:
        return "eps", "default"
    bias = unet[f"output_blocks.{last}.1.transformer_blocks.0.norm1.bias"].float()
    std = bias.std(unbiased=False).item()
    if std > SD2_V_BIAS_STD_THRESHOLD:
        return "v_prediction", f"heuristic: output_blocks.{last} norm1.bias std {std:.3f} > {SD2_V_BIAS_STD_THRESHOLD}"
    return "eps", f"heuristic: output_blocks.{last} norm1.bias std {std:.3f} <= {SD2_V_BIAS_STD_THRESHOLD}"


# ---- text encoders -----------------------------------------------------------------------------------

# Where each family keeps its text encoders, preferred prefix first (older/sgm layouts after).
_TEXT_ENCODER_PREFIXES = {
    "sd15": {"clip_l": (SD1_CLIP_L_PREFIX, "cond_stage_model.transformer.")},
    "sd2": {"clip_h": (SD2_CLIP_H_PREFIX, "conditioner.embedders.0.model.")},
    "sdxl": {"clip_l": (SDXL_CLIP_L_PREFIX,), "clip_g": (SDXL_CLIP_G_PREFIX,)},
    "sdxl_refiner": {"clip_g": (SDXL_REFINER_CLIP_G_PREFIX,)},
}
_FULL_TEXT = {"clip_l": CLIPTextConfig.clip_l, "clip_h": CLIPTextConfig.open_clip_h,
              "clip_g": CLIPTextConfig.open_clip_bigg}
_TEXT_KEYS = {"hf": ("embeddings.", "encoder.", "final_layer_norm."),
              "openclip": ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")}
_LAYER_KEY = re.compile(r"^(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")


def _text_encoders(state_dict: Mapping[str, torch.Tensor], family: str) -> dict[str, TextEncoderSpec]:
    """The family's text encoders present in the file (a file without them still loads its UNet)."""
    found = {}
    for name, prefixes in _TEXT_ENCODER_PREFIXES[family].items():
        layout = "hf" if name == "clip_l" else "openclip"
        for prefix in prefixes:
            probe = prefix + ("embeddings.token_embedding.weight" if layout == "hf" else "token_embedding.weight")
            if probe in state_dict:
                try:
                    config = _text_config(strip_prefix(state_dict, prefix), layout, _FULL_TEXT[name]())
                except KeyError as exc:
                    raise CheckpointError(f"the {name} text encoder ({prefix}*) is incomplete: "
                                          f"{exc.args[0]} is missing") from None
                found[name] = TextEncoderSpec(prefix, config)
                break
        else:
            log.warning("%s checkpoint without its %s text encoder", FAMILY_NAMES[family], name)
    return found


def _text_config(weights: Mapping[str, torch.Tensor], layout: str, full: CLIPTextConfig) -> CLIPTextConfig:
    layers = 1 + max((int(match[1]) for key in weights if (match := _LAYER_KEY.match(key))), default=-1)
    if layout == "hf":
        vocab_size, width = weights["embeddings.token_embedding.weight"].shape
        context_length = weights["embeddings.position_embedding.weight"].shape[0]
        mlp_width = weights["encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection_dim = None
    else:
        vocab_size, width = weights["token_embedding.weight"].shape
        context_length = weights["positional_embedding"].shape[0]
        mlp_width = weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = weights.get("text_projection")
        projection_dim = None if projection is None else projection.shape[1]
    fields = dict(width=width, layers=layers, mlp_width=mlp_width, activation=full.activation, layout=layout,
                  projection_dim=projection_dim, vocab_size=vocab_size, context_length=context_length)
    if dataclasses.replace(full, **fields) == full:
        return full
    # Another size: one head per 64 channels (the released encoders' head width), at least one.
    return CLIPTextConfig(heads=max(1, width // 64), **fields)


# ---- VAE -------------------------------------------------------------------------------------------

_VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_VAE_ATTENTION_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_VAE_SCALE = {"sd15": VAEConfig.sd().scaling_factor, "sd2": VAEConfig.sd().scaling_factor,
              "sdxl": VAEConfig.sdxl().scaling_factor, "sdxl_refiner": VAEConfig.sdxl().scaling_factor}


def _vae_config(vae: Mapping[str, torch.Tensor], family: str) -> VAEConfig | None:
    if not vae:
        log.warning("%s checkpoint without a VAE", FAMILY_NAMES[family])
        return None
    try:
        return _vae_config_from_shapes(vae, family)
    except (KeyError, ValueError) as exc:  # a missing key, or max() of no blocks
        raise CheckpointError(f"the VAE is incomplete or in an unknown layout ({exc})") from None


def _vae_config_from_shapes(vae: Mapping[str, torch.Tensor], family: str) -> VAEConfig:
    base_channels, in_channels = vae["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(key.split(".")[2]) for key in vae if key.startswith("encoder.down."))
    num_res_blocks = 1 + max(int(key.split(".")[4]) for key in vae if key.startswith("encoder.down.0.block."))
    channel_mult = tuple(vae[f"encoder.down.{level}.block.{num_res_blocks - 1}.conv2.weight"].shape[0] // base_channels
                         for level in range(levels))
    latent_channels = vae["decoder.conv_in.weight"].shape[1]
    if latent_channels != 4:
        raise CheckpointError(f"a VAE with {latent_channels} latent channels (SD3 / Flux use 16); {SUPPORTED} VAEs")
    return VAEConfig(in_channels=in_channels, out_channels=vae["decoder.conv_out.weight"].shape[0],
                     base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                     latent_channels=latent_channels, scaling_factor=_VAE_SCALE[family])


def _vae_weights(vae: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The AutoencoderKL keys only; attention weights stored as [C, C] (older conversions) viewed as 1x1 convs."""
    weights = {}
    for key, value in vae.items():
        if key.startswith(_VAE_KEYS):
            weights[key] = value.view(*value.shape, 1, 1) if value.ndim == 2 and _VAE_ATTENTION_WEIGHT.match(key) \
                else value
    return weights


def split_vae(state_dict: Mapping[str, torch.Tensor], family: str = "sd15"
              ) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """A VAE file (bare ``encoder.*``/``decoder.*`` keys, or the ``first_stage_model.*`` of a checkpoint).

    SD and SDXL VAEs share one architecture and cannot be told apart: ``family`` only sets the config's
    scaling factor, which belongs to the model the VAE is used with.
    """
    vae = strip_prefix(state_dict, VAE_PREFIX) if any(key.startswith(VAE_PREFIX) for key in state_dict) \
        else dict(state_dict)
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in vae):
        raise CheckpointError("a VAE in diffusers layout (down_blocks/up_blocks); use the single-file "
                              "(original layout) version of this VAE")
    if "encoder.conv_in.weight" not in vae:
        raise CheckpointError(_not_supported(state_dict, expected="expected a VAE (encoder.* and decoder.* keys)"))
    return _vae_weights(vae), _vae_config(vae, family)


# ---- splitting -------------------------------------------------------------------------------------


def split_checkpoint(state_dict: Mapping[str, torch.Tensor], arch: Architecture
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(unet, {encoder name: weights}, vae) keyed as UNetModel / CLIPTextModel / AutoencoderKL expect.

    New dicts over the very same tensor objects: nothing is copied or read. vae is {} when the file has none.
    """
    unet = strip_prefix(state_dict, UNET_PREFIX)
    text_encoders = {}
    for name, spec in arch.text_encoders.items():
        allowed = _TEXT_KEYS[spec.config.layout]
        text_encoders[name] = {key: value for key, value in strip_prefix(state_dict, spec.prefix).items()
                               if key.startswith(allowed) and key not in UNUSED_CHECKPOINT_KEYS}
    vae = _vae_weights(strip_prefix(state_dict, VAE_PREFIX)) if arch.vae_config is not None else {}
    return unet, text_encoders, vae


@dataclass(frozen=True)
class CheckpointParts:
    architecture: Architecture
    unet: dict[str, torch.Tensor]
    text_encoders: dict[str, dict[str, torch.Tensor]]
    vae: dict[str, torch.Tensor]
    metadata: dict[str, str]


def open_checkpoint(path: str | os.PathLike) -> CheckpointParts:
    """Open, recognise and split a checkpoint; errors name the file."""
    state_dict, metadata = _open(path)
    try:
        arch = detect_architecture(state_dict, metadata)
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
    unet, text_encoders, vae = split_checkpoint(state_dict, arch)
    log.info("%s: %s, prediction from %s", os.fspath(path), arch.description, arch.prediction_reason)
    return CheckpointParts(arch, unet, text_encoders, vae, metadata)


def open_vae(path: str | os.PathLike, family: str = "sd15") -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """VAELoader: a standalone VAE file (or the VAE of a checkpoint); see split_vae."""
    state_dict = open_state_dict(path)
    try:
        return split_vae(state_dict, family)
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None


# ---- saying what a file is -------------------------------------------------------------------------

_LORA_MARKERS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.",
                 "lora_linear_layer", ".hada_w1", ".lokr_w1")


def describe_contents(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess at what a model file is, from its key names."""
    keys = list(state_dict)

    def has(*fragments: str) -> bool:
        return any(fragment in key for key in keys for fragment in fragments)

    if has(*_LORA_MARKERS):
        return "a LoRA (load it with LoraLoader)"
    if has("joint_blocks."):
        return "an SD3 / MMDiT model"
    if has("double_blocks.") and has("single_blocks."):
        return "a Flux model"
    if has(".time_stack.", ".time_mixer.", "time_pos_embed"):
        return "a video model (Stable Video Diffusion?)"
    if has("input_hint_block.", "zero_convs.", "control_model."):
        return "a ControlNet"
    if has("down_blocks.0.resnets.0.") or has("down_blocks.0.attentions.0."):
        return "a model in diffusers layout (use a single-file checkpoint)"
    if any(key.startswith(("encoder.conv_in.", "decoder.conv_in.")) for key in keys) or (
            has(VAE_PREFIX) and not has(UNET_PREFIX)):
        return "a VAE on its own (load it with VAELoader)"
    if has("string_to_param", "emb_params") or (keys and set(keys) <= {"clip_l", "clip_g", "clip_h"}):
        return "a textual-inversion embedding (put it in models/embeddings)"
    if has("text_model.encoder.layers.", "transformer.resblocks.") and not has(UNET_PREFIX):
        return "a text encoder on its own"
    if has(UNET_PREFIX):
        return "a diffusion model of another architecture"
    return "an unknown kind of model"


def _not_supported(state_dict: Mapping[str, torch.Tensor], found: str | None = None,
                   expected: str = SUPPORTED) -> str:
    examples = ", ".join(repr(key) for key in list(state_dict)[:3])
    what = found or describe_contents(state_dict)
    return f"this file looks like {what} (keys like {examples}); {expected}"
