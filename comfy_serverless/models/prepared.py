"""Prepared weights: each checkpoint written once, at build time, in the dtype this CPU class computes in.

A checkpoint file stores fp16; the server computes in bf16 (avx512_bf16/AMX) or fp32 (AVX2), so every cold
start used to convert 1,100+ tensors (about 14 s for fp16 -> fp32 on an AVX2 EPYC, issue 12). `comfy-serverless
prepare` (prepare_command.py) writes, per source file, one safetensors file under the prepared folder whose
tensors are already split per network, named as our networks name their parameters and stored in the compute
dtype. The loader (loading._converted) asks `prepared_weights` first: the tensors it returns are views of a
memory map, which the networks take as their parameters as they are (build_from_state_dict, assign=True).

Measured on the project's AMD EPYC (avx512_bf16, 2 cores, other jobs running; full-size SD1.5 random weights,
file in the page cache; UNet + CLIP + VAE built and ready, fresh processes, 2026-12-01): 4.5-7.1 s converting
fp16 -> bf16 at load, 0.28-0.37 s from the prepared file (peak RSS unchanged: both map, neither copies twice).
`prepare` itself took 50 s for that file here (disk-bound writing 2.1 GB), once per image build.

The original stays the source of truth. A prepared file records the source's size, mtime and a sampled hash
(`source_fingerprint`, about 4 MB read) and is ignored, with a warning, when any of them differs; a request in
another dtype than the one prepared (another CPU class, a --force-fp32 server) falls back to the normal load
too. LoRAs still apply: the patcher replaces parameters with new tensors and never writes into the map.

Layout of a prepared file: tensor "<group>.<dtype>/<parameter name>", where <group> is a hash of the network's
sorted parameter names (so UNet, each text encoder and the VAE of one file never collide); metadata holds the
format, the source fingerprint and, per group, which network it is. The vectors of all networks (biases, norm
scales: read at every step) come first and the matrices after them. The page cache may hold a file in large folios
(2 MB on ext4 with Linux 6.18), and reading one byte maps its whole folio into the process: with each bias beside its
layer's weight, sampling kept 0.34-0.47 GB of SD1.5's fp32 UNet weights resident that no step reads (the layers
compute from their packed copies, prepared_packs.py). first_image.py under the AVX-512 cap (Xeon model 207,
2026-12-02): peak RSS 3.06-3.15 -> 2.61-2.66 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

log = logging.getLogger(__name__)

FORMAT = "comfy-serverless-prepared-2"  # 2: vectors first (module doc)
DATA_ALIGNMENT = 64  # bytes: a cache line, and the alignment torch's allocator gives heap tensors
DIR_ENV = "COMFY_PREPARED_DIR"
_SAMPLE_BLOCKS = 32
_SAMPLE_SIZE = 64 * 1024
_EDGE_SIZE = 1024 * 1024  # the header, where a re-saved file differs first

_lock = threading.Lock()
_opening = threading.Lock()
_opened: dict[tuple, object] = {}  # source stamp -> (tensors, groups) or None (no usable prepared file)


def prepared_dir(settings=None) -> str:
    """$COMFY_PREPARED_DIR, else prepared/ beside the catalogue snapshot (build-time state, not the user
    folder, whose files the /userdata API lists)."""
    if os.environ.get(DIR_ENV):
        return os.path.abspath(os.environ[DIR_ENV])
    if settings is None:
        from .. import settings as settings_module

        settings = settings_module.current()
    return os.path.join(os.path.dirname(os.path.abspath(settings.catalog_file)), "prepared")


def prepared_path(source: str, folder: str) -> str:
    """One prepared file per source path: its name, plus a hash of the real path (two folders may hold
    files of the same name)."""
    real = os.path.realpath(source)
    tag = hashlib.sha256(real.encode()).hexdigest()[:12]
    return os.path.join(folder, f"{os.path.splitext(os.path.basename(real))[0]}-{tag}.safetensors")


def source_fingerprint(path: str) -> dict[str, str]:
    """Size, mtime and a hash of the first and last MiB plus 32 blocks spread over the file: a changed or
    re-saved file is caught without reading gigabytes at every start."""
    st = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        digest.update(fh.read(_EDGE_SIZE))
        if st.st_size > 2 * _EDGE_SIZE:
            step = (st.st_size - 2 * _EDGE_SIZE) // _SAMPLE_BLOCKS
            for index in range(_SAMPLE_BLOCKS):
                fh.seek(_EDGE_SIZE + index * step)
                digest.update(fh.read(_SAMPLE_SIZE))
            fh.seek(st.st_size - _EDGE_SIZE)
            digest.update(fh.read(_EDGE_SIZE))
        else:
            digest.update(fh.read())  # a small file is hashed whole
    return {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns),
            "source_hash": digest.hexdigest()}


def group_id(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def dtype_tag(dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_prepared(source: str, folder: str, networks: dict[str, tuple[dict, object]], cpu_class: str) -> str:
    """Writes `networks` ({label: (weights, dtype)}) for `source` and returns the file's path. Floating
    tensors are converted to their network's dtype; the file is written beside and renamed into place, with
    every tensor of a size in whole cache lines starting on one (DATA_ALIGNMENT): mapped weights then sit where
    heap weights would, and AVX2 kernels give the same results for both (misaligned, they differed by ~1e-6)."""
    from .checkpoint_saving import write_safetensors

    tensors, groups = {}, {}
    for label, (weights, dtype) in networks.items():
        group = group_id(weights)
        groups[group] = {"network": label, "dtype": dtype_tag(dtype), "tensors": len(weights)}
        for name, tensor in weights.items():
            value = tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor
            tensors[f"{group}.{dtype_tag(dtype)}/{name}"] = value.contiguous()
    tensors = dict(sorted(tensors.items(), key=lambda item: item[1].dim() > 1))  # vectors first (module doc)
    metadata = {"format": FORMAT, "source": os.path.realpath(source), "cpu_class": cpu_class,
                "groups": json.dumps(groups), **source_fingerprint(source)}
    os.makedirs(folder, exist_ok=True)
    target = prepared_path(source, folder)
    write_safetensors(target, tensors, metadata, align=DATA_ALIGNMENT)
    os.chmod(target, 0o644)  # readable by the server's user, like the models themselves
    forget(source)
    return target


def check(source: str, folder: str) -> tuple[dict | None, str]:
    """(metadata, "") when `folder` holds an up-to-date prepared file for `source`, else (None, why not)."""
    from safetensors import safe_open

    target = prepared_path(source, folder)
    if not os.path.isfile(target):
        return None, f"no prepared file ({target})"
    try:
        with safe_open(target, framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types; any of them means unusable
        return None, f"{target} is unreadable ({exc})"
    if metadata.get("format") != FORMAT:
        return None, f"{target} has another format ({metadata.get('format')})"
    current = source_fingerprint(source)
    changed = [key for key, value in current.items() if metadata.get(key) != value]
    if changed:
        return None, f"the source changed since it was prepared ({', '.join(changed)} differ)"
    return metadata, ""


def _open(source: str, stamp: tuple):
    with _lock:
        if stamp in _opened:
            return _opened[stamp]
    with _opening:  # the UNet and VAE builds start together: one of them opens and checks the file
        with _lock:
            if stamp in _opened:
                return _opened[stamp]
        return _open_now(source, stamp)


def _open_now(source: str, stamp: tuple):
    folder = prepared_dir()
    metadata, why = check(source, folder)
    found = None
    if metadata is not None:
        from .checkpoint_files import open_state_dict

        found = (open_state_dict(prepared_path(source, folder)), json.loads(metadata.get("groups", "{}")),
                 metadata.get("cpu_class", "?"))
        log.info("%s: using prepared weights %s (%s)", os.path.basename(source), prepared_path(source, folder),
                 found[2])
        target = prepared_path(source, folder)
        threading.Thread(target=read_ahead, args=(target, _wanted_ranges(target, found[1])), daemon=True).start()
    elif os.path.isfile(prepared_path(source, folder)):
        log.warning("%s: prepared weights not used: %s; loading the original (run `comfy-serverless prepare`)",
                    os.path.basename(source), why)
    with _lock:
        _opened[stamp] = found
    return found


def read_ahead(path: str, ranges: list[tuple[int, int]] | None = None) -> None:
    """Asks the kernel to read the file (or its byte `ranges`) into the page cache in the background: with a cold
    cache (a fresh serverless host) the disk reads then overlap text encoding and the first steps instead of
    stalling each page fault of the first forward pass. Where the file is cached already this returns at once."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in ranges if ranges is not None else [(0, 0)]:  # length 0: to the end of the file
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):  # AttributeError: no posix_fadvise (macOS)
        pass


def _wanted_ranges(path: str, groups: dict) -> list[tuple[int, int]] | None:
    """The byte ranges of a prepared file a cold start reads: all of it (None), except the UNet's plain weights
    where `prepare` also wrote them packed (prepared_packs.py): the server reads the packed file instead, and on a
    cold disk reading both would put 3.4 GB (SD1.5 in fp32) before the weights the first step needs."""
    from .checkpoint_files import tensor_spans
    from .prepared_packs import packs_path

    if not os.path.isfile(packs_path(path)):
        return None
    unets = {group for group, info in groups.items() if info.get("network") == "unet"}
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for name, span in tensor_spans(path).items() if name.split(".", 1)[0] not in unets):
        if merged and start <= merged[-1][1]:  # touching: one range (never over a UNet tensor between)
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def prepared_weights(source: str, weights: dict, dtype) -> dict | None:
    """The network's tensors from the prepared file of `source`, memory-mapped and in `dtype`; None when
    there is none, it is stale, or it was prepared in another dtype (the caller then converts as before)."""
    if dtype is None or not weights:
        return None
    from .model_cache import file_stamp

    try:
        found = _open(source, file_stamp(source))
    except OSError:
        return None
    if found is None:
        return None
    tensors, groups, cpu_class = found
    group = group_id(weights)
    info = groups.get(group)
    if info is None:
        return None
    if info["dtype"] != dtype_tag(dtype):
        log.warning("%s: %s weights were prepared in %s (%s) but this server computes in %s: converting from "
                    "the original", os.path.basename(source), info["network"], info["dtype"], cpu_class,
                    dtype_tag(dtype))
        return None
    prefix = f"{group}.{info['dtype']}/"
    result = {}
    for name, original in weights.items():
        tensor = tensors.get(prefix + name)
        if tensor is None or tuple(tensor.shape) != tuple(original.shape):
            log.warning("%s: prepared %s weights do not match (%s); loading the original",
                        os.path.basename(source), info["network"], name)
            return None
        result[name] = tensor
    return result


def forget(source: str | None = None) -> None:
    """Drops the opened prepared files (all, or those of `source`): the next load checks again."""
    with _lock:
        if source is None:
            _opened.clear()
        else:
            real = os.path.realpath(source)
            for stamp in [stamp for stamp in _opened if stamp[0] == real]:
                del _opened[stamp]
