"""Prepared packed weights: the UNet's weights written once, at build time, in the layout its CPU kernels compute
with, so that a cold start maps them instead of packing at the first step.

`comfy-serverless prepare` (prepare_command.py) builds each prepared UNet as the server does, runs one step at
--pack-size (default 512 px, batch 2: cfg), and writes beside the prepared file "<prepared>.packed.safetensors":
for every layer the oneDNN-packed bytes and descriptor (networks/onednn_blobs.py) or the Winograd-transformed
weight (networks/winograd.py) that cpu_kernels chose. At load, cpu_kernels.adopt_packed_weights hands them to the
layers as views of a memory map; the prepared plain weights then stay on disk unless something reads them (a
LoRA, a layer called at another input shape whose layout depends on it).

Why (AMD EPYC, 2 cores, under the AVX2 cap, full-size SD1.5, files in the page cache, 2026-12-01): the first UNet
call at 256 px took 2.9-3.1 s against 1.3-1.4 s warm, as it packed 3.3 GB (reorders 0.73 s, fresh memory at
~0.3 s/GB, page release); with the packed file mapped it took 1.36-1.45 s.

An fp32 UNet from an fp16 checkpoint (AVX2-only CPUs, --force-fp32) is written as fp16 where fp16 holds every value
exactly (checked per weight; an fp32 checkpoint's stay fp32): the oneDNN bytes, and for Winograd layers the taps
instead of the transform; cpu_kernels expands them at each call (why, and what it costs: its module doc). The
largest oneDNN-packed weights stay fp32, up to FP32_KEPT_SHARE of the UNet's fp32 bytes: expanding costs about
0.12 ms per MB of fp32 at each call, most where a layer's few rows make the product itself short (SD1.5: the five
2560->1280 3x3 convolutions at 4x4 and 8x8, 7-8 ms of expansion each per step). Measured on the Xeon model 207
capped at AVX-512 (2026-12-02): a UNet call 2.52 -> 2.46 s (medians of 12 alternating in one process, 0.991 per
pair; a slow phase of the machine), peak RSS of first_image.py 2.60-2.66 -> 2.87 GB (ComfyUI's: 6.20 GB).

The file is used only when it belongs to the current prepared file (its size and mtime), the same torch version, the
same network and dtype, the same choice of Winograd weights (fp32), the same CPU class (the vector instruction flags
and the ISA caps torch and oneDNN run under), and when this CPU packs like the one it was written on: one small
weight (the probe) is packed again at load and compared byte for byte (a few milliseconds). Otherwise the layers
pack at their first call as before, with a warning. Resident memory is the same either way, or half for fp16-held
weights (the packed bytes are file pages instead of process memory, and the plain weights' pages are not read).
"""

from __future__ import annotations

import json
import logging
import os
import threading

log = logging.getLogger(__name__)

FORMAT = "comfy-serverless-packed-2"  # 2: the largest fp32 packs kept in fp32
FP32_KEPT_SHARE = 0.09
DEFAULT_PACK_SIZE = 512


def cpu_layout_class() -> str:
    """What decides oneDNN's layouts here: the instruction set torch and oneDNN may use (the CPU's vector flags,
    capped by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)."""
    import torch

    from .precision import cpu_facts

    flags = sorted(flag for flag in cpu_facts().flags if flag.startswith(("avx", "amx", "fma", "f16c")))
    return (f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN up to "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'the CPU')}: {' '.join(flags)}")


def packs_path(prepared_file: str) -> str:
    return prepared_file.removesuffix(".safetensors") + ".packed.safetensors"


def _prepared_stamp(prepared_file: str) -> dict[str, str]:
    st = os.stat(prepared_file)
    return {"prepared_size": str(st.st_size), "prepared_mtime_ns": str(st.st_mtime_ns)}


def _expected(prepared_file: str, weights: dict, dtype) -> dict[str, str]:
    import torch

    from .prepared import dtype_tag, group_id

    expected = {"format": FORMAT, "torch": torch.__version__, "group": group_id(weights), "dtype": dtype_tag(dtype),
                **_prepared_stamp(prepared_file)}
    if dtype == torch.float32:  # which 3x3 layers keep Winograd weights can follow a timing (winograd_choice.py)
        from ..networks import cpu_kernels

        expected["winograd_weights"] = "yes" if cpu_kernels.transformed_winograd() else "no"
    return expected


def check(source: str, folder: str, weights: dict, dtype) -> tuple[dict | None, str]:
    """(metadata, "") when `folder` holds packed weights for the current prepared file of `source`, its network
    `weights` and `dtype`, else (None, why not). The CPU class is checked at load (the probe)."""
    from .checkpoint_files import CheckpointError, read_metadata
    from .prepared import prepared_path

    prepared_file = prepared_path(source, folder)
    path = packs_path(prepared_file)
    if not os.path.isfile(path) or not os.path.isfile(prepared_file):
        return None, "no packed weights"
    try:
        metadata = read_metadata(path)
    except (CheckpointError, OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc})"
    differ = [key for key, value in _expected(prepared_file, weights, dtype).items() if metadata.get(key) != value]
    if differ:
        return None, f"{path} was written for another prepared file, network or torch ({', '.join(differ)} differ)"
    if metadata.get("cpu_layout") != cpu_layout_class():
        return None, (f"{path} was made on another CPU class ({metadata.get('cpu_layout')}; here "
                      f"{cpu_layout_class()}): run `comfy-serverless prepare` on this one")
    return metadata, ""


def write_packs(source: str, folder: str, model, weights: dict, dtype, pack_size: int, cpu_class: str) -> int:
    """Runs `model` (a UNet built from the prepared weights) once at `pack_size` px and writes what its layers
    packed; returns how many layers were written (0, and no file, where nothing packs: COMFY_CPU_KERNELS=0, or
    bf16 forced on a CPU whose oneDNN cannot pack it)."""
    import torch

    from ..networks import cpu_kernels
    from .checkpoint_saving import write_safetensors
    from .prepared import DATA_ALIGNMENT, prepared_path

    warm_up(model, pack_size)
    packed = cpu_kernels.packed_weights_of(model)
    probe = cpu_kernels.layout_probe(model, packed)
    if probe is None:  # nothing packed, or nothing to recognise this CPU's layouts by
        return 0
    fp32 = dtype == torch.float32
    kept = _kept_in_fp32(packed, FP32_KEPT_SHARE * 4 * sum(w.numel() for w in weights.values())) if fp32 else set()
    tensors, stored_as = {}, {}
    for name, parts in packed.items():
        for part, (value, stored_dtype) in _parts_to_write(parts, fp32 and name not in kept).items():
            tensors[f"{part}/{name}"] = value
            if stored_dtype is not None:
                stored_as[f"{part}/{name}"] = stored_dtype
    prepared_file = prepared_path(source, folder)
    metadata = {**_expected(prepared_file, weights, dtype), "probe": probe, "pack_size": str(pack_size),
                "cpu_class": cpu_class, "cpu_layout": cpu_layout_class()}
    path = packs_path(prepared_file)
    write_safetensors(path, tensors, metadata, align=DATA_ALIGNMENT, stored_as=stored_as)
    os.chmod(path, 0o644)
    return len(packed)


def _kept_in_fp32(packed: dict, budget: float) -> set[str]:
    """The largest oneDNN-packed weights, down to the first whose fp32 bytes would take the extra over fp16's past
    `budget`."""
    kept: set[str] = set()
    for nbytes, name in sorted(((parts["onednn"].numel(), name) for name, parts in packed.items()
                                if "onednn" in parts), reverse=True):
        if nbytes / 2 > budget:
            break
        budget -= nbytes / 2
        kept.add(name)
    return kept


def _parts_to_write(parts: dict, fp32: bool) -> dict:
    """What to write of one layer's packed weight, each part with the dtype to store it as (None: as it is). fp32
    values that fp16 holds exactly (an fp16 checkpoint's) are stored as fp16: the oneDNN bytes viewed as fp32, and
    for a Winograd weight its taps instead of the 16/9 larger transform."""
    import torch

    from ..networks import cpu_kernels

    parts = dict(parts)
    taps = parts.pop("taps", None)
    if fp32 and taps is not None and cpu_kernels.exact_in_half(taps):
        return {"taps": (taps, torch.float16)}
    written: dict = {part: (value, None) for part, value in parts.items()}
    if fp32 and "onednn" in parts and cpu_kernels.exact_in_half(parts["onednn"].view(torch.float32)):
        written["onednn"] = (parts["onednn"].view(torch.float32), torch.float16)
    return written


def warm_up(model, pack_size: int) -> None:
    """One UNet call at pack_size x pack_size pixels with a cfg batch of 2, as sampling's first step."""
    import torch

    config = model.config
    side = max(1, pack_size // 8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, config.context_dim, generator=generator)
    y = None
    if config.adm_in_channels is not None:
        y = torch.randn(2, config.adm_in_channels, generator=generator)
    elif config.num_classes is not None:
        y = torch.zeros(2)
    with torch.inference_mode():
        model(x, torch.tensor([500.0, 500.0]), context, y=y)


def adopt(source: str, model, weights: dict, dtype) -> int:
    """Gives a UNet just built from the prepared weights of `source` its prepared packed weights; returns how many
    layers took one (0: none usable, they pack at the first call)."""
    from ..networks import cpu_kernels
    from .checkpoint_files import open_state_dict
    from .prepared import prepared_dir, prepared_path, prepared_weights, read_ahead

    folder = prepared_dir()
    metadata, why = check(source, folder, weights, dtype)
    if metadata is None:
        if why != "no packed weights":
            log.warning("%s: packed weights not used: %s", os.path.basename(source), why)
        return 0
    path = packs_path(prepared_path(source, folder))
    threading.Thread(target=read_ahead, args=(path,), daemon=True).start()
    # only for weights that are the prepared file's tensors (not a fallback conversion of a changed source)
    prepared = prepared_weights(source, weights, dtype) or {}
    parameters = dict(model.named_parameters())
    packed: dict[str, dict] = {}
    for key, tensor in open_state_dict(path).items():
        part, _, name = key.partition("/")
        if name in prepared and name in parameters and parameters[name].data_ptr() == prepared[name].data_ptr():
            packed.setdefault(name, {})[part] = tensor
    try:
        adopted = cpu_kernels.adopt_packed_weights(model, packed, metadata.get("probe", ""))
    except ValueError as exc:  # a descriptor this oneDNN rejects
        log.warning("%s: packed weights not used: %s", os.path.basename(source), exc)
        return 0
    log.info("%s: %d layers use packed weights from %s (made at %s px; %s)", os.path.basename(source), adopted,
             path, metadata.get("pack_size", "?"), json.dumps(metadata.get("cpu_class", "?")))
    return adopted
