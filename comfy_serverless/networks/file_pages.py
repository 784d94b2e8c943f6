"""Which tensors are pages of a file mapping, and handing those pages back.

A weight that is a private or read-only file mapping (prepared weights, a file already in the compute dtype) and
was never written can drop its resident pages at any time: the kernel reads them back from the page cache if
they are touched again. cpu_kernels drops them once a weight is packed; text encoders after each encoding.
"""

from __future__ import annotations

import bisect
import os

import torch
from torch import nn

from .. import heap


def in_unwritten_file_mapping(tensor: torch.Tensor) -> bool:
    """`tensor` lies in a file mapping and was never written (version 0: patches replace parameters, they never
    write into them), so its pages are the file's."""
    return tensor._version == 0 and _in_file_mapping(tensor)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages of `tensor` when they are the file's (see module doc); heap memory is kept."""
    if in_unwritten_file_mapping(tensor):
        heap.release_pages(tensor)


def release_module_file_pages(module: nn.Module) -> None:
    """release_file_pages for every parameter of a network used once per prompt (a text encoder after encoding):
    its file pages leave this process's memory until the next use reads them back from the page cache (SD1.5's
    fp32 CLIP-L: 0.49 GB less resident while the UNet and VAE run; ~0.03 s to read back)."""
    for parameter in module.parameters():
        release_file_pages(parameter)


_file_ranges: list[tuple[int, int]] = []


def _in_file_mapping(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lies in a private or read-only file mapping. The map of the process is cached, but a
    cached range may have been unmapped since and its addresses reused by heap memory, whose pages must never be
    dropped: a hit counts only while /proc/self/map_files still names that range, else the map is read again."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    cached = _lookup(start, end)
    if cached is not None and _still_mapped(cached):
        return True
    _file_ranges[:] = _read_file_ranges()
    return _lookup(start, end) is not None


def _lookup(start: int, end: int) -> tuple[int, int] | None:
    index = bisect.bisect_right(_file_ranges, (start, float("inf"))) - 1
    if index >= 0 and end <= _file_ranges[index][1]:
        return _file_ranges[index]
    return None


def _still_mapped(mapping: tuple[int, int]) -> bool:
    try:
        os.readlink(f"/proc/self/map_files/{mapping[0]:x}-{mapping[1]:x}")
        return True
    except OSError:  # gone, or not readable here: the caller reads the map again
        return False


def _read_file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings whose untouched pages are read back from a file."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # a private (copy-on-write) or read-only mapping of a file: safetensors maps "rw-p"
                if len(fields) == 6 and (fields[1][3] == "p" or fields[1][1] == "-") and fields[4] != "0":
                    low, _, high = fields[0].partition("-")
                    ranges.append((int(low, 16), int(high, 16)))
    except (OSError, ValueError, IndexError):
        return []
    return sorted(ranges)
