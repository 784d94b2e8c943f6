"""ModelComputeDtype and TorchCompileModel: a MODEL clone that computes in another dtype, or through torch.compile.

Standard library only at module level: torch is imported when a node runs.
"""

from __future__ import annotations

import shutil

COMPUTE_DTYPES = ["default", "fp32", "fp16", "bf16"]
COMPILE_BACKENDS = ["inductor", "cudagraphs"]
C_COMPILERS = ("g++", "c++", "clang++", "cc", "gcc")


def _torch_dtype(name: str):
    """ComfyUI's names; "default" is None (the dtype the network was loaded in)."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, not {name!r}")
    return {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class ModelComputeDtype:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "dtype": (COMPUTE_DTYPES,)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/debug/model"
    DESCRIPTION = "A copy of the model that computes in the chosen dtype (default: the dtype it was loaded in)."

    def patch(self, model, dtype):
        patched = model.clone()
        patched.set_model_compute_dtype(_torch_dtype(dtype))
        return (patched,)


def check_compile_backend(backend: str) -> None:
    """Fails before sampling when the backend cannot work here: inductor needs a C++ compiler on CPU (and
    triton on CUDA, which torch reports itself); cudagraphs needs CUDA."""
    import torch

    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"backend must be one of {COMPILE_BACKENDS}, not {backend!r}")
    if backend == "cudagraphs" and not torch.cuda.is_available():
        raise RuntimeError("TorchCompileModel: the cudagraphs backend needs a CUDA device, and this server has none")
    if backend == "inductor" and not torch.cuda.is_available() and not any(shutil.which(c) for c in C_COMPILERS):
        raise RuntimeError("TorchCompileModel: the inductor backend compiles C++ on CPU, but no C++ compiler "
                           f"({', '.join(C_COMPILERS)}) is on PATH; install one (e.g. g++) or drop this node")


class TorchCompileModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {}),
            "backend": ("COMBO", {"multiselect": False, "options": list(COMPILE_BACKENDS)}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    DESCRIPTION = "A copy of the model whose UNet runs through torch.compile (compiled on its first step)."

    def patch(self, model, backend):
        check_compile_backend(backend)
        patched = model.clone()
        patched.model_options["torch_compile_backend"] = backend
        return (patched,)


NODE_CLASS_MAPPINGS = {"ModelComputeDtype": ModelComputeDtype, "TorchCompileModel": TorchCompileModel}
NODE_DISPLAY_NAME_MAPPINGS = {"ModelComputeDtype": "ModelComputeDtype", "TorchCompileModel": None}
