"""oneDNN-packed weights as plain bytes and back, so `prepare` can write them and a cold start map them.

torch keeps a packed weight (mkldnn._reorder_convolution_weight / _reorder_linear_weight) as an opaque tensor:
its bytes and its memory descriptor can be read (torch.ops.mkldnn.data_ptr / _nbytes / _get_mkldnn_serialized_md,
what AOTInductor uses to save such constants), and torch's AOTInductor C shim builds one over existing memory
without copying (aoti_torch_create_tensor_from_blob_v2 with the mkldnn layout, exported by libtorch_cpu). Python
reaches the shim through ctypes and turns its handle into a tensor with torch._C._aoti.

Why: packing the fp32 SD1.5 UNet at its first call took 1.5 s of every cold start under the AVX2 cap (reorders
0.73 s, fresh pages for 3.3 GB at ~0.3 s/GB, page release); mapping the bytes `prepare` wrote makes the first
step as fast as a warm one (cpu_kernels, models/prepared_packs.py).

The bytes are in the layout oneDNN picks on the CPU that packed them (8-wide blocks with AVX2, 16 with AVX-512)
and, for some layers, for the input shape given to the reorder (1x1 convolutions with AVX-512, a few 3x3 ones
with AVX2 between 16x16 and 32x32, linears for a single row: 13-57 of the SD1.5 UNet's 282 layers); a weight in
a layout other than the one oneDNN wants for the call is reordered at every call (3.5 ms instead of 0.13 for a
320->640 1x1 convolution), so cpu_kernels records which shapes each prepared weight fits.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch


class _Shim:
    def __init__(self, lib: ctypes.CDLL):
        def constant(name: str) -> int:
            getter = getattr(lib, name)
            getter.restype = ctypes.c_int32
            return getter()

        self.layout_mkldnn = constant("aoti_torch_layout__mkldnn")
        self.device_cpu = constant("aoti_torch_device_type_cpu")
        self.dtypes = {torch.float32: constant("aoti_torch_dtype_float32"),
                       torch.bfloat16: constant("aoti_torch_dtype_bfloat16")}
        create = lib.aoti_torch_create_tensor_from_blob_v2
        create.restype = ctypes.c_int32
        int64_array = ctypes.POINTER(ctypes.c_int64)
        create.argtypes = [ctypes.c_void_p, ctypes.c_int64, int64_array, int64_array, ctypes.c_int64,
                           ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
                           ctypes.c_int32, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64]
        self.create = create
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype = ctypes.py_object
        capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = capsule


@functools.cache
def _shim() -> _Shim | None:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch._C, "_aoti"):
        return None
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return _Shim(ctypes.CDLL(library))
    except (OSError, AttributeError):  # not Linux, or a torch without the shim
        return None


def available() -> bool:
    return _shim() is not None


def to_bytes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, descriptor) of a packed weight as uint8 tensors. The data is a view of the packed weight's memory,
    not a copy (prepare writes a whole UNet's, 10 GB for SDXL in fp32): valid only while `packed` lives."""
    size = torch.ops.mkldnn._nbytes(packed)
    data = torch.frombuffer((ctypes.c_uint8 * size).from_address(torch.ops.mkldnn.data_ptr(packed)),
                            dtype=torch.uint8)
    return data, torch.ops.mkldnn._get_mkldnn_serialized_md(packed).clone()


def from_bytes(data: torch.Tensor, descriptor: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A packed weight of `shape` and `dtype` over `data`'s memory (no copy). The caller keeps `data` alive as long
    as the result. ValueError when the descriptor does not describe exactly `data`'s bytes."""
    shim = _shim()
    if shim is None:
        raise ValueError("this torch cannot build oneDNN tensors over memory")
    if data.dtype != torch.uint8 or not data.is_contiguous() or dtype not in shim.dtypes:
        raise ValueError("packed weights are contiguous uint8 data in float32 or bfloat16")
    sizes = list(shape)
    descriptor_bytes = bytes(descriptor.tolist())
    handle = ctypes.c_void_p()
    error = shim.create(data.data_ptr(), len(sizes), (ctypes.c_int64 * len(sizes))(*sizes),
                        (ctypes.c_int64 * len(sizes))(*([0] * len(sizes))), 0, shim.dtypes[dtype], shim.device_cpu, 0,
                        ctypes.byref(handle), shim.layout_mkldnn,
                        (ctypes.c_uint8 * len(descriptor_bytes)).from_buffer_copy(descriptor_bytes),
                        len(descriptor_bytes))
    if error != 0 or not handle.value:
        raise ValueError(f"oneDNN rejected the packed weight's descriptor (error {error})")
    tensor = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(shim.capsule(handle.value, None, None))
    if torch.ops.mkldnn._nbytes(tensor) != data.numel() or tuple(tensor.shape) != tuple(sizes):
        raise ValueError("the packed weight's descriptor does not match its data")
    return tensor
